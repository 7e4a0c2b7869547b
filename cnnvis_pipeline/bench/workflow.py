"""The dissection as users run it: the real Snakemake workflow on the benchmark's prepared dataset.

- workflow_config(...): a run directory whose data_root already holds the prepared dataset (a
  symbolic link to the benchmark's cache, with its validation record), and a --configfile for
  one or more torchvision models (seeded random weights).
- model_spec(...): the resolved spec a rule passes to its command (--spec), for the in-process
  side of the comparison: the same spec gives the same config digest, hence the same tables.
- run_workflow(...): `snakemake --cores C` for the layers' tables only (no visualisations or
  reports), timed, with the job count and per-rule wall time from Snakemake's log.
- job_startup_s(): the wall time of a `cnnvis` command that starts and does nothing (interpreter,
  imports, argument parsing): what every job pays before its work.
- compare_tables(a, b): the tables of two results directories, byte for byte.

Imports nothing of Snakemake itself (it runs as a child process); bench.py imports this module
only with --workflow or --bulk.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATASET_NAME = "bench"
TABLES = ("thresholds.parquet", "iou.parquet", "units.parquet", "top_images.parquet")


def models_config(archs: list[str], layers: list[str], seeds: list[int] | None = None) -> dict:
    """The `models:` section: one entry per (architecture, seed), random weights, ImageNet
    normalisation. Names: the architecture, or `<arch>-s<seed>` when seeds are given."""
    out = {}
    for k, arch in enumerate(archs):
        seed = 0 if seeds is None else seeds[k]
        name = arch if seeds is None else f"{arch}-s{seed}"
        out[name] = {"torchvision": arch, "weights": None, "seed": int(seed),
                     "layers": list(layers)}
    return out


def full_config(broden: str | Path, data_root: str | Path, models: dict, settings: dict) -> dict:
    """The run's config; `settings` holds the benchmark's dissection and resources keys in one
    mapping, split here into the two sections."""
    from cnnvis_pipeline import config as cc

    resources = set(cc.load_schema()["properties"]["resources"]["properties"])
    return {"data_root": str(data_root),
            "dataset": {"path": str(Path(broden).resolve()), "name": DATASET_NAME},
            "models": models,
            "dissection": {k: v for k, v in settings.items() if k not in resources},
            "resources": {k: v for k, v in settings.items() if k in resources}}


def model_spec(config: dict, name: str) -> dict:
    """What workflow/rules/common.smk's model_spec(name) gives, from the same config."""
    import yaml

    from cnnvis_pipeline import config as cc
    from cnnvis_pipeline.settings import job_spec

    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    merged = cc.merge_with_default(json.loads(json.dumps(config)), default)
    return job_spec(dict(cc.model_specs(merged)[name], name=name), merged,
                    ("dissection", "resources"))


def workflow_config(work: str | Path, broden: str | Path, prepared: str | Path, models: dict,
                    dissection: dict) -> Path:
    """Write `work/config.yaml`; data_root `work/data` holds the prepared dataset already.

    The shared entries are seeded as a run would leave them (data/entries.py): the prepared
    arrays at `prepared/<name>-<digest>` and the validation record, and the run's digest file and
    receipts in `work/results/digests/`, in the order a run writes them, so that Snakemake finds
    nothing to redo for validation or preparation."""
    from cnnvis_pipeline.data.entries import entry_name, write_dataset_digest, write_receipt

    work = Path(work)
    data_root = work / "data"
    (data_root / "prepared").mkdir(parents=True, exist_ok=True)
    (data_root / "validated").mkdir(parents=True, exist_ok=True)
    prepared = Path(prepared).resolve()
    digests = work / "results" / "digests"
    record = write_dataset_digest(Path(broden).resolve(), digests / "dataset.json",
                                  manifest=data_root / "manifests" / f"{DATASET_NAME}.json")
    digest = record["digest"]
    have = json.loads((prepared / "meta.json").read_text()).get("digest")
    if have != digest:
        raise ValueError(f"{prepared}: prepared from other content ({have}, not {digest})")
    entry = entry_name(DATASET_NAME, digest)
    target = data_root / "prepared" / entry
    if not (target / "meta.json").is_file():
        # Hard links (a copy across file systems) of the benchmark's prepared arrays.
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(prepared.iterdir()):
            if f.name == "meta.json":
                continue  # last, as prepare_dataset writes it: its presence means complete
            _link_or_copy(f, target / f.name)
        _link_or_copy(prepared / "meta.json", target / "meta.json")
    line = f"{Path(broden).resolve()}: valid (benchmark dataset)\n"
    (data_root / "validated" / f"{entry}.txt").write_text(line)
    (digests / "validated.txt").write_text(line)
    write_receipt(digests / "prepared.json", "prepared", prepared=str(target), digest=digest)
    # dataset.json < validated.txt < prepared.json, as the rules write them
    t = (digests / "dataset.json").stat().st_mtime
    for k, name in enumerate(("validated.txt", "prepared.json"), start=1):
        os.utime(digests / name, (t + k, t + k))
    cfg = full_config(broden, data_root, models, dissection)
    import yaml

    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    return path


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def table_targets(models: dict) -> list[str]:
    return [f"results/{m}/{layer}/{t}" for m, spec in models.items() for layer in spec["layers"]
            for t in ("iou.parquet", "units.parquet", "top_images.parquet", "detectors.png")]


