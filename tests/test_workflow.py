"""The whole workflow through the command line, on tiny data.

- the default layout with a tiny --configfile (replacing dataset and models entirely),
- `-s path/to/Snakefile --directory elsewhere` (results on scratch),
- a user's own Broden directory and a factory model with a checkpoint,
- shards: 2 shards give byte-identical tables to 1 shard.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cnnvis_pipeline.tables import read_provenance

pytestmark = pytest.mark.slow

FACTORY = '''
import torch
from torch import nn

def build(width=4):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()),
    )
'''


def tiny_config(workflow, shards: int) -> dict:
    cfg = workflow.config("two_models")
    cfg["resources"]["shards"] = shards
    return cfg


def tables(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes()
            for p in sorted((workdir / "results").rglob("*.parquet"))}


def expected_tables() -> set[str]:
    """The tables of `--until summary` with the two_models config: six per model layer."""
    layers = [("tiny", "features.relu3"), ("tiny", "features.relu4"),
              ("tiny_random", "features.relu4")]
    return {f"results/{m}/{layer}/{t}.parquet" for m, layer in layers
            for t in ("thresholds", "iou", "units", "top_images", "significance", "sweep")
            } | {"results/summary/detectors.parquet"}


def test_tiny_workflow_elsewhere_and_shards_equal_one_pass(tmp_path, workflow):
    one = tmp_path / "one"
    two = tmp_path / "two"
    for wd, shards in ((one, 1), (two, 2)):
        proc = workflow.run(wd, tiny_config(workflow, shards), "--quiet", "rules", "--until",
                            "summary")
        assert proc.returncode == 0
    for wd in (one, two):
        units = pd.read_parquet(wd / "results/tiny/features.relu3/units.parquet")
        assert len(units) == 8 and {"model", "layer", "unit", "threshold", "concept", "category",
                                    "iou", "detector"} <= set(units.columns)
        # relu4 (8 units): one row per unit and concept; IoU = intersection / union; the units
        # table's IoU is each unit's best
        iou = pd.read_parquet(wd / "results/tiny/features.relu4/iou.parquet")
        concepts = len(iou[["concept", "category"]].drop_duplicates())
        assert iou["unit"].value_counts().to_dict() == dict.fromkeys(range(8), concepts)
        assert not iou.duplicated(["unit", "concept", "category"]).any()
        seen = iou["union"] > 0
        assert (iou["iou"][seen] == iou["intersection"][seen] / iou["union"][seen]).all()
        assert (iou["iou"][~seen] == 0).all()
        units4 = pd.read_parquet(wd / "results/tiny/features.relu4/units.parquet")
        assert units4["iou"].tolist() == iou.groupby("unit")["iou"].max().tolist()
        summary = pd.read_parquet(wd / "results/summary/detectors.parquet")
        assert set(summary["model"]) == {"tiny", "tiny_random"}
        # nothing of the default config leaked in (dataset and models are replaced)
        assert not (wd / "results/synthnet").exists()
        assert not (wd / "results/tiny/extract").exists()  # temp activations removed
    # The shard count is not part of the result: byte-identical tables and plots.
    a, b = tables(one), tables(two)
    assert set(a) == set(b) == expected_tables()
    for k in a:
        assert a[k] == b[k], k
    for plot in ("results/tiny/features.relu4/detectors.png", "results/summary/unique_detectors.png"):
        png = (one / plot).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == (two / plot).read_bytes(), plot


def test_user_dataset_and_factory_model_with_checkpoint(tmp_path, synth_dir, workflow):
    pkg = tmp_path / "pkg"
    (pkg / "mynets").mkdir(parents=True)
    (pkg / "mynets" / "__init__.py").write_text("")
    (pkg / "mynets" / "nets.py").write_text(FACTORY)
    sys.path.insert(0, str(pkg))
    try:
        from mynets.nets import build  # noqa: PLC0415
    finally:
        sys.path.remove(str(pkg))
    torch.save(build(width=4).state_dict(), tmp_path / "w.pt")
    config = workflow.config("factory")
    config["dataset"]["path"] = str(synth_dir)
    config["models"]["mynet"]["checkpoint"] = str(tmp_path / "w.pt")
    proc = workflow.run(tmp_path / "run", config, "--quiet", "rules", "--until", "summary",
                        env=workflow.env(pkg))
    assert proc.returncode == 0
    units = pd.read_parquet(tmp_path / "run/results/mynet/2.1/units.parquet")
    assert len(units) == 4 and (units["threshold"] > 0).all()
    prov = read_provenance(tmp_path / "run/results/mynet/2.1/units.parquet")
    assert prov["checkpoint_sha256"] == hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
