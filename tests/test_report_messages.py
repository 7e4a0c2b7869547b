"""Messages a user sees: every config problem at once, each naming its key; a job's `error:`
line on the screen even when the job's progress bar had drawn its line first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cnnvis_pipeline import config as cc
from cnnvis_pipeline.errors import CnnvisError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def tiny_config(**models) -> dict:
    """.test/config/tiny.yaml on the CPU in batches of 8, with other `models` if given."""
    cfg = yaml.safe_load((REPO / ".test" / "config" / "tiny.yaml").read_text())
    cfg["resources"].update(batch_size=8, device="cpu")
    if models:
        cfg["models"] = models
    return cfg


def three_problems() -> dict:
    cfg = tiny_config()
    cfg["resources"]["shards"] = "two"
    cfg["dissection"] = {"quantile": 1.5}
    cfg["views"] = {"top_unitz": 3}
    return cfg


def test_every_schema_problem_is_reported_each_with_its_key():
    with pytest.raises(CnnvisError) as e:
        cc.check_schema(cc.merge_with_default(three_problems(), {"data_root": "r"}), SCHEMA)
    lines = str(e.value).splitlines()
    assert lines[0] == "3 problems:", lines
    body = sorted(ln.strip() for ln in lines[1:])
    assert len(body) == 3, lines
    assert body[0].startswith("config: dissection.quantile: ")
    assert body[1].startswith("config: resources.shards: expected integer, got 'two'")
    assert body[2].startswith("config: views: unknown key(s) 'top_unitz'; allowed: ")
    assert "more problem" not in str(e.value)


def test_one_problem_is_one_line():
    cfg = tiny_config()
    cfg["resources"]["shards"] = "two"
    with pytest.raises(CnnvisError) as e:
        cc.check_schema(cfg, SCHEMA)
    assert str(e.value) == "config: resources.shards: expected integer, got 'two'"


def test_every_model_problem_is_reported_at_once():
    """After the schema, the models' own checks (names, layers, layouts, train, checkpoints)
    also list every problem of every model, not just the first."""
    models = {
        "a": {"torchvision": "resnet18", "layers": ["layer3", "layer3"]},
        "b": {"torchvision": "resnet18", "layers": ["layer4"], "layouts": {"layer9": "nhwc"},
              "train": {"epochs": 1}},
        "ok": {"torchvision": "resnet18", "layers": ["layer4"]},
        "c": {"arch": "synthnet", "layers": ["features.relu3"], "checkpoint": "x.pt",
              "checkpoints": ["y.pt"]},
    }
    with pytest.raises(CnnvisError) as e:
        cc.model_specs({"models": models})
    lines = str(e.value).splitlines()
    assert lines[0] == "4 problems:", lines
    assert [ln.strip() for ln in lines[1:]] == [
        "config: models.a.layers: a layer is listed twice",
        "config: models.b.layouts: 'layer9' not among the model's layers",
        "config: models.b.train: only the built-in arch synthnet can be trained",
        "config: models.c: give either checkpoint or checkpoints, not both",
    ]
    # one problem: one line, as before
    with pytest.raises(CnnvisError) as e:
        cc.model_specs({"models": {"ok": models["ok"], "a": models["a"]}})
    assert str(e.value) == "config: models.a.layers: a layer is listed twice"
    assert sorted(cc.model_specs({"models": {"ok": models["ok"]}})) == ["ok"]


def test_workflow_lists_every_config_problem(tmp_path, workflow):
    proc = workflow.run(tmp_path, three_problems(), "-n", timeout=600)
    assert proc.returncode != 0
    err = proc.stdout + proc.stderr
    assert "invalid configuration: 3 problems:" in err, err[-3000:]
    for key in ("config: dissection.quantile:", "config: resources.shards:",
                "config: views: unknown key(s) 'top_unitz'"):
        assert key in err, (key, err[-3000:])


def failed_job_errors():
    """The workflow's onerror helper (cnnvis_pipeline.joblogs), run outside Snakemake."""
    from cnnvis_pipeline.joblogs import failed_job_errors as found

    return found


@pytest.mark.parametrize("quiet", [True, False])
def test_an_error_written_after_a_progress_bar_is_found(tmp_path, quiet):
    """A job's log where tqdm drew `\r...img/s]` without a newline before the `error:` line, then
    redrew the bar on close; the Snakemake log with (or, `--quiet rules`, without) the job's
    `log:` line: the error line comes out, not the bar."""
    job = tmp_path / "results/logs/my model/extract_0.log"
    job.parent.mkdir(parents=True)
    bar = "\rextract tiny:   0%|          | 0/24 [00:00<?, ?img/s]"
    job.write_text(bar + "error: tiny: layer 'classifier' outputs (8, 9), not a 4-D feature map\n"
                   + bar + "\n")
    cmd = ("Command 'set -euo pipefail;  python -m cnnvis_pipeline extract --out x "
           "> 'results/logs/my model/extract_0.log' 2>&1' returned non-zero exit status 2.")
    main = tmp_path / "snakemake.log"
    block = "" if quiet else ("Error in rule extract_shard:\n    log: results/logs/my model/"
                              "extract_0.log (check log file(s) for error details)\n")
    main.write_text(f"RuleException:\nCalledProcessError in file dissect.smk:\n{cmd}\n{block}")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        lines = failed_job_errors()([str(main)])
    finally:
        os.chdir(cwd)
    assert lines == ["results/logs/my model/extract_0.log: error: tiny: layer 'classifier' "
                     "outputs (8, 9), not a 4-D feature map"]


@pytest.mark.slow
def test_a_jobs_error_reaches_the_screen(tmp_path, workflow):
    """A job's refusal (a text file given as `checkpoint:`: layer problems are refused at
    parse time, a checkpoint's content only by the job that loads it): its `error:` line is
    printed after the run, with and without `--quiet rules`."""
    ckpt = tmp_path / "notes.pt"
    ckpt.write_text("trained for 3 epochs\n")
    cfg = tiny_config(tiny={"arch": "synthnet", "kwargs": {"width": 4},
                            "layers": ["features.relu3"], "checkpoint": str(ckpt)})
    want = re.compile(r"results/logs/tiny/\w+\.log: error: " + re.escape(
        f"{ckpt}: not a readable PyTorch checkpoint: not a zip or pickle file"))
    for args in (("--quiet", "rules"), ()):
        proc = workflow.run(tmp_path, cfg, *args, timeout=600)
        assert proc.returncode != 0
        screen = proc.stdout + proc.stderr
        assert want.search(screen), (args, screen[-3000:])
        assert not re.search(r"\.log: \S+ tiny: +\d+%\|", screen)  # not a bar instead
