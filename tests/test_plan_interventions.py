"""The resource plan of the interventions (ablation_layer, adversarial_layer) and of a
segmenter's shards (segment_shard): the memory estimate against the measured peak of the
rules' commands, `cnnvis plan` listing them only when their sections are on, and the rules'
requests and refusals at `snakemake -n`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from cnnvis_pipeline import plan
from cnnvis_pipeline.bench.memory import run_measured
from cnnvis_pipeline.config import model_specs
from cnnvis_pipeline.dissection.pipeline import dissect
from cnnvis_pipeline.settings import Job, job_spec

LAYERS = ["features.relu3", "features.relu4"]
TINY = {"arch": "synthnet", "kwargs": {"width": 4, "num_classes": 9}, "seed": 1,
        "layers": LAYERS, "mean": [0.5] * 3, "std": [0.25] * 3, "train": {"epochs": 1}}
SECTIONS = {"ablation": {"limit": 4, "replicates": 20, "top_n": 2},
            "adversarial": {"images": 32, "steps": 2}}
CNNVIS = [sys.executable, "-m", "cnnvis_pipeline"]
SEGMENTER = {"factory": "torchvision.models.segmentation:lraspp_mobilenet_v3_large",
             "kwargs": {"weights": None, "weights_backbone": None, "num_classes": 4}}


def _config(tmp_path, dataset: dict, **sections) -> dict:
    cfg = {"seed": 4, "data_root": str(tmp_path / "root"), "dataset": dataset,
           "models": {"tiny": TINY},
           "dissection": {"quantile": 0.02, "statistics": {"enabled": False}},
           "resources": {"shards": 2, "batch_size": 16, "device": "cpu"}, **sections}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return plan.load_config(path)


@pytest.fixture(scope="module")
def dissected(prepared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dissected")
    spec = job_spec(dict(TINY, name="tiny"), {"seed": 4, "dissection": {
        "quantile": 0.02, "statistics": {"enabled": False}}, "resources": {"batch_size": 16}},
        ("dissection", "resources"))
    dissect(Job.from_spec(spec), prepared_dir, out, progress=False)
    return out


@pytest.fixture(scope="module")
def segmenter_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(
            root / "images" / f"{i:03d}.png")
    (root / "classes.csv").write_text("channel,name,category\n1,red,colour\n2,blue,colour\n")
    return {"images": str(root / "images"), "classes": str(root / "classes.csv"), **SEGMENTER}


def _within(job: plan.JobPlan, measured: dict) -> None:
    assert measured["rc"] == 0, measured["stderr_tail"]
    ratio = job.mem_mb / measured["peak_rss_mb"]
    assert 1 / 1.5 <= ratio <= 1.5, (job.name, job.mem_mb, measured["peak_rss_mb"], job.parts)


@pytest.mark.parametrize("section,command", [("ablation", "ablate"),
                                             ("adversarial", "attack")])
def test_intervention_memory_within_1_5x_of_the_measured_peak(section, command, tmp_path,
                                                              synth_dir, prepared_dir,
                                                              dissected):
    """The rule's command (its --spec as job_json makes it) as a child process."""
    import shutil

    cfg = _config(tmp_path, {"path": str(synth_dir)}, **{section: SECTIONS[section]})
    specs = model_specs(cfg)
    jobs = {(j.rule, j.layer): j
            for j in plan.workflow_plan(cfg, specs, cache_dir=tmp_path / "cache")}
    spec = json.dumps(job_spec(dict(specs["tiny"], name="tiny"), cfg,
                               (section, "resources", "dissection")))
    layer_dir = tmp_path / LAYERS[1]
    shutil.copytree(dissected / LAYERS[1], layer_dir)
    measured = run_measured([*CNNVIS, command, "--prepared", str(prepared_dir), "--spec", spec,
                             "--layer", LAYERS[1], "--layer-dir", str(layer_dir),
                             "--threads", "1"])
    _within(jobs[(f"{section}_layer", LAYERS[1])], measured)


