"""The benchmark's --workflow mode (no timing assertions): the real Snakemake workflow on the
benchmark's prepared dataset gives byte-identical tables to the in-process dissection, with the
job count the workflow's shape implies; and the helpers it reads its figures with."""

from __future__ import annotations

import json
import os

import pytest

from cnnvis_pipeline import bench
from cnnvis_pipeline.bench import workflow as bw


def test_workflow_mode_gives_the_in_process_tables(tmp_path, capsys):
    rc = bench.main(["--images", "16", "--size", "32", "--device", "cpu", "--cache",
                     str(tmp_path / "cache"), "--batch-size", "8", "--workers", "1",
                     "--no-forward", "--workflow", "--first-run"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 2 shards, 2 layers: one extraction per shard (each checks the model first), one
    # thresholds + tally + tables job per layer; the prepared dataset is the benchmark's (no
    # validate/prepare job) and no check_model job (the model is not trained).
    assert out["workflow_rules"] == {"extract_shard": 2, "layer_tables": 2}
    assert out["workflow_jobs"] == 4 and out["workflow_shards"] == 2
    assert out["workflow_tables_identical"] is True
    # float16 bytes: 16 images x (layer3 256 x 2 x 2 + layer4 512 x 1 x 1) at 32 px
    assert out["activation_bytes"] == 16 * (256 * 4 + 512) * 2
    # one round (--repeat 1) on all CPUs (no --cores); each rule's job time is from the log
    assert out["workflow_runs_s"] == [out["workflow_s"]]
    assert out["workflow_cores"] == os.cpu_count()
    assert set(out["workflow_rule_job_s"]) == {"extract_shard", "layer_tables"}
    # the rule's preparation (all cores) and the serial one give the same bytes
    assert out["prepare_identical"] is True and out["prepare_workers"] == os.cpu_count()
    # each figure is its relation of the others (computed before they were rounded to 1 ms)
    def close(x):
        return pytest.approx(x, rel=5e-3, abs=1e-3)

    assert out["workflow_ratio"] == close(out["workflow_s"] / out["inprocess_s"])
    assert out["prepare_ips"] == close(16 / out["prepare_s"])
    assert out["prepare_serial_ips"] == close(16 / out["prepare_serial_s"])
    assert out["validate_ips"] == close(16 / out["validate_s"])
    assert "prepare_over_forward" not in out  # --no-forward: nothing to compare with
    assert not list((tmp_path / "cache").glob("workflow-*"))  # the run directory is removed


def test_compare_tables_sees_one_changed_byte(tmp_path):
    models = bw.models_config(["resnet18"], ["layer4"])
    for side in ("a", "b"):
        for t in bw.TABLES:
            p = tmp_path / side / "resnet18" / "layer4" / t
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"PAR1 same bytes")
    assert all(bw.compare_tables(tmp_path / "a", tmp_path / "b", models).values())
    (tmp_path / "b" / "resnet18" / "layer4" / "units.parquet").write_bytes(b"PAR1 same byteS")
    (tmp_path / "b" / "resnet18" / "layer4" / "iou.parquet").unlink()
    same = bw.compare_tables(tmp_path / "a", tmp_path / "b", models)
    assert [k for k, v in same.items() if not v] == ["resnet18/layer4/iou.parquet",
                                                     "resnet18/layer4/units.parquet"]


LOG = """\
[Tue Dec  1 08:29:33 2026]
localrule extract_shard:
    output: results/m/extract/1
    jobid: 6
    wildcards: model=m, shard=1
[Tue Dec  1 08:29:33 2026]
localrule extract_shard:
    output: results/m/extract/0
    jobid: 4
[Tue Dec  1 08:29:50 2026]
Finished jobid: 6 (Rule: extract_shard)
1 of 3 steps (33%) done
[Tue Dec  1 08:29:52 2026]
Finished jobid: 4 (Rule: extract_shard)
[Tue Dec  1 08:29:52 2026]
localrule layer_tables:
    jobid: 3
[Tue Dec  1 08:30:02 2026]
Finished jobid: 3 (Rule: layer_tables)
localrule all:
    jobid: 0
"""


def test_parse_log_counts_jobs_and_their_wall_time():
    info = bw.parse_log(LOG)
    assert info["rules"] == {"extract_shard": 2, "layer_tables": 1}
    assert info["rule_job_s"] == {"extract_shard": 17.0 + 19.0, "layer_tables": 10.0}
