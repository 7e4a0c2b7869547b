"""Run a workflow through the SLURM profile (workflow/profiles/slurm) on a real SLURM cluster.

Holds:
  test_profile_maps_gpu_rules  -- static check of the profile (no cluster needed)
  test_workflow_runs_on_slurm  -- runs a workflow with ``snakemake --profile workflow/profiles/slurm``
                                  and checks, from slurmctld's records of the submitted jobs, that
                                  every job ran under SLURM and that exactly the GPU rules asked
                                  for a GPU in the GPU partition.

The live test needs a cluster: ``sudo .ci/slurm-up.sh`` starts a single-node one (see docs/HPC.md);
without it the test is skipped. It runs the REAL workflow (the repository's Snakefile) on a tiny
config (``SLURM_CONFIG``, .test/config/slurm.yaml: broden-synth 24 images at 32 px, 2 shards, a width-4 synthnet trained for
1 epoch and a random one), from a temporary directory, up to the cross-model summary. On the CI node (2 CPUs, one fake GPU) GPU
jobs run one at a time; the run takes a few minutes (``CNNVIS_SLURM_TEST_TIMEOUT`` bounds it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
GPU_RULES = {"extract_shard", "layer_units", "layer_tables", "train_synthnet", "visualize_layer", "segment_shard",
             "ablation_layer", "adversarial_layer"}
# wall-clock bound of the snakemake run (each job takes ~15-20 s to turn around on the CI cluster)
RUN_TIMEOUT_S = int(os.environ.get("CNNVIS_SLURM_TEST_TIMEOUT", "900"))
# flags added to the profile for CI: quick first status check, no implicit workflow profile
CI_FLAGS = ["--slurm-init-seconds-before-status-checks", "2", "--workflow-profile", "none"]


def load_profile() -> dict:
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


def asks_for_gpu(resources: dict) -> bool:
    return bool(resources.get("gpu")) or "gpu" in str(resources.get("gres", ""))


# --------------------------------------------------------------------------- static profile check
def test_profile_maps_gpu_rules():
    profile = load_profile()
    assert profile["executor"] == "slurm"
    # sacct without an accounting database makes Snakemake hang: the profile must use squeue
    assert profile["slurm-status-command"] == "squeue"
    defaults = profile["default-resources"]
    assert not asks_for_gpu(defaults), "CPU jobs (default-resources) must not ask for a GPU"
    assert {"slurm_partition", "runtime", "mem_mb"} <= defaults.keys()
    gpu_sets = profile["set-resources"]
    assert GPU_RULES <= gpu_sets.keys()
    for rule in GPU_RULES:
        res = gpu_sets[rule]
        assert asks_for_gpu(res), rule
        assert res["slurm_partition"] != defaults["slurm_partition"], rule
        # the planned rules take mem_mb and runtime from the resource plan (cnnvis plan)
        planned = rule in {"extract_shard", "layer_units", "layer_tables", "visualize_layer",
                            "segment_shard", "ablation_layer", "adversarial_layer"}
        assert {"cpus_per_gpu"} | ({"runtime", "mem_mb"} if not planned else set()) \
            <= res.keys(), rule
        assert planned != ({"runtime", "mem_mb"} <= res.keys()), rule
    # a cpus_per_task for every job would override cpus_per_gpu of the GPU rules in the plugin
    assert "cpus_per_task" not in defaults
    for rule, res in gpu_sets.items():
        if rule not in GPU_RULES:
            assert not asks_for_gpu(res), f"{rule} is not a GPU rule but asks for a GPU"


# --------------------------------------------------------------------------- live cluster
def _run(cmd: list[str], timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def cluster_not_up_reason() -> str | None:
    """None when a SLURM cluster answers with an idle/usable node, else why not."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo); run `sudo .ci/slurm-up.sh`"
    try:
        res = _run(["sinfo", "-h", "-o", "%t"])
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld does not answer; run `sudo .ci/slurm-up.sh`"
    if res.returncode != 0:
        return f"SLURM cluster is not up ({res.stderr.strip()[:200]}); run `sudo .ci/slurm-up.sh`"
    states = set(res.stdout.split())
    if not states & {"idle", "mix", "alloc"}:
        return f"no usable SLURM node (states: {sorted(states)}); run `sudo .ci/slurm-up.sh`"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = cluster_not_up_reason()
    if reason:
        pytest.skip(reason)


@dataclass
class SlurmWorkflow:
    """How to run one workflow for the live test, and what to expect of it."""

    cmd: list[str]  # snakemake command without the profile flags
    workdir: Path  # where to run it (gets .snakemake/)
    expect_rules: set[str]  # rules that must have run as SLURM jobs
    check_outputs: callable | None = None  # extra check(jobs) of the workflow's outputs
    extra: dict = field(default_factory=dict)


# The real workflow on tiny data (.test/config/slurm.yaml): every rule of the data and
# dissection stages runs as a SLURM job.
SLURM_CONFIG = yaml.safe_load((REPO / ".test" / "config" / "slurm.yaml").read_text())
# The run's target: the dissection and the cross-model summary (the unit visualisations and HTML
# reports of the default target would add ~5 serial jobs, ~2 min on the CI node).
SLURM_TARGETS = ["summary"]
# rule -> number of SLURM jobs the config above makes for SLURM_TARGETS
SLURM_JOBS = {
    "synth_dataset": 1, "validate_dataset": 1, "prepare_dataset": 1, "check_model": 1,
    "train_synthnet": 1, "extract_shard": 4, "layer_tables": 2, "summary": 1,
}