def test_segment_memory_within_1_5x_of_the_measured_peak(tmp_path, segmenter_images):
    cfg = _config(tmp_path, {"segmenter": segmenter_images, "size": 224})
    jobs = [j for j in plan.workflow_plan(cfg, model_specs(cfg), cache_dir=tmp_path / "cache")
            if j.rule == "segment_shard"]
    assert [j.part for j in jobs] == ["0", "1"]
    measured = run_measured([*CNNVIS, "segment", "--dataset", json.dumps(cfg["dataset"]),
                             "--shard", "0", "--shards", "2", "--device", "cpu",
                             "--batch-size", "16", "--out", str(tmp_path / "seg0")])
    _within(jobs[0], measured)


def _plan_lines(tmp_path, cfg: dict) -> list[list[str]]:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([*CNNVIS, "plan", "--configfile", str(path), "--cache",
                          str(tmp_path / "cache")], capture_output=True, text=True, check=True)
    return [ln.split()[:3] for ln in out.stdout.splitlines()[2:]]


def test_cnnvis_plan_lists_the_jobs_of_the_sections_that_are_on(tmp_path, synth_dir,
                                                                segmenter_images):
    base = {"seed": 4, "data_root": str(tmp_path / "root"), "dataset": {"path": str(synth_dir)},
        "models": {"tiny": TINY}, "resources": {"shards": 2}}
    off = _plan_lines(tmp_path, base)
    assert not [n for n in off if n[0] in ("ablation_layer", "adversarial_layer",
                                           "segment_shard")]
    on = _plan_lines(tmp_path, dict(base, **SECTIONS))
    for rule in ("ablation_layer", "adversarial_layer"):
        assert [n for n in on if n[0] == rule] == [[rule, "tiny", x] for x in LAYERS]
    # the ablation of a model without classification data (no `train:`) is not planned
    untrained = {k: v for k, v in TINY.items() if k != "train"}
    only_attack = _plan_lines(tmp_path, dict(base, models={"tiny": untrained}, **SECTIONS))
    assert not [n for n in only_attack if n[0] == "ablation_layer"]
    assert len([n for n in only_attack if n[0] == "adversarial_layer"]) == 2
    seg = _plan_lines(tmp_path, dict(base, dataset={"segmenter": segmenter_images}))
    assert [n[:2] for n in seg if n[0] == "segment_shard"] == [["segment_shard", "0"],
                                                               ["segment_shard", "1"]]


def test_ablation_memory_follows_the_rows_of_a_pass_and_the_classes():
    """ResNet-18 layer4 at 224 px (shapes as the meta device gives them): a pass holds the rows
    the command's scheduling gives (ablation.pass_shape: the groups repeated at the layer); a
    table of many classes outweighs the passes."""
    from cnnvis_pipeline import plan_interventions as pi
    from cnnvis_pipeline.interventions.ablation import pass_shape
    from cnnvis_pipeline.plandata import DatasetSize, ModelShape
    from cnnvis_pipeline.settings import Ablation

    shape = ModelShape(11_689_512, 3.64, 802_816, {"layer4": [512, 7, 7]})
    ds = DatasetSize(1000, (224, 224), (112, 112), 6, 20, "test")  # 20 classes
    a = Ablation.parse({"limit": 5, "top_n": 3})
    groups = 512 + 5  # every unit, and a quarter of the 20 concepts' detector groups
    for batch in (64, 128):
        job = pi.ablation_job("m", "layer4", shape, ds, a, {"name": "m", "train": {}}, batch, 1)
        assert set(job.parts) == {"imports", "model", "passes"}
        images, per_pass = pass_shape(groups + 1, batch, a.groups_per_pass, True)
        rows = (plan.FORWARD_OUTPUTS * images * 802_816
                + pi.ABLATION_ROW_OUTPUTS * images * per_pass * 512 * 7 * 7) * 4 / plan.MB
        assert job.parts["passes"] == pytest.approx(rows)
    many = pi.ablation_job("m", "layer4", shape, DatasetSize(100_000, (224, 224), (112, 112),
                                                             6, 20_000, "test"),
                           a, {"name": "m", "train": {}}, 64, 1)
    assert set(many.parts) == {"imports", "model", "table"} and many.mem_mb > job.mem_mb


