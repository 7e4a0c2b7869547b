"""Reproducibility of the workflow's tables.

  * two clean runs of one config, in two different directories
    (`snakemake -s <repo>/Snakefile --directory <dir>`), give byte-identical Parquet tables: all
    of them, every model, layer and the summary; the trained checkpoint is byte-identical too;
  * every table carries provenance metadata (package, torch and torchvision versions, config and
    dataset digests, checkpoint sha256 = sha256 of the checkpoint file) and no timestamp;
  * a run killed with SIGKILL (the whole process group, snakemake and its jobs) in the middle of
    extraction finishes after `snakemake --unlock` with `--rerun-incomplete` and ends with the
    same tables as the clean runs, and leaves no partial extract directory behind.

The config: broden-synth 24 images at 32 px, 2 shards; synthnet (width 4) trained 1 epoch, and a
user factory model (on PYTHONPATH) that sleeps in forward() so that extraction lasts long enough
to be killed half-way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

RUN_TIMEOUT_S = 900

SLOW_FACTORY = '''
import time
from collections import OrderedDict

from torch import nn


class SlowNet(nn.Module):
    """A small CNN whose forward() sleeps: extraction of a shard takes a few seconds."""

    def __init__(self, width=4, delay=0.5):
        super().__init__()
        self.delay = delay
        self.features = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, width, 3, padding=1), relu1=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            conv2=nn.Conv2d(width, 2 * width, 3, padding=1), relu2=nn.ReLU(),
        ))

    def forward(self, x):
        time.sleep(self.delay)
        return self.features(x)
'''

MODEL_LAYERS = {"synthnet": ["features.relu4"], "slow": ["features.relu2"]}
PROVENANCE_KEYS = {"cnnvis_pipeline_version", "torch_version", "torchvision_version",
                   "config_digest", "dataset_digest", "checkpoint_sha256"}
TIMESTAMP = re.compile(rb"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}|\d{2}:\d{2}:\d{2}")


@pytest.fixture(scope="module")
def env(tmp_path_factory, workflow) -> dict:
    lib = tmp_path_factory.mktemp("pylib")
    (lib / "cnnvis_slow_factory.py").write_text(SLOW_FACTORY)
    return workflow.env(lib)


@pytest.fixture(scope="module")
def prepare(workflow):
    def prepare(workdir: Path) -> Path:
        workdir.mkdir(parents=True)
        return workflow.write(workdir, workflow.config("reproducible"))
    return prepare


@pytest.fixture(scope="module")
def run(workflow):
    def run(workdir: Path, env: dict, *extra: str) -> float:
        t0 = time.monotonic()
        res = subprocess.run(workflow.cmd(workdir, *extra), env=env, capture_output=True,
                             text=True, timeout=RUN_TIMEOUT_S, check=False)
        log = res.stdout + res.stderr
        assert res.returncode == 0, f"snakemake {' '.join(extra)} failed:\n{log[-6000:]}"
        return time.monotonic() - t0
    return run


def tables(workdir: Path) -> dict[str, bytes]:
    """Every Parquet file the run wrote (relative path -> bytes)."""
    return {str(p.relative_to(workdir)): p.read_bytes()
            for p in sorted(workdir.glob("results/**/*.parquet"))}


def expected_tables() -> set[str]:
    """The tables every run must write (the workflow may write more: all are compared)."""
    out = {"results/summary/detectors.parquet"}
    for m, layers in MODEL_LAYERS.items():
        for layer in layers:
            out |= {f"results/{m}/{layer}/{t}.parquet" for t in
                    ("thresholds", "iou", "units", "top_images", "activation_max", "inversion")}
    return out


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory, env, prepare, run):
    base = tmp_path_factory.mktemp("repro")
    times = {}
    for name in ("one", "two"):
        times[name] = run(prepare(base / name), env)
    print(f"\nclean runs: {times['one']:.1f}s, {times['two']:.1f}s")
    return base / "one", base / "two"


@pytest.mark.slow
def test_two_clean_runs_are_byte_identical(clean_runs):
    one, two = clean_runs
    a, b = tables(one), tables(two)
    assert expected_tables() <= set(a)
    assert set(b) == set(a)
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"tables differ between two clean runs: {differ}"
    ckpt = "results/synthnet/checkpoint.pt"
    assert (one / ckpt).read_bytes() == (two / ckpt).read_bytes(), "training is not reproducible"


@pytest.mark.slow
def test_tables_carry_provenance_and_no_timestamps(clean_runs):
    import torch
    import torchvision

    from cnnvis_pipeline import __version__
    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models.registry import file_sha256
    from cnnvis_pipeline.tables import read_provenance

    one, _ = clean_runs
    sha = {"synthnet": file_sha256(one / "results/synthnet/checkpoint.pt"), "slow": None}
    # the dataset every table names is the prepared one the run used (its receipt names it,
    # relative to the run's directory)
    receipt = json.loads((one / "results/digests/prepared.json").read_text())
    prepared = PreparedDataset(one / receipt["prepared"]).digest
    digests = set()
    unit_configs = {}
    for rel in sorted(tables(one)):
        path = one / rel
        prov = read_provenance(path)
        assert PROVENANCE_KEYS <= prov.keys(), (rel, sorted(prov))
        assert prov["cnnvis_pipeline_version"] == __version__
        assert prov["torch_version"] == torch.__version__
        assert prov["torchvision_version"] == torchvision.__version__
        assert re.fullmatch(r"[0-9a-f]{64}", prov["config_digest"]), rel
        meta = pq.read_schema(path).metadata
        assert meta[b"cnnvis.table"] == path.stem.encode()
        # neither the key-value metadata nor the file as a whole holds a date or a time of day
        for k, v in meta.items():
            assert not re.search(rb"time|date", k, re.I), (rel, k)
            assert not TIMESTAMP.search(v), (rel, k, v[:200])
        assert not TIMESTAMP.search(path.read_bytes()), rel
        if rel.startswith("results/summary/"):
            continue
        model = rel.split("/")[1]
        assert prov["model"] == model
        assert prov["checkpoint_sha256"] == sha[model], rel
        digests.add(prov["dataset_digest"])
        if path.name == "units.parquet":
            unit_configs[model] = prov["config_digest"]
    assert digests == {prepared}, "all tables of a run come from the prepared dataset"
    # the config digest follows the model's settings: the two models' tables differ
    assert len(unit_configs) == 2 and unit_configs["synthnet"] != unit_configs["slow"]


def _extract_in_progress(workdir: Path, model: str) -> Path | None:
    """A shard's temporary extract directory that already holds activations, if any."""
    for tmp in (workdir / "results" / model / "extract").glob(".*.tmp-*"):
        if any(tmp.glob("acts_*.npy")):
            return tmp
    return None


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_tables(clean_runs, tmp_path, env, prepare, run,
                                               workflow):
    one, _ = clean_runs
    work = prepare(tmp_path / "killed")
    log = open(work / "killed.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(workflow.cmd(work), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: snakemake + jobs
    deadline = time.monotonic() + RUN_TIMEOUT_S
    caught = None
    try:
        while caught is None and proc.poll() is None and time.monotonic() < deadline:
            caught = _extract_in_progress(work, "slow")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert caught is not None, (
        "the run ended before extraction of model `slow` was seen in progress:\n"
        + (work / "killed.log").read_text()[-3000:]
    )
    assert proc.returncode == -signal.SIGKILL
    shard = caught.name.split(".tmp-")[0].lstrip(".")
    assert not (work / "results" / "slow" / "extract" / shard).exists(), "shard was complete"
    time.sleep(1)  # let the killed group's processes be reaped before the next run

    # the SIGKILLed snakemake left its lock: unlock, then finish what is incomplete
    t0 = time.monotonic()
    run(work, env, "--unlock")
    run(work, env, "--rerun-incomplete")
    print(f"\nresumed after SIGKILL in {time.monotonic() - t0:.1f}s (killed during {caught.name})")

    a, k = tables(one), tables(work)
    assert set(k) == set(a)
    differ = [p for p in a if a[p] != k[p]]
    assert not differ, f"tables differ from a clean run after resuming: {differ}"
    # nothing partial is left of the killed extraction (the extract dirs are temporary)
    leftovers = sorted(str(p.relative_to(work)) for p in (work / "results").glob("*/extract/*"))
    assert not leftovers, leftovers
    info = json.dumps(sorted(str(p) for p in (work / "results").rglob(".*tmp*")))
    assert info == "[]", f"temporary files left behind: {info}"
