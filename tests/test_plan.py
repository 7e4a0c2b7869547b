"""The resource plan (cnnvis_pipeline/plan.py): layer shapes without data, the memory estimate
against the measured peak of the real job commands, `cnnvis plan`, and the refusal at
`snakemake -n` of a job over the memory limit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from cnnvis_pipeline import plan
from cnnvis_pipeline.bench.memory import run_measured
from cnnvis_pipeline.config import model_specs
from cnnvis_pipeline.settings import job_spec


def _config(tmp_path, synth_dir, models, statistics=True, batch_size=16):
    cfg = {"seed": 0, "data_root": str(tmp_path / "root"), "dataset": {"path": str(synth_dir)},
           "models": models, "dissection": {"statistics": {"enabled": statistics}},
           "resources": {"shards": 1, "batch_size": batch_size, "device": "cpu"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_meta_shapes_equal_a_real_forward(tmp_path):
    import torch

    from cnnvis_pipeline.models.probe import check_layers
    from cnnvis_pipeline.models.registry import build_model

    spec = {"name": "s", "arch": "synthnet", "kwargs": {"width": 8},
            "layers": ["features.relu2", "features.relu4"]}
    shape = plan.model_shape(spec, (40, 40), tmp_path / "cache")
    model, _ = build_model("s", spec)
    real = check_layers(model, spec["layers"], torch.zeros(1, 3, 40, 40), model_name="s")
    assert shape.layers == {k: list(v) for k, v in real.items()}
    assert shape.params == sum(p.numel() for p in model.parameters())
    # cached: the second call reads the file written by the first
    (cached,) = (tmp_path / "cache").glob("shape-*.json")
    assert json.loads(cached.read_text())["layers"] == shape.layers
    assert plan.model_shape(spec, (40, 40), tmp_path / "cache") == shape


def test_dataset_size_from_the_index_and_the_config(tmp_path, synth_dir):
    cfg = plan.load_config(_config(tmp_path, synth_dir, {"m": {"arch": "synthnet",
                                                               "layers": ["features.relu3"]}}))
    ds = plan.dataset_size(cfg)
    assert (ds.images, ds.image_size, ds.seg_size) == (48, (32, 32), (16, 16))
    cfg = {"dataset": {"download": "broden1_224"}, "data_root": str(tmp_path / "none")}
    assert plan.dataset_size(cfg).images == 63305


CASES = {
    "synthnet": ({"m": {"arch": "synthnet", "kwargs": {"width": 8},
                        "layers": ["features.relu3", "features.relu4"]}}, True),
    "resnet18-statistics": ({"m": {"torchvision": "resnet18", "weights": None,
                                   "layers": ["layer4"]}}, True),
    "resnet18-layer3": ({"m": {"torchvision": "resnet18", "weights": None,
                               "layers": ["layer3"]}}, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_memory_within_1_5x_of_the_measured_peak(case, tmp_path, synth_dir, prepared_dir):
    models, statistics = CASES[case]
    cfg = plan.load_config(_config(tmp_path, synth_dir, models, statistics))
    specs = model_specs(cfg)
    jobs = {(j.rule, j.layer): j
            for j in plan.workflow_plan(cfg, specs, cache_dir=tmp_path / "cache")}
    spec = json.dumps(job_spec(dict(specs["m"], name="m"), cfg, ("dissection", "resources")))
    cnnvis = [sys.executable, "-m", "cnnvis_pipeline"]
    extract = tmp_path / "extract" / "0"
    measured = {("extract_shard", ""): run_measured(
        [*cnnvis, "extract", "--prepared", str(prepared_dir), "--spec", spec, "--shard", "0",
         "--shards", "1", "--out", str(extract), "--quiet"])}
    layer = models["m"]["layers"][-1]
    measured[("layer_tables", layer)] = run_measured(
        [*cnnvis, "tables", "--prepared", str(prepared_dir), "--spec", spec, "--layers", layer,
         "--extracts", str(extract), "--out-dir", str(tmp_path / "out"), "--quiet"])
    for key, m in measured.items():
        assert m["rc"] == 0, m["stderr_tail"]
        ratio = jobs[key].mem_mb / m["peak_rss_mb"]
        assert 1 / 1.5 <= ratio <= 1.5, (key, jobs[key].mem_mb, m["peak_rss_mb"], jobs[key].parts)


def test_cnnvis_plan_lists_every_job(tmp_path, synth_dir):
    path = _config(tmp_path, synth_dir, CASES["synthnet"][0])
    data = yaml.safe_load(path.read_text())
    data["resources"].update(shards=3, max_mem_mb=700)
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "cnnvis_pipeline", "plan", "--configfile",
                          str(path), "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True, check=True).stdout
    names = [ln.split()[0:3] for ln in out.splitlines()[2:] if not ln.startswith("over")]
    assert [n for n in names if n[0] == "extract_shard"] == [["extract_shard", "m", str(k)]
                                                             for k in range(3)]
    assert [n[2] for n in names if n[0] == "layer_tables"] == ["features.relu3",
                                                               "features.relu4"]
    # every job (preparation, 3 extractions, 2 tables, 2 views) needs more than 700 MB
    over = [ln for ln in out.splitlines() if ln.startswith("over the limit: ")]
    assert len(over) == 1 + 3 + 2 + 2 and all("resources.max_mem_mb 700 MB" in ln for ln in over)


def test_workflow_refuses_a_job_over_the_limit_at_dry_run(tmp_path, workflow, monkeypatch):
    config = workflow.config("tiny")
    config.setdefault("resources", {})["max_mem_mb"] = 500
    proc = workflow.run(tmp_path / "run", config, "-n")
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "jobs that would not fit in memory" in text
    assert "extract_shard tiny 0: needs about" in text and "resources.max_mem_mb 500 MB" in text
    assert "try a smaller resources.batch_size" in text
    # with room: the rules request the plan's memory
    config["resources"]["max_mem_mb"] = 4000
    proc = workflow.run(tmp_path / "run", config, "-n", "--resources", "mem_mb=600")
    assert proc.returncode != 0 and "--resources mem_mb 600 MB" in proc.stdout + proc.stderr
    proc = workflow.run(tmp_path / "run", config, "-n")
    assert proc.returncode == 0
    monkeypatch.chdir(tmp_path / "run")  # the plan as the workflow made it, in its directory
    cfg = plan.load_config("cfg.yaml")
    jobs = {j.rule: j for j in plan.workflow_plan(cfg, model_specs(cfg), cores=2)}
    for rule in ("extract_shard", "layer_tables"):
        block = proc.stdout.split(f"rule {rule}:", 1)[1].split("\n\n", 1)[0]
        assert f"mem_mb={jobs[rule].mem_mb}," in block and "disk_mb=" in block
