"""The edges of a run, through the real `snakemake` command line: what the user sees, the exit
status, that nothing is lost and that no traceback is printed.

- a YAML anchor bomb in the config, and two model names that differ only in case: refused by
  `snakemake -n` before anything walks the config;
- a read-only results directory, and a working directory on a full file system (a 300 KiB
  tmpfs; skipped where it cannot be mounted): one line naming the path and the cause, and none
  of the failed job's tables left looking complete;
- a second run in a working directory whose run is still going, the stale lock of a run killed
  with SIGKILL (then --unlock), a job killed by a signal, and a complete run afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cnnvis_pipeline.errors import CnnvisError, check_size

pytestmark = pytest.mark.slow

BOMB = """
models:
  tiny:
    arch: synthnet
    layers: [features.relu3]
    kwargs:
      a: &a [x, x, x, x, x, x, x, x, x, x]
      b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
      c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
      d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
      e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
      f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
      g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
      h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
      i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def screen(proc) -> str:
    return proc.stdout + proc.stderr


def test_anchor_bomb_and_case_colliding_names_are_refused(tmp_path, workflow):
    bomb = yaml.safe_load(BOMB)  # 10^9 leaves once expanded; a few hundred objects here
    t0 = time.perf_counter()
    with pytest.raises(CnnvisError, match="more than 100,000 values with its YAML aliases"):
        check_size(bomb)
    assert time.perf_counter() - t0 < 1.0

    work = tmp_path / "bomb"
    work.mkdir()
    (work / "cfg.yaml").write_text(BOMB)
    proc = subprocess.run(workflow.cmd(work, "-n"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert ("invalid configuration: config.models.tiny.kwargs.i[9][9][9][9]: the config holds "
            "more than 100,000 values with its YAML aliases expanded (a YAML anchor bomb?); "
            "refused before anything reads it") in screen(proc), screen(proc)[-3000:]
    assert "Traceback" not in screen(proc) and "MemoryError" not in screen(proc)

    cfg = workflow.config("tiny")
    cfg["models"] = {"Tiny": cfg["models"]["tiny"], "tiny": cfg["models"]["tiny"]}
    proc = workflow.run(tmp_path / "case", cfg, "-n", timeout=300)
    assert proc.returncode != 0
    assert ("invalid configuration: config: models: model names 'Tiny' and 'tiny' differ only in "
            "case; their results would collide on a case-insensitive file system: rename one"
            in screen(proc)), screen(proc)[-3000:]
    assert "Traceback" not in screen(proc)
    assert not (tmp_path / "case" / "results").exists()


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                         capture_output=True, text=True)
    if got.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({got.stderr.strip()})")


def test_read_only_results_and_a_full_disk(tmp_path, workflow):
    cfg = workflow.config("tiny")
    cfg["data_root"] = str(tmp_path / "data root")

    ro = tmp_path / "ro"
    if os.geteuid() == 0:  # root writes through permissions: a read-only mount instead
        _mount_tmpfs(ro / "results", "ro,size=1m")
        cause = ("read-only file system writing results: the file system is mounted read-only: "
                 "run in a writable --directory")
    else:
        (ro / "results").mkdir(parents=True)
        (ro / "results").chmod(0o555)
        cause = ("permission denied writing results: this user may not write there: run in a "
                 "writable --directory")
    try:
        proc = workflow.run(ro, cfg, timeout=600)
    finally:
        subprocess.run(["umount", str(ro / "results")], capture_output=True)
    assert proc.returncode != 0
    assert f"cannot write the run's files: {cause}" in screen(proc), screen(proc)[-3000:]
    assert "Traceback" not in screen(proc)
    assert not (tmp_path / "data root").exists()  # refused before any job

    full = tmp_path / "full"
    _mount_tmpfs(full, "size=300k")
    try:
        proc = workflow.run(full, cfg, timeout=900)
        layer = full / "results" / "tiny" / "features.relu3"
        left = sorted(p.name for p in layer.glob("*")) if layer.exists() else []
        logs = {p.name: p.read_text() for p in (full / "results" / "logs").rglob("*.log")}
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
    assert proc.returncode != 0
    assert re.search(r"results/logs/tiny/\S+\.log: error: no space left on device writing "
                     r"results/tiny/\S+ \(\d+ bytes free\): free space \(or run elsewhere\) and "
                     r"run again", screen(proc)), screen(proc)[-3000:]
    assert "Traceback" not in screen(proc)
    assert not any("Traceback" in text for text in logs.values()), logs
    assert left == [], left  # none of the layer's tables or figures looks complete
    # nothing of the shared data root was lost: its entries are complete
    root = tmp_path / "data root"
    (prepared,) = [p for p in (root / "prepared").iterdir() if not p.name.startswith(".")]
    assert json.loads((prepared / "meta.json").read_text())["n_images"] == 24
    assert "OK:" in next((root / "validated").glob("*.txt")).read_text()


NETS = '''
import os
import signal
import time

import torch
from torch import nn


class Net(nn.Module):
    """A small CNN that sleeps (a run that goes on) or kills itself with SIGKILL (a job the
    kernel's OOM killer ends) while the file `sleep` or `kill` is in the working directory
    (not on the meta device: the resource plan runs it there while the workflow is read)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.device.type == "meta":  # the workflow's resource plan, at parse time
            return self.relu(self.conv(x))
        if os.path.exists("sleep"):
            time.sleep(600)
        if os.path.exists("kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.relu(self.conv(x))


def build():
    return Net()
'''


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 600) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.5)