def _real_outputs_check(workdir: Path):
    def check(jobs: dict[int, dict]):
        import pandas as pd

        from cnnvis_pipeline.dissection.figures import plot_summary
        from cnnvis_pipeline.models.registry import file_sha256
        from cnnvis_pipeline.tables import read_provenance

        counts: dict[str, int] = {}
        for info in jobs.values():
            counts[info["rule"]] = counts.get(info["rule"], 0) + 1
        assert counts == SLURM_JOBS, counts
        res = workdir / "results"
        for model in SLURM_CONFIG["models"]:
            tables = {t: pd.read_parquet(res / model / "features.relu4" / f"{t}.parquet")
                      for t in ("iou", "units", "top_images", "thresholds")}
            for table, df in tables.items():  # relu4 of width 4: units 0..7 of this model
                assert set(df["model"]) == {model} and set(df["unit"]) == set(range(8)), table
            assert len(tables["top_images"]) == 8 * SLURM_CONFIG["dissection"]["top_k"]
            assert tables["thresholds"]["threshold"].tolist() == tables["units"]["threshold"].tolist()
        prov = read_provenance(res / "synthnet" / "features.relu4" / "units.parquet")
        assert prov["checkpoint_sha256"] == file_sha256(res / "synthnet" / "checkpoint.pt")
        summary = pd.read_parquet(res / "summary" / "detectors.parquet")
        assert set(zip(summary["model"], summary["layer"], strict=True)) == {
            (m, "features.relu4") for m in SLURM_CONFIG["models"]}
        # the figure draws the summary table: drawn again from it, the same bytes
        plot_summary(summary, workdir / "unique_detectors.png")
        assert ((res / "summary" / "unique_detectors.png").read_bytes()
                == (workdir / "unique_detectors.png").read_bytes())

    return check


@pytest.fixture
def slurm_workflow(tmp_path, workflow) -> SlurmWorkflow:
    """The workflow the live test runs: the repository's Snakefile with SLURM_CONFIG."""
    workflow.write(tmp_path, SLURM_CONFIG)
    return SlurmWorkflow(
        cmd=[sys.executable, "-m", "snakemake", *SLURM_TARGETS, "--snakefile",
             str(REPO / "Snakefile"), "--configfile", str(tmp_path / "cfg.yaml")],
        workdir=tmp_path,
        expect_rules=set(SLURM_JOBS),
        check_outputs=_real_outputs_check(tmp_path),
    )


SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: ([^)]+)\)")


def submitted_jobs(log: str) -> dict[int, str]:
    """SLURM job id -> rule name, from snakemake's 'submitted with SLURM jobid' lines."""
    jobs = {}
    for job_id, log_path in SUBMITTED.findall(log):
        # .snakemake/slurm_logs/rule_<rule>/<wildcards...>/<jobid>.log
        parts = [p for p in Path(log_path).parts if p.startswith(("rule_", "group_"))]
        jobs[int(job_id)] = parts[0].split("_", 1)[1] if parts else "?"
    return jobs


def scontrol_job(job_id: int) -> dict[str, str]:
    res = _run(["scontrol", "show", "job", "-o", str(job_id)])
    assert res.returncode == 0, f"scontrol show job {job_id}: {res.stderr}"
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


@pytest.mark.slurm
def test_workflow_runs_on_slurm(slurm_cluster, slurm_workflow):
    wf = slurm_workflow
    profile = load_profile()
    cmd = ["timeout", "-k", "10", str(RUN_TIMEOUT_S), *wf.cmd, "--profile", str(PROFILE), *CI_FLAGS]
    started = time.monotonic()
    try:
        res = subprocess.run(
            cmd, cwd=wf.workdir, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30
        )
    except subprocess.TimeoutExpired as exc:  # timeout(1) itself hung: should not happen
        pytest.fail(f"snakemake did not stop after {RUN_TIMEOUT_S + 30}s: {exc}")
    elapsed = time.monotonic() - started
    log = res.stdout + res.stderr
    jobs = submitted_jobs(log)
    try:
        assert res.returncode == 0, (
            f"snakemake exited {res.returncode} after {elapsed:.0f}s "
            f"({'timed out' if res.returncode in (124, 137) else 'failed'}):\n{log[-6000:]}"
        )
        assert jobs, f"no job was submitted to SLURM:\n{log[-3000:]}"
        assert wf.expect_rules <= set(jobs.values()), (
            f"rules that ran on SLURM: {sorted(set(jobs.values()))}, expected {sorted(wf.expect_rules)}"
        )
        records = {}
        for job_id, rule in jobs.items():
            info = scontrol_job(job_id)
            info["rule"] = rule
            records[job_id] = info
            tres = info.get("TresPerJob", "") + info.get("TresPerNode", "")
            assert info["JobState"] == "COMPLETED", (rule, job_id, info["JobState"])
            assert info["Comment"].startswith(f"rule_{rule}"), (rule, info["Comment"])
            if rule in GPU_RULES:
                want = profile["set-resources"][rule]["slurm_partition"]
                assert "gpu" in tres, f"GPU rule {rule} (job {job_id}) asked for no GPU: {info}"
            else:
                want = profile["default-resources"]["slurm_partition"]
                assert "gpu" not in tres, f"CPU rule {rule} (job {job_id}) asked for a GPU: {tres}"
            assert info["Partition"] == want, (rule, job_id, info["Partition"])
        if wf.check_outputs:
            wf.check_outputs(records)
    finally:
        if res.returncode != 0 and jobs:  # leave nothing queued if the run failed half-way
            _run(["scancel", *map(str, jobs)])
    print(f"\nSLURM workflow run: {len(jobs)} jobs in {elapsed:.1f}s")