def test_a_dry_run_requests_the_plans_memory_and_refuses_over_the_limit(tmp_path, workflow,
                                                                        monkeypatch):
    config = workflow.config("tiny")
    config["models"]["tiny"]["train"] = {"epochs": 1}
    config.update(SECTIONS)
    proc = workflow.run(tmp_path / "run", config, "-n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.chdir(tmp_path / "run")
    cfg = plan.load_config("cfg.yaml")
    jobs = {(j.rule, j.layer): j for j in plan.workflow_plan(cfg, model_specs(cfg), cores=2)}
    blocks = proc.stdout.split("\nrule ")
    layers = config["models"]["tiny"]["layers"]
    for rule, table in (("ablation_layer", "ablation"), ("adversarial_layer", "adversarial")):
        found = {x: b for b in blocks if b.startswith(f"{rule}:") for x in layers
                 if f"results/tiny/{x}/{table}.parquet" in b}
        assert sorted(found) == sorted(layers)
        for layer, block in found.items():
            assert f"mem_mb={jobs[(rule, layer)].mem_mb}," in block, block
    (lowest, layer) = min((jobs[("ablation_layer", x)].mem_mb, x) for x in layers)
    config["resources"]["max_mem_mb"] = lowest - 1
    proc = workflow.run(tmp_path / "run", config, "-n")
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "jobs that would not fit in memory" in text
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"ablation_layer tiny {layer}:")]
    assert f"needs about {lowest} MB, more than resources.max_mem_mb {lowest - 1} MB" in line
    assert "ablation.groups_per_pass" in line
    attacks = [ln for ln in text.splitlines() if ln.startswith("adversarial_layer tiny ")]
    assert len(attacks) == len(layers) and all("the attack's gradients" in ln for ln in attacks)


def test_a_dry_run_requests_the_segment_shards_memory(tmp_path, workflow, segmenter_images,
                                                      monkeypatch):
    config = workflow.config("tiny")
    config["dataset"] = {"segmenter": segmenter_images, "size": 224}
    config["resources"]["shards"] = 2
    target = "results/digests/prepared.json"
    proc = workflow.run(tmp_path / "run", config, "-n", target)
    assert proc.returncode == 0, proc.stderr[-2000:]
    monkeypatch.chdir(tmp_path / "run")
    cfg = plan.load_config("cfg.yaml")
    jobs = {j.part: j for j in plan.workflow_plan(cfg, model_specs(cfg))
            if j.rule == "segment_shard"}
    blocks = [b for b in proc.stdout.split("\nrule ") if b.startswith("segment_shard:")]
    assert len(blocks) == 2
    for block in blocks:
        shard = block.split("results/segment/")[1][0]
        assert f"mem_mb={jobs[shard].mem_mb}," in block and "disk_mb=" in block
    config["resources"]["max_mem_mb"] = jobs["0"].mem_mb - 1
    proc = workflow.run(tmp_path / "run", config, "-n", target)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    (line,) = [ln for ln in text.splitlines() if ln.startswith("segment_shard 0:")]
    assert f"needs about {jobs['0'].mem_mb} MB" in line and "the segmenter's forward pass" in line


def test_ablation_data_counts_the_class_folders_or_the_class_index(tmp_path):
    from cnnvis_pipeline.plan_interventions import ablation_data
    from cnnvis_pipeline.plandata import DatasetSize
    from cnnvis_pipeline.settings import Ablation

    ds = DatasetSize(100, (32, 32), (16, 16), 5, 60, "test")
    (tmp_path / "index.json").write_text(json.dumps({f"n{k}": k for k in range(7)}))
    entry = {"images": str(tmp_path / "folders"), "classes": str(tmp_path / "index.json")}
    a = Ablation.parse({"limit": 3, "models": {"m": entry}})
    assert ablation_data(a, {"name": "m"}, ds) == (7, 21)  # no folders yet: the index's keys
    for k in range(4):
        (tmp_path / "folders" / f"n{k}").mkdir(parents=True)
    assert ablation_data(a, {"name": "m"}, ds) == (4, 12)  # the folders there
    own = Ablation.parse({"limit": 3})  # a train: model's own labels: at most every image
    assert ablation_data(own, {"name": "m", "train": {}}, ds) == (60, 100)