def test_locks_of_running_and_killed_runs_and_a_killed_job(tmp_path, workflow):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "edgenets.py").write_text(NETS)
    env = workflow.env(tmp_path / "nets")
    cfg = workflow.config("tiny")
    cfg["data_root"] = str(tmp_path / "data root")
    cfg["models"] = {"tiny": {"factory": "edgenets:build", "layers": ["relu"],
                              "mean": [0.5] * 3, "std": [0.25] * 3}}
    work = tmp_path / "w"
    workflow.write(work, cfg)

    def run(*args):
        return subprocess.run(workflow.cmd(work, *args), capture_output=True, text=True,
                              env=env, timeout=900)

    (work / "sleep").touch()
    first = subprocess.Popen(workflow.cmd(work), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=True)
    try:
        _wait_for(work / "results" / "logs" / "tiny" / "extract_0.log", first)
        second = run()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole run, as the OOM killer or scancel -9
        first.communicate()
    assert second.returncode != 0
    assert (f"cnnvis: {work}: another run is using this working directory (pid {first.pid} on "
            in second.stderr), screen(second)[-3000:]
    assert ("two runs in one working directory would write the same files; wait for it to "
            "finish, or give this run its own --directory" in second.stderr)
    assert "Traceback" not in screen(second)

    stale = run()
    assert stale.returncode != 0
    assert (f"cnnvis: {work}: the lock in .snakemake/locks was left by a run that was killed "
            f"(pid {first.pid}, started " in stale.stderr), screen(stale)[-3000:]
    assert "run the same command once with --unlock, then run it again" in stale.stderr
    assert "Traceback" not in screen(stale)

    assert run("--unlock").returncode == 0
    (work / "sleep").unlink()
    (work / "kill").touch()
    killed = run()
    assert killed.returncode != 0
    assert re.search(r"results/logs/tiny/\w+\.log: killed by signal 9 \(out of memory\?\)",
                     killed.stderr), screen(killed)[-3000:]
    assert "Traceback" not in screen(killed)

    (work / "kill").unlink()
    done = run()
    assert done.returncode == 0, screen(done)[-3000:]
    for name in ("iou.parquet", "units.parquet", "thresholds.parquet", "detectors.png"):
        assert (work / "results" / "tiny" / "relu" / name).stat().st_size > 0
    assert (work / "results" / "summary" / "index.html").is_file()
    assert not (work / ".snakemake" / "cnnvis_run.json").exists()
