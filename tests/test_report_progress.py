"""Progress of long jobs: log lines with done/total, rate and ETA (cnnvis_pipeline.progress),
the once-a-minute status line on the console (CNNVIS_STATUS_FD), the rules that ask for it, and
training's epoch lines."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnvis_pipeline.progress import Progress, StatusHandler, duration

REPO = Path(__file__).resolve().parents[1]


def test_progress_lines_say_done_total_rate_and_eta(caplog):
    now = [100.0]
    with caplog.at_level(logging.INFO, logger="cnnvis_pipeline.progress"):
        with Progress("extract m", 1000, every=10, clock=lambda: now[0]) as p:
            for _ in range(10):
                now[0] += 3
                p.update(50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "extract m: 1000 images to do"
    # every 10 s: after 12 s (200 done), 24 s (400), then the last line
    assert lines[1] == "extract m: 200/1000 images (20%), 16.7 images/s, ETA 48 s"
    assert lines[2] == "extract m: 400/1000 images (40%), 16.7 images/s, ETA 36 s"
    assert lines[-1] == "extract m: 500/1000 images (50%), 16.7 images/s, ETA 30 s in 30 s"
    assert len(lines) == 4


@pytest.mark.parametrize("seconds,text", [(5, "5 s"), (185, "3 min 5 s"), (8040, "2 h 14 min")])
def test_durations(seconds, text):
    assert duration(seconds) == text


def test_the_console_gets_one_status_line_a_minute():
    now = [0.0]
    stream = io.StringIO()
    handler = StatusHandler(stream, "cnnvis extract", every=60, clock=lambda: now[0])
    log = logging.getLogger("test.status")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        for k in range(1, 14):  # a record every 10 s for 130 s
            now[0] = 10.0 * k
            log.info("extract m: %d/130 images", 10 * k)
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines] == [
        "cnnvis extract: extract m: 60/130 images", "cnnvis extract: extract m: 120/130 images"]


def test_a_job_writes_its_status_to_the_descriptor_it_is_given(tmp_path):
    """CNNVIS_STATUS_FD=3 and 3>&2: the status reaches the console while the log gets all."""
    code = ("import logging, sys; from cnnvis_pipeline import progress; "
            "progress.STATUS_EVERY = 0; "
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr); "
            "h = progress.status_handler('cnnvis test'); logging.getLogger().addHandler(h); "
            "logging.getLogger('x').info('halfway')")
    log = tmp_path / "job.log"
    proc = subprocess.run(
        ["bash", "-c", f"CNNVIS_STATUS_FD=3 {sys.executable} -c \"{code}\" 3>&2 > {log} 2>&1"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cnnvis test: halfway" in proc.stderr and "halfway" in log.read_text()
    assert "cnnvis test" not in log.read_text()


@pytest.mark.parametrize("rule,path", [("train_synthnet", "dissect.smk"),
                                       ("extract_shard", "dissect.smk"),
                                       ("layer_units", "dissect.smk"),
                                       ("layer_tables", "dissect.smk"),
                                       ("visualize_layer", "viz.smk")])
def test_the_long_rules_give_their_jobs_the_console(rule, path):
    text = (REPO / "workflow" / "rules" / path).read_text()
    body = text[text.index(f"rule {rule}:"):]
    shell = body[body.index("shell:"):].split("\n\n")[0]
    assert "CNNVIS_STATUS_FD=3 {params.cnnvis}" in shell and "3>&2 > {log:q} 2>&1" in shell


def test_training_logs_each_epoch_with_its_time(prepared_dir, caplog):
    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models.synthnet import train_synthnet

    with caplog.at_level(logging.INFO, logger="cnnvis_pipeline.models.synthnet"):
        train_synthnet(PreparedDataset(prepared_dir), epochs=2, width=4, progress=False,
                       mean=[0.5] * 3, std=[0.25] * 3)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("s, ETA" in ln for ln in lines) and lines[-1].endswith("ETA 0 s)")


def test_activation_maximisation_logs_its_steps(caplog):
    import contextlib

    import torch

    from cnnvis_pipeline.viz.activation_max import _ascend

    p = torch.zeros(3, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="cnnvis_pipeline.progress"):
        _ascend([p], lambda: p, lambda x: x.sum(), 0.1, range(5),
                lambda step: contextlib.nullcontext(), lambda x: x)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "activation maximisation: 5 steps to do"
    assert lines[-1].startswith("activation maximisation: 5/5 steps (100%)")
    assert float(p.detach()[0]) > 0  # the ascent itself still ran


def _progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cnnvis_pipeline.progress"]


def test_preparation_and_validation_log_their_progress(synth_dir, tmp_path, caplog, monkeypatch):
    from cnnvis_pipeline.data import validate
    from cnnvis_pipeline.data.prepared import prepare_dataset

    monkeypatch.setattr(validate, "PROGRESS_MIN_FILES", 1)
    with caplog.at_level(logging.INFO, logger="cnnvis_pipeline.progress"):
        prepare_dataset(synth_dir, tmp_path / "p", progress=True)
        validate.validation_report(synth_dir, progress=True)
    lines = _progress_lines(caplog)
    assert lines[0] == "prepare: 48 images to do"
    assert lines[1].startswith("prepare: 48/48 images (100%)")
    assert lines[2] == f"validate {synth_dir.name}: 48 rows to do"
    assert lines[3].startswith(f"validate {synth_dir.name}: 48/48 rows (100%)")


def test_the_formula_search_logs_its_units(caplog):
    import numpy as np

    from cnnvis_pipeline.dissection import compositional as cp

    class Searcher:  # what explain_units drives: one explain per unit mask
        stats: dict = {}

        def __init__(self, *a, **k):
            pass

        def explain(self, mask):
            return mask

    from cnnvis_pipeline.settings import Compositional

    masks = list(np.arange(3))
    with caplog.at_level(logging.INFO, logger="cnnvis_pipeline.progress"):
        orig, cp.Searcher = cp.Searcher, Searcher
        try:
            results, _ = cp.explain_units(None, masks, Compositional.parse({}), progress=True)
        finally:
            cp.Searcher = orig
    assert results == masks
    lines = _progress_lines(caplog)
    assert lines[0] == "formulas: 3 units to do" and lines[-1].startswith("formulas: 3/3 units")