def _snakemake_cmd(work: Path, config: Path, cores: int, targets: list[str]) -> list[str]:
    return [sys.executable, "-m", "snakemake", *targets, "-s", str(REPO / "Snakefile"),
            "--directory", str(work), "--cores", str(cores), "--configfile", str(config)]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_STAMP = re.compile(r"^\[(\w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d \d{4})\]")


def parse_log(text: str) -> dict:
    """Jobs per rule and per-rule summed job wall time (s, 1 s resolution) from a Snakemake log."""
    rules: dict[str, int] = {}
    seconds: dict[str, float] = {}
    started: dict[str, tuple[str, float]] = {}
    stamp = None
    rule = None
    for line in text.splitlines():
        m = _STAMP.match(line)
        if m:
            stamp = _dt.datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
            continue
        m = re.match(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            rule = m.group(1)
            continue
        m = re.match(r"^\s*jobid: (\d+)", line)
        if m and rule is not None:
            started[m.group(1)] = (rule, stamp or 0.0)
            rules[rule] = rules.get(rule, 0) + 1
            rule = None
            continue
        m = re.match(r"^Finished job(?:id:)? (\d+)", line.strip())
        if m and m.group(1) in started:
            r, t0 = started.pop(m.group(1))
            seconds[r] = seconds.get(r, 0.0) + max(0.0, (stamp or t0) - t0)
    rules.pop("all", None)
    return {"rules": dict(sorted(rules.items())), "rule_job_s": dict(sorted(seconds.items()))}


def run_workflow(work: str | Path, config: Path, cores: int, targets: list[str], *,
                 timeout: float | None = None) -> dict:
    """One snakemake run (the targets' jobs only; earlier outputs of `work` are removed first,
    not results/digests/: the seeded dataset digest and receipts)."""
    import shutil

    work = Path(work)
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    results = work / "results"
    for p in results.iterdir() if results.is_dir() else []:
        if p.name != "digests":  # the dataset's digest and receipts (workflow_config) stay
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    cmd = _snakemake_cmd(work, config, cores, targets)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-30:])
        raise RuntimeError(f"snakemake failed (exit {proc.returncode}):\n{tail}")
    logs = sorted((work / ".snakemake" / "log").glob("*.snakemake.log"))
    info = parse_log(logs[-1].read_text() if logs else proc.stderr)
    info["jobs"] = sum(info["rules"].values())
    info["workflow_s"] = wall
    return info


def dry_run_s(work: str | Path, config: Path, cores: int, targets: list[str]) -> float:
    """Wall time of `snakemake -n` for the same targets: Snakemake's own start-up and DAG."""
    work = Path(work)
    cmd = _snakemake_cmd(work, config, cores, targets) + ["-n", "--quiet"]
    t = time.perf_counter()
    subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, check=True)
    return time.perf_counter() - t


