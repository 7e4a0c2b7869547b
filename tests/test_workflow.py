"""The whole workflow through the command line, on tiny data.

- the default layout with a tiny --configfile (replacing dataset and models entirely),
- `-s path/to/Snakefile --directory elsewhere` (results on scratch),
- a user's own Broden directory and a factory model with a checkpoint,
- shards: 2 shards give byte-identical tables to 1 shard.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

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
    cfg["dissection"]["shards"] = shards
    return cfg


def tables(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes()
            for p in sorted((workdir / "results").rglob("*.parquet"))}


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
        iou = pd.read_parquet(wd / "results/tiny/features.relu4/iou.parquet")
        assert len(iou) == 8 * iou["concept"].nunique() * 1 or len(iou) > 0
        assert {"intersection", "union", "category", "concept"} <= set(iou.columns)
        summary = pd.read_parquet(wd / "results/summary/detectors.parquet")
        assert set(summary["model"]) == {"tiny", "tiny_random"}
        assert (wd / "results/tiny/features.relu4/detectors.png").stat().st_size > 1000
        assert (wd / "results/logs/tiny/extract_0.log").exists()
        # nothing of the default config leaked in (dataset and models are replaced)
        assert not (wd / "results/synthnet").exists()
        assert not (wd / "results/tiny/extract").exists()  # temp activations removed
    # The shard count is not part of the result: byte-identical tables.
    a, b = tables(one), tables(two)
    assert a.keys() == b.keys() and len(a) >= 10
    for k in a:
        assert a[k] == b[k], k


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
    meta = pq.read_schema(tmp_path / "run/results/mynet/2.1/units.parquet").metadata
    assert b"checkpoint_sha256" in meta[b"cnnvis.provenance"]
