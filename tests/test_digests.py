"""Content, not mtimes, decides what is current; shared entries are made under a lock each.

Unit cases: the dataset digest follows every edit in place (also with the mtime set back),
replacements with an older mtime (cp -p), and not a touch or a copy elsewhere; only changed files
are read again. A checkpoint's sha256 and a factory module's source the same way, without
importing the module. Locks: a run killed while holding an entry's lock never blocks the next
one; a run waiting on a live holder then finds the entry complete (success); an entry complete
for other content is an error and is not deleted.

Workflow case (slow): after a run, `touch` of the dataset and checkpoint reruns nothing; a
checkpoint replaced by one with an older mtime reruns exactly that model's jobs and its tables
carry the new checkpoint_sha256; an edited factory module reruns that model only; an edited
index.csv (mtime set back) reruns validation, preparation and both models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cnnvis_pipeline.data import entries
from cnnvis_pipeline.data.digests import model_content
from cnnvis_pipeline.data.manifest import dataset_digest, file_sha256, module_source_files
from cnnvis_pipeline.errors import CnnvisError

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def set_mtime_back(path: Path, seconds: float = 86400.0) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


# -- dataset digest -----------------------------------------------------------------------------
def test_dataset_digest_follows_content_not_mtimes(synth_dir, tmp_path):
    ds = Path(shutil.copytree(synth_dir, tmp_path / "ds"))
    cache = tmp_path / "manifest.json"
    d0 = dataset_digest(ds, cache=cache)
    assert d0["hashed"] == d0["files"] > 100
    again = dataset_digest(ds, cache=cache)
    assert again["digest"] == d0["digest"] and again["hashed"] == 0  # only stat() calls

    png = sorted((ds / "images" / "synth").glob("*_color.png"))
    os.utime(png[0])  # touch: newer mtime, same content
    touched = dataset_digest(ds, cache=cache)
    assert touched["digest"] == d0["digest"] and touched["hashed"] == 1

    shutil.copy2(png[1], png[0])  # cp -p: another file's (older) mtime, other content
    replaced = dataset_digest(ds, cache=cache)
    assert replaced["digest"] != d0["digest"] and replaced["hashed"] == 1

    index = ds / "index.csv"
    st = index.stat()
    index.write_text(index.read_text().replace(",train,", ",val,", 1))  # edit in place ...
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and set the mtime back
    assert index.stat().st_mtime_ns == st.st_mtime_ns
    edited = dataset_digest(ds, cache=cache)
    assert edited["digest"] not in (d0["digest"], replaced["digest"]) and edited["hashed"] == 1

    copy = Path(shutil.copytree(ds, tmp_path / "elsewhere"))  # a copy: the same content
    (copy / ".complete").write_text("{}")  # the completion marker is not content
    assert dataset_digest(copy)["digest"] == edited["digest"]
    (copy / "images" / "extra.txt").write_text("x")  # a new file is
    assert dataset_digest(copy)["digest"] != edited["digest"]


def test_checkpoint_and_factory_source_digests(tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    (lib / "dg_pkg").mkdir(parents=True)
    marker = tmp_path / "imported"
    (lib / "dg_pkg" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (lib / "dg_pkg" / "nets.py").write_text("def build():\n    return None\n")
    monkeypatch.syspath_prepend(str(lib))
    files = module_source_files("dg_pkg.nets")
    assert files == [lib / "dg_pkg" / "__init__.py", lib / "dg_pkg" / "nets.py"]
    assert not marker.exists()  # found, not imported: nothing ran
    assert module_source_files("dg_no_such_pkg.nets") is None

    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save({"w": torch.zeros(2)}, new)
    time.sleep(0.01)
    torch.save({"w": torch.ones(2)}, old)
    set_mtime_back(new)  # `new` looks older than `old`
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy2(old, ckpt)
    spec = {"factory": "dg_pkg.nets:build", "checkpoint": str(ckpt)}
    cache = tmp_path / "files.json"
    first = model_content("m", spec, cache=cache)
    assert first["checkpoint_sha256"] == file_sha256(old)
    assert set(first["factory_source"]) == {str(f) for f in files}
    shutil.copy2(new, ckpt)  # cp -p of a file with an older mtime
    assert ckpt.stat().st_mtime < old.stat().st_mtime
    second = model_content("m", spec, cache=cache)
    assert second["checkpoint_sha256"] == file_sha256(new) != first["checkpoint_sha256"]
    (lib / "dg_pkg" / "nets.py").write_text("def build():\n    return 1\n")
    third = model_content("m", spec, cache=cache)
    assert third["factory_source"] != second["factory_source"]
    assert third["checkpoint_sha256"] == second["checkpoint_sha256"]
    with pytest.raises(CnnvisError, match=r"config: models.m: checkpoint file \S+gone.pt does"):
        model_content("m", dict(spec, checkpoint=str(tmp_path / "gone.pt")))


# -- locks and shared entries -------------------------------------------------------------------
HOLDER = """
import sys, time
from cnnvis_pipeline.data.entries import entry_lock
with entry_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold(entry: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_killed_lock_holder_never_blocks(synth_dir, tmp_path):
    out = tmp_path / "prepared" / "p"
    holder = hold(out, 600)
    os.kill(holder.pid, signal.SIGKILL)  # killed while holding the lock
    holder.wait()
    (out.parent / f".{out.name}.tmp-999999").mkdir()  # and a leftover of a killed prepare
    digest = dataset_digest(synth_dir)["digest"]
    t0 = time.monotonic()
    entries.ensure_prepared(synth_dir, out, digest=digest)
    assert time.monotonic() - t0 < 120
    assert json.loads((out / "meta.json").read_text())["digest"] == digest
    assert not (out.parent / f".{out.name}.tmp-999999").exists()


def test_waiting_run_finds_the_entry_complete(tmp_path, caplog):
    out = tmp_path / "datasets" / "s"
    holder = hold(out, 3)  # another run is "generating" it
    # ... and finishes: here, the entry appears while the lock is held
    entries.ensure_synth(tmp_path / "made", images=4, size=16, seed=0)
    shutil.copytree(tmp_path / "made", out)
    made = (tmp_path / "made" / "index.csv").read_bytes()
    with caplog.at_level("INFO"):
        got = entries.ensure_synth(out, images=4, size=16, seed=0)  # waits, then success
    holder.wait()
    assert got == out and "waiting for it" in caplog.text and "already complete" in caplog.text
    with pytest.raises(CnnvisError, match="holds another dataset"):
        entries.ensure_synth(out, images=4, size=16, seed=1)
    assert (out / "index.csv").read_bytes() == made  # refused, neither deleted nor rewritten


def test_complete_entry_is_success_and_other_content_is_refused(synth_dir, tmp_path):
    digest = dataset_digest(synth_dir)["digest"]
    out = entries.ensure_prepared(synth_dir, tmp_path / "p", digest=digest)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert entries.ensure_prepared(synth_dir, out, digest=digest) == out  # success, untouched
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(CnnvisError, match="holds the prepared arrays of other content"):
        entries.ensure_prepared(synth_dir, out, digest="0" * 64)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


# -- through the workflow -----------------------------------------------------------------------
FACTORY = """
import torch
from torch import nn


def build(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
"""


def snakemake(workdir: Path, env: dict, *extra: str) -> str:
    cmd = [str(SNAKEMAKE), "results/summary/detectors.parquet", *extra, "-s",
           str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2",
           "--configfile", str(workdir / "cfg.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    return out


def planned(workdir: Path, env: dict) -> dict[str, int]:
    """rule -> jobs a dry run would run now."""
    out = snakemake(workdir, env, "--dry-run")
    jobs: dict[str, int] = {}
    for rule in re.findall(r"^(?:local)?rule (\w+):", out, re.M):
        jobs[rule] = jobs.get(rule, 0) + 1
    return jobs


@pytest.mark.slow
def test_content_changes_rerun_exactly_what_depends_on_them(synth_dir, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "dg_nets.py").write_text(FACTORY)
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.pathsep.join(
        filter(None, [str(lib), os.environ.get("PYTHONPATH")])))
    sys.path.insert(0, str(lib))
    try:
        import dg_nets  # noqa: PLC0415
    finally:
        sys.path.remove(str(lib))
    ckpt, other = tmp_path / "ckpt.pt", tmp_path / "other.pt"
    torch.save(dg_nets.build().state_dict(), other)
    torch.manual_seed(1)
    net = dg_nets.build()
    torch.nn.init.normal_(net[0].weight)
    torch.save(net.state_dict(), ckpt)
    set_mtime_back(other)
    ds = Path(shutil.copytree(synth_dir, tmp_path / "ds"))
    work = tmp_path / "w"
    work.mkdir()
    (work / "cfg.yaml").write_text(yaml.safe_dump({
        "data_root": str(tmp_path / "root"),
        "dataset": {"path": str(ds)},
        "models": {
            "fac": {"factory": "dg_nets:build", "checkpoint": str(ckpt), "layers": ["1"]},
            "plain": {"arch": "synthnet", "kwargs": {"width": 4}, "layers": ["features.relu4"]},
        },
        "resources": {"shards": 1, "batch_size": 16, "device": "cpu"},
    }))
    snakemake(work, env)
    units = work / "results/fac/1/units.parquet"
    prov = json.loads(pq.read_schema(units).metadata[b"cnnvis.provenance"])
    assert prov["checkpoint_sha256"] == file_sha256(ckpt)

    # touch (newer mtimes, same content): nothing to do
    for p in [ckpt, ds / "index.csv", *list((ds / "images" / "synth").glob("*.png"))[:3]]:
        os.utime(p)
    assert planned(work, env) == {}

    # the checkpoint replaced by a file with an older mtime (cp -p): that model only
    shutil.copy2(other, ckpt)
    assert ckpt.stat().st_mtime < units.stat().st_mtime
    jobs = planned(work, env)
    assert jobs.get("extract_shard") == 1 and "validate_dataset" not in jobs, jobs
    assert set(jobs) == {"extract_shard", "layer_tables", "summary"}, jobs
    snakemake(work, env)
    prov = json.loads(pq.read_schema(units).metadata[b"cnnvis.provenance"])
    assert prov["checkpoint_sha256"] == file_sha256(other)
    assert planned(work, env) == {}

    # the factory module's source edited: that model only
    (lib / "dg_nets.py").write_text(FACTORY + "\n# tuned\n")
    jobs = planned(work, env)
    assert jobs.get("extract_shard") == 1 and "prepare_dataset" not in jobs, jobs

    # index.csv edited in place with its mtime set back: validation, preparation, both models
    index = ds / "index.csv"
    st = index.stat()
    index.write_text(index.read_text().replace(",train,", ",val,", 1))
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns))
    jobs = planned(work, env)
    assert jobs.get("validate_dataset") == 1 and jobs.get("prepare_dataset") == 1, jobs
    assert jobs.get("extract_shard") == 2, jobs
