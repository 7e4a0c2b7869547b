"""The resource plan's unit parts (plan.layer_jobs): a layer too large for the memory limit is
split into the fewest parts that fit, one job when it fits; what cannot fit even with one unit
per part is refused naming what to change; the zoo's largest layer at Broden's scale; the
measured peak of a part's job against its estimate; the workflow in parts (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from cnnvis_pipeline import plan
from cnnvis_pipeline.bench.memory import run_measured
from cnnvis_pipeline.config import model_specs
from cnnvis_pipeline.plandata import KNOWN_DATASETS, DatasetSize
from cnnvis_pipeline.settings import job_spec

STATS = {"enabled": True, "replicates": 200, "partners": 1, "top": 5}
BRODEN = DatasetSize(*KNOWN_DATASETS["broden1_224"][:1], (224, 224), (112, 112),
                     *KNOWN_DATASETS["broden1_224"][3:], "test")
SHAPE = plan.ModelShape(25_000_000, 4.1, 800_000, {"layer4": [2048, 7, 7]})


def _jobs(limit, unit_parts="auto", stats=STATS):
    return plan.layer_jobs("m", "layer4", SHAPE, BRODEN, 64, stats, 1, 2, unit_parts, limit)


def test_one_job_without_a_limit_or_when_it_fits():
    (whole,) = _jobs(None)
    assert (whole.rule, whole.unit_parts) == ("layer_tables", 1)
    assert _jobs(whole.mem_mb) == [whole]  # just fits: still one job
    assert whole.mem_mb > 8000  # (the next test's limit splits it)


@pytest.mark.parametrize("limit", [8000, 4000, 2000])
def test_the_fewest_parts_that_fit_the_limit(limit):
    jobs = _jobs(limit)
    parts = [j for j in jobs if j.rule == "layer_units"]
    (merge,) = [j for j in jobs if j.rule == "layer_tables"]
    k = len(parts)
    assert k > 1 and merge.unit_parts == k
    assert [j.part for j in parts] == [str(i) for i in range(k)]
    assert all(j.mem_mb <= limit for j in jobs)
    # the parts cover the units, and k - 1 parts would not fit: the largest has 2048 // (k-1)
    assert plan.tables_job("m", "layer4", SHAPE, BRODEN, 64, STATS, 1, 2, -(-2048 // (k - 1)),
                           "0").mem_mb > limit
    assert "tables" in merge.parts and "tables" not in parts[0].parts  # the merge writes them


def test_a_part_the_plan_does_not_have_gets_an_upper_bound():
    jobs = {(j.rule, j.model, j.layer, j.part): j for j in _jobs(None, 3)}
    largest = max(j.mem_mb for j in jobs.values() if j.rule == "layer_units")
    assert plan.find_job(jobs, "layer_units", "m", "layer4", "7").mem_mb == largest
    assert plan.find_job(jobs, "layer_units", "m", "layer4", "1") is jobs[
        ("layer_units", "m", "layer4", "1")]
    whole = {(j.rule, j.model, j.layer, j.part): j for j in _jobs(None, 1)}
    assert plan.find_job(whole, "layer_units", "m", "layer4", "0").rule == "layer_tables"


def test_an_explicit_number_of_parts_and_its_bound():
    assert len([j for j in _jobs(None, 3) if j.rule == "layer_units"]) == 3
    assert _jobs(None, 1)[0].unit_parts == 1
    (merge,) = [j for j in _jobs(None, 5000) if j.rule == "layer_tables"]
    assert merge.unit_parts == 2048  # at most one part per unit


def test_a_layer_that_cannot_fit_is_refused_with_what_to_change():
    limit = 1000  # below a part of one unit (imports, bootstrap weights, a batch's label planes)
    (whole,) = _jobs(limit)
    assert whole.rule == "layer_tables" and whole.floor
    (line,) = plan.over_limit([whole], limit, "resources.max_mem_mb")
    assert line.startswith(f"layer_tables m layer4: needs about {whole.mem_mb} MB")
    unit = line.split("even with one unit per part")[1]
    part, merge = unit.split("; the merge of the parts ")  # neither fits 1000 MB
    assert "a layer_units job needs about" in part and "significance" in part
    assert "resources.batch_size" in part and "dissection.statistics.replicates" in part
    assert "more resources.unit_parts" not in part  # one unit per part already
    assert "tables" in merge and "a machine with more memory" in merge
    # a limit a part fits: no refusal of the layer
    assert plan.over_limit(_jobs(4000), 4000, "resources.max_mem_mb") == []


def test_the_refusal_of_an_explicit_split_names_one_line_per_layer():
    jobs = _jobs(None, 2)
    lines = plan.over_limit(jobs, 3000, "--resources mem_mb")
    assert len(lines) == 1 and lines[0].startswith("layer_units m layer4 0: needs about")
    assert "more resources.unit_parts" in lines[0]


def test_the_zoos_largest_layer_at_broden_scale_fits_16_gb_in_parts(tmp_path):
    """regnet_y_128gf (644 M parameters, the zoo's largest model) at broden1_224 (63,305
    images): its largest layer does not fit a 16 GB job whole, and does in unit parts."""
    layers = [f"trunk_output.block{i}" for i in range(1, 5)]
    models = {"big": {"torchvision": "regnet_y_128gf", "weights": None, "layers": layers}}

    def planned(**resources):
        cfg = {"dataset": {"download": "broden1_224"}, "data_root": str(tmp_path / "none"),
               "resources": {"shards": 2, "batch_size": 64, **resources},
               "dissection": {"statistics": STATS}}
        assert plan.dataset_size(cfg).images == 63305
        return plan.workflow_plan(cfg, models, cache_dir=tmp_path / "cache")

    whole = {j.layer: j for j in planned(unit_parts=1) if j.rule == "layer_tables"}
    biggest = max(whole, key=lambda x: whole[x].mem_mb)
    assert biggest == "trunk_output.block4" and whole[biggest].mem_mb > 16000  # 7,392 units
    jobs = planned(max_mem_mb=16000)
    parts = [j for j in jobs if j.layer == biggest and j.rule == "layer_units"]
    (merge,) = [j for j in jobs if j.layer == biggest and j.rule == "layer_tables"]
    assert len(parts) == merge.unit_parts >= 2
    assert max(j.mem_mb for j in parts + [merge]) <= 16000
    assert plan.over_limit(jobs, 16000, "resources.max_mem_mb") == []  # every job of the run
    small = [j for j in planned(max_mem_mb=4000)
             if j.layer == biggest and j.rule.startswith("layer_")]
    parts4 = [j for j in small if j.rule == "layer_units"]
    assert len(parts4) > len(parts) and max(j.mem_mb for j in small) <= 4000


def test_cnnvis_plan_prints_the_part_jobs(tmp_path, synth_dir):
    cfg = {"seed": 0, "data_root": str(tmp_path / "root"), "dataset": {"path": str(synth_dir)},
           "models": {"m": {"arch": "synthnet", "kwargs": {"width": 4},
                            "layers": ["features.relu4"]}},
           "resources": {"shards": 2, "unit_parts": 3}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "cnnvis_pipeline", "plan", "--configfile",
                          str(path), "--cache", str(tmp_path / "cache")],
                         capture_output=True, text=True, check=True).stdout
    rows = [ln.split() for ln in out.splitlines()[2:]]
    assert [r[:4] for r in rows if r[0] == "layer_units"] == [
        ["layer_units", "m", "features.relu4", str(k)] for k in range(3)]
    (merge,) = [ln for ln in out.splitlines() if ln.startswith("layer_tables")]
    assert merge.endswith("(merges 3 unit parts)")


def test_part_jobs_memory_within_1_5x_of_the_measured_peak(tmp_path, synth_dir, prepared_dir):
    cfg = plan.load_config(_write(tmp_path, synth_dir, {"m": {
        "torchvision": "resnet18", "weights": None, "layers": ["layer4"]}}))
    specs = model_specs(cfg)
    jobs = {(j.rule, j.part): j for j in plan.workflow_plan(cfg, specs,
                                                            cache_dir=tmp_path / "cache")}
    spec = json.dumps(job_spec(dict(specs["m"], name="m"), cfg, ("dissection", "resources")))
    cnnvis = [sys.executable, "-m", "cnnvis_pipeline"]
    extract = tmp_path / "extract" / "0"
    assert run_measured([*cnnvis, "extract", "--prepared", str(prepared_dir), "--spec", spec,
                         "--shard", "0", "--shards", "1", "--out", str(extract),
                         "--quiet"])["rc"] == 0
    part = tmp_path / "0-2.npz"
    measured = {("layer_units", "0"): run_measured(
        [*cnnvis, "layer-units", "--prepared", str(prepared_dir), "--spec", spec, "--layer",
         "layer4", "--extracts", str(extract), "--part", "0", "--parts", "2", "--out", str(part),
         "--quiet"])}
    assert main_ok([*cnnvis, "layer-units", "--prepared", str(prepared_dir), "--spec", spec,
                    "--layer", "layer4", "--extracts", str(extract), "--part", "1", "--parts",
                    "2", "--out", str(tmp_path / "1-2.npz"), "--quiet"])
    measured[("layer_tables", "")] = run_measured(
        [*cnnvis, "tables", "--prepared", str(prepared_dir), "--spec", spec, "--layers",
         "layer4", "--parts", str(part), str(tmp_path / "1-2.npz"), "--out-dir",
         str(tmp_path / "out"), "--quiet"])
    for key, m in measured.items():
        assert m["rc"] == 0, m["stderr_tail"]
        ratio = jobs[key].mem_mb / m["peak_rss_mb"]
        assert 1 / 1.5 <= ratio <= 1.5, (key, jobs[key].mem_mb, m["peak_rss_mb"], jobs[key].parts)
    assert jobs[("layer_tables", "")].unit_parts == 2


def main_ok(cmd) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _write(tmp_path, synth_dir, models):
    cfg = {"seed": 0, "data_root": str(tmp_path / "root"), "dataset": {"path": str(synth_dir)},
           "models": models, "resources": {"shards": 1, "batch_size": 16, "device": "cpu",
                                           "unit_parts": 2}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_dry_run_splits_the_layer_that_does_not_fit_the_limit(tmp_path, workflow):
    """`snakemake -n` with resources.max_mem_mb: the layer too large for one job becomes
    layer_units jobs requesting the plan's memory, all under the limit, and their merge."""
    config = workflow.config("tiny")
    config["dataset"] = {"synth": {"images": 100000, "size": 64}}  # not made by a dry run
    config["models"] = {"r18": {"torchvision": "resnet18", "weights": None,
                                "layers": ["layer4"]}}
    config["resources"].update(shards=2, max_mem_mb=2500)
    proc = workflow.run(tmp_path / "run", config, "-n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    blocks = proc.stdout.split("\nrule ")
    units = [b for b in blocks if b.startswith("layer_units:")]
    (tables,) = [b for b in blocks if b.startswith("layer_tables:")]
    mem = [int(b.split("mem_mb=")[1].split(",")[0]) for b in units]
    assert len(units) == 3 and max(mem) <= 2500
    assert all(f"unit_parts/{k}-3.npz" in tables for k in range(3))
    config["resources"]["max_mem_mb"] = None  # no limit: the layer in one job
    proc = workflow.run(tmp_path / "run", config, "-n")
    assert proc.returncode == 0 and "rule layer_units:" not in proc.stdout
    (tables,) = [b for b in proc.stdout.split("\nrule ") if b.startswith("layer_tables:")]
    assert int(tables.split("mem_mb=")[1].split(",")[0]) > 2500 and "extract/1" in tables


def test_compositional_parts_follow_the_limit():
    """Without a limit, resources.shards parts; with one, the fewest (at least that many) whose
    largest fits; a limit below what every part holds (the dataset's concept masks) leaves
    parts over it, which over_limit refuses."""
    def jobs(limit):
        return plan.compositional_jobs("m", "layer4", SHAPE, BRODEN, 2, "all", limit)

    free = jobs(None)
    assert [j.part for j in free] == ["0", "1"]
    for job in free:
        job.mem_mb = sum(job.parts.values())
    assert min(j.mem_mb for j in free) > 8000  # ResNet-50 layer4 at Broden's scale
    split = jobs(8000)
    k = len(split)
    sizes = [plan.compositional_job("m", "layer4", SHAPE, BRODEN, k, i, "all") for i in range(k)]
    assert k > 2 and all(sum(j.parts.values()) <= 8000 for j in sizes)
    assert sum(plan._shard_images(2048, k, i) for i in range(k)) == 2048
    assert sum(plan.compositional_job("m", "layer4", SHAPE, BRODEN, k - 1, 0, "all")
               .parts.values()) > 8000  # one part fewer would not fit
    fixed = sum(v for key, v in sizes[0].parts.items()
                if key in ("imports", "concept_masks", "cooccurrence"))
    tight = jobs(int(fixed))  # nothing fits: one unit per part, still over, refused
    assert len(tight) == 2048
    for job in tight:
        job.mem_mb = int(sum(job.parts.values())) + 1
    (line, *_) = plan.over_limit(tight, int(fixed), "resources.max_mem_mb")
    assert line.startswith("compositional_shard m layer4 0:") and "concept masks" in line


def test_a_dry_run_splits_the_compositional_units_that_do_not_fit(tmp_path, workflow):
    config = workflow.config("tiny")
    config["dataset"] = {"synth": {"images": 100000, "size": 64}}  # not made by a dry run
    config["models"] = {"r18": {"torchvision": "resnet18", "weights": None,
                                "layers": ["layer4"]}}
    config["compositional"] = {}
    config["resources"].update(shards=2, max_mem_mb=2500)
    proc = workflow.run(tmp_path / "run", config, "-n", "results/r18/layer4/formulas.parquet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    blocks = proc.stdout.split("\nrule ")
    parts = [b for b in blocks if b.startswith("compositional_shard:")]
    mem = [int(b.split("mem_mb=")[1].split(",")[0]) for b in parts]
    (merge,) = [b for b in blocks if b.startswith("layer_formulas:")]
    k = len(parts)
    assert k > 2 and max(mem) <= 2500
    assert all(f"compositional/layer4/{i}-{k}.parquet" in merge for i in range(k))
    config["resources"]["max_mem_mb"] = None  # no limit: resources.shards parts
    proc = workflow.run(tmp_path / "run", config, "-n", "results/r18/layer4/formulas.parquet")
    assert proc.returncode == 0
    assert proc.stdout.count("\nrule compositional_shard:") == 2


@pytest.mark.slow
def test_workflow_in_unit_parts_writes_the_tables_of_one_job(tmp_path, workflow):
    config = workflow.config("tiny")
    config["models"]["tiny"]["layers"] = ["features.relu4"]  # 8 units
    config["resources"].update(shards=2, unit_parts=3, keep_activations=True)
    layer = tmp_path / "run" / "results" / "tiny" / "features.relu4"
    targets = [f"results/tiny/features.relu4/{t}.parquet"
               for t in ("thresholds", "iou", "units", "top_images", "significance", "sweep")]
    proc = workflow.run(tmp_path / "run", config, *targets)
    assert proc.returncode == 0
    assert "rule layer_units" in proc.stdout + proc.stderr
    assert not (layer / "unit_parts").exists() or not any((layer / "unit_parts").iterdir())
    in_parts = {t: (tmp_path / "run" / t).read_bytes() for t in targets}
    config["resources"]["unit_parts"] = 1  # the same run in one job: layer_tables runs again
    proc = workflow.run(tmp_path / "run", config, *targets)
    assert proc.returncode == 0 and "rule layer_units" not in proc.stdout + proc.stderr
    assert "rule layer_tables" in proc.stdout + proc.stderr
    assert "rule extract_shard" not in proc.stdout + proc.stderr  # unit_parts is not in --spec
    for t in targets:
        assert (tmp_path / "run" / t).read_bytes() == in_parts[t], t
    units = pq.read_table(layer / "units.parquet").to_pandas()
    assert len(units) == 8 and units["q_value"].notna().all()
