"""Bulk audit: many models x layers in one `snakemake --cores 2 --configfile ... summary` run
(the dissection and the cross-model summary; the per-unit visualisations and HTML reports, which
the default target adds, are left out to keep the run short).

One config holds a torchvision model (resnet18, seeded random weights: no download), a user
factory (a module this test writes, on PYTHONPATH) and a checkpoint series (three state dicts
this test saves). Checks that:
  * the dataset is synthesised, validated and prepared once (one job each) for all models;
  * each model's layers come from one forward pass: one extract_shard job per shard per model
    (and one layer_tables job per layer: thresholds, tally and tables);
  * results/summary/detectors.parquet covers every model and layer, with provenance;
  * the summary rule draws unique_detectors.png and, for the series, series_<name>.png;
  * the series' tables carry the sha256 of their own checkpoint file.
Also: the series plot helpers in-process (no Snakemake).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

RUN_TIMEOUT_S = 600

FACTORY = '''
from collections import OrderedDict

from torch import nn


def build(width=4):
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, width, 3, padding=1), relu1=nn.ReLU(),
        pool=nn.MaxPool2d(2),
        conv2=nn.Conv2d(width, 2 * width, 3, padding=1), relu2=nn.ReLU(),
    ))
'''

# few layers: every (model, layer) costs 2 jobs, each ~5 s of CPU (python + torch start-up)
SYNTHNET_LAYERS = ["features.relu4"]


def bulk_config(workflow, tmp: Path, shards: int) -> dict:
    cfg = workflow.config("bulk")
    cfg["models"]["snap"]["checkpoints"] = [str(tmp / "ckpt" / f"e{k}.pt") for k in (1, 2, 3)]
    cfg["resources"]["shards"] = shards
    return cfg


MODEL_LAYERS = {
    "resnet18": ["layer3", "layer4"],
    "tiny": ["relu2"],
    **{f"snap-e{k}": SYNTHNET_LAYERS for k in (1, 2, 3)},
}


@pytest.fixture(scope="module")
def bulk_dir(tmp_path_factory) -> Path:
    import torch

    from cnnvis_pipeline.models.synthnet import SynthNet

    tmp = tmp_path_factory.mktemp("bulk")
    (tmp / "pylib").mkdir()
    (tmp / "pylib" / "cnnvis_bulk_factory.py").write_text(FACTORY)
    (tmp / "ckpt").mkdir()
    # a stand-in for snapshots during training: the weights drift from one "epoch" to the next
    torch.manual_seed(0)
    model = SynthNet(width=4)
    for k in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        torch.save(model.state_dict(), tmp / "ckpt" / f"e{k}.pt")
    return tmp


def job_stats(log: str) -> dict[str, int]:
    """rule -> job count, from the 'Job stats:' table Snakemake prints before running."""
    m = re.search(r"Job stats:\n(.*?)\n\s*\n", log, re.S)
    assert m, f"no 'Job stats:' table in snakemake's output:\n{log[-3000:]}"
    counts = {}
    for line in m.group(1).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def expected_jobs(shards: int) -> dict[str, int]:
    n_models, n_layers = len(MODEL_LAYERS), sum(map(len, MODEL_LAYERS.values()))
    return {
        "synth_dataset": 1, "validate_dataset": 1, "prepare_dataset": 1,
        "extract_shard": n_models * shards, "layer_tables": n_layers, "summary": 1,
    }


def run_snakemake(workflow, tmp: Path, workdir: Path, cfg: dict, *extra: str) -> tuple[str, float]:
    t0 = time.monotonic()
    res = workflow.run(workdir, cfg, *extra, env=workflow.env(tmp / "pylib"),
                       timeout=RUN_TIMEOUT_S)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"snakemake failed ({res.returncode}):\n{log[-6000:]}"
    return log, time.monotonic() - t0


def test_bulk_dry_run_two_shards(bulk_dir, workflow):
    """The DAG with 2 shards: one prepare job, one extract job per shard per model."""
    log, _ = run_snakemake(workflow, bulk_dir, bulk_dir / "dry", bulk_config(workflow, bulk_dir, 2),
                           "summary", "-n")
    assert job_stats(log) == expected_jobs(2)


@pytest.mark.slow
def test_bulk_audit(bulk_dir, workflow):
    import torch

    from cnnvis_pipeline import __version__
    from cnnvis_pipeline.dissection.figures import plot_series, plot_summary
    from cnnvis_pipeline.models.registry import file_sha256
    from cnnvis_pipeline.tables import read_provenance

    work = bulk_dir / "run"
    log, elapsed = run_snakemake(workflow, bulk_dir, work, bulk_config(workflow, bulk_dir, 1),
                                 "summary")
    print(f"\nbulk audit: {sum(map(len, MODEL_LAYERS.values()))} model layers in {elapsed:.1f}s")
    assert job_stats(log) == expected_jobs(1)
    # every job ran exactly once (each job's "rule <name>:" header, counted from the log)
    ran = re.findall(r"^(?:local)?rule (\w+):", log, re.M)
    assert pd.Series(ran).value_counts().to_dict() == expected_jobs(1)

    results = work / "results"
    summary = pq.read_table(results / "summary" / "detectors.parquet").to_pandas()
    pairs = set(zip(summary["model"], summary["layer"], strict=True))
    assert pairs == {(m, layer) for m, layers in MODEL_LAYERS.items() for layer in layers}
    prov = read_provenance(results / "summary" / "detectors.parquet")
    assert prov["cnnvis_pipeline_version"] == __version__
    assert prov["torch_version"] == torch.__version__

    for m, layers in MODEL_LAYERS.items():
        for layer in layers:
            units = pq.read_table(results / m / layer / "units.parquet").to_pandas()
            assert set(units["model"]) == {m} and set(units["layer"]) == {layer}
            p = read_provenance(results / m / layer / "units.parquet")
            if m.startswith("snap-"):
                assert p["checkpoint_sha256"] == file_sha256(bulk_dir / "ckpt" / f"{m[5:]}.pt")
            else:
                assert p["checkpoint_sha256"] is None
    # the activations of shard 0 were temporary: gone after the run
    assert not any((results / m / "extract" / "0").exists() for m in MODEL_LAYERS)

    # the figures draw the summary table: drawn again from it here, they are the same bytes
    counts = pd.read_parquet(results / "summary" / "detectors.parquet")
    plot_summary(counts, work / "unique_detectors.png")
    plot_series(counts, "snap", [f"snap-e{k}" for k in (1, 2, 3)], work / "series_snap.png")
    for fig in ("unique_detectors.png", "series_snap.png"):
        data = (results / "summary" / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == (work / fig).read_bytes(), fig


def test_series_counts_and_plot(tmp_path):
    from cnnvis_pipeline.dissection.figures import plot_series
    from cnnvis_pipeline.dissection.results import series_counts

    rows = []
    for k, stem in enumerate(["e1", "e2", "e10"]):
        for layer in ("a", "b"):
            for cat, n in (("object", k), ("color", 2 * k + 1)):
                rows.append({"model": f"snap-{stem}", "layer": layer, "category": cat,
                             "units": 8, "detectors": n, "unique_detectors": n})
    rows.append({"model": "other", "layer": "a", "category": "object", "units": 8,
                 "detectors": 5, "unique_detectors": 5})
    counts = pd.DataFrame(rows)
    models = ["snap-e1", "snap-e2", "snap-e10"]  # checkpoint order, not name order
    data = series_counts(counts, "snap", models)
    assert "other" not in set(data["model"])
    got = data[(data["layer"] == "a") & (data["category"] == "object")]
    assert got["checkpoint"].tolist() == [0, 1, 2]
    assert got["checkpoint_name"].tolist() == ["e1", "e2", "e10"]
    assert got["unique_detectors"].tolist() == [0, 1, 2]
    out = tmp_path / "series_snap.png"
    plot_series(counts, "snap", models, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a model outside the series is not drawn: the same bytes without it
    plot_series(counts[counts["model"] != "other"], "snap", models, tmp_path / "alone.png")
    assert (tmp_path / "alone.png").read_bytes() == out.read_bytes()
    # the x axis follows the given checkpoint order (name order draws another figure)
    plot_series(counts, "snap", sorted(models), tmp_path / "by_name.png")
    assert (tmp_path / "by_name.png").read_bytes() != out.read_bytes()