def job_startup_s(repeat: int = 3, command: str = "tables") -> float:
    """Fastest wall time of `python -m cnnvis_pipeline <command> --help` (start, import, parse)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnvis_pipeline", command, "--help"], env=_env(),
                       capture_output=True, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def compare_tables(a: str | Path, b: str | Path, models: dict) -> dict[str, bool]:
    """Per table file: True when results dirs a and b hold byte-identical files."""
    out = {}
    for m, spec in models.items():
        for layer in spec["layers"]:
            for t in TABLES:
                rel = f"{m}/{layer}/{t}"
                fa, fb = Path(a) / rel, Path(b) / rel
                out[rel] = fa.is_file() and fb.is_file() and fa.read_bytes() == fb.read_bytes()
    return out


def inprocess_s(spec: dict, prepared: str | Path, out_dir: Path, scratch: Path) -> float:
    """pipeline.dissect of one spec, tables written (what the workflow's targets are), timed."""
    import shutil

    from cnnvis_pipeline.dissection import pipeline
    from cnnvis_pipeline.settings import Job

    shutil.rmtree(out_dir, ignore_errors=True)
    t = time.perf_counter()
    try:
        pipeline.dissect(Job.from_spec(spec), prepared, out_dir, keep_on_device=False,
                         scratch=scratch, progress=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - t


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def compare(broden, prepared, work: Path, layers: list[str], dissection: dict, *, cores: int,
            repeat: int = 1, log=print) -> dict:
    """The workflow and in-process dissection of ResNet-18 (seed 0) alternately, `repeat` times;
    fastest of each, ratio, job count, start-ups, activation bytes, per-rule job time."""
    models = models_config(["resnet18"], layers)
    work = Path(work)
    config = workflow_config(work, broden, prepared, models, dissection)
    full = full_config(broden, work / "data", models, dissection)
    spec = model_spec(full, "resnet18")
    targets = table_targets(models)
    startup = job_startup_s()
    dry = dry_run_s(work, config, cores, targets)
    log(f"job start-up (cnnvis tables --help): {startup:.2f} s; snakemake -n: {dry:.2f} s")
    runs, inproc, loads = [], [], []
    for k in range(max(1, repeat)):
        loads.append(_load())
        inproc.append(inprocess_s(spec, prepared, work / "inprocess" / "resnet18",
                                  work / "scratch"))
        log(f"in-process:     {inproc[-1]:8.2f} s  (round {k + 1}; load {loads[-1]})")
        runs.append(run_workflow(work, config, cores, targets))
        log(f"workflow:       {runs[-1]['workflow_s']:8.2f} s  (round {k + 1}; "
            f"{runs[-1]['jobs']} jobs; job time per rule {runs[-1]['rule_job_s']})")
    same = compare_tables(work / "results", work / "inprocess", models)
    best = min(runs, key=lambda r: r["workflow_s"])
    acts = _activation_bytes(spec, prepared)
    out = {
        "workflow_s": round(best["workflow_s"], 3), "inprocess_s": round(min(inproc), 3),
        "workflow_ratio": round(best["workflow_s"] / min(inproc), 3),
        "workflow_runs_s": [round(r["workflow_s"], 3) for r in runs],
        "inprocess_runs_s": [round(x, 3) for x in inproc],
        "workflow_ratio_runs": [round(r["workflow_s"] / x, 3) for r, x in zip(runs, inproc,
                                                                             strict=True)],
        "workflow_jobs": best["jobs"], "workflow_rules": best["rules"],
        "workflow_rule_job_s": best["rule_job_s"], "job_startup_s": round(startup, 3),
        "snakemake_dry_run_s": round(dry, 3), "activation_bytes": acts,
        "workflow_shards": int(dissection.get("shards", 2)), "workflow_cores": cores,
        "workflow_tables_identical": all(same.values()), "loadavg": loads,
    }
    log(f"workflow / in-process: {out['workflow_ratio']:.3f} (rounds: "
        f"{out['workflow_ratio_runs']}); tables byte-identical: {out['workflow_tables_identical']}")
    return out


def _activation_bytes(spec: dict, prepared) -> int:
    """float16 bytes the extraction writes: images x units x h x w x 2 per layer (one probe)."""
    import torch

    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models.hooks import LayerRecorder
    from cnnvis_pipeline.models.registry import build_model

    ds = PreparedDataset(prepared)
    model, _ = build_model(spec["name"], spec)
    size = spec.get("input_size") or ds.images.shape[1:3]
    with LayerRecorder(model, spec["layers"], stop_after_last=True,
                       layouts=spec.get("layouts")) as rec, torch.inference_mode():
        outs = rec.run(torch.zeros(1, 3, *size))
    return int(sum(o[0].numel() * 2 for o in outs.values()) * len(ds))


def bulk(broden, prepared, work: Path, layers: list[str], dissection: dict, *, counts: list[int],
         cores: int, archs: list[str] | None = None, log=print) -> dict:
    """Bulk audits through the workflow: for each N in `counts`, one run of N torchvision models
    (random weights: seeds 0..N-1 of each architecture in turn, `archs` default resnet18) x
    `layers`, to their tables and the cross-model summary. Total wall time, per-model cost and
    its ratio to the 1-model run (or the smallest N)."""
    archs = archs or ["resnet18"]
    work = Path(work)
    runs = []
    for n in counts:
        names = [archs[k % len(archs)] for k in range(n)]
        models = models_config(names, layers, seeds=list(range(n)))
        d = work / f"bulk{n}"
        config = workflow_config(d, broden, prepared, models, dissection)
        load = _load()
        r = run_workflow(d, config, cores, table_targets(models)
                         + ["results/summary/detectors.parquet"])
        runs.append({"models": n, "total_s": round(r["workflow_s"], 3),
                     "per_model_s": round(r["workflow_s"] / n, 3), "jobs": r["jobs"],
                     "loadavg": load})
        log(f"bulk {n} model(s) x {len(layers)} layers: {r['workflow_s']:8.2f} s, "
            f"{r['workflow_s'] / n:.2f} s per model, {r['jobs']} jobs (load {load})")
    base = min(runs, key=lambda r: r["models"])
    for r in runs:
        r["per_model_ratio"] = round(r["per_model_s"] / base["per_model_s"], 3)
    return {"bulk": runs, "bulk_archs": archs}
