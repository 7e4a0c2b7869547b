"""Every tiny config of .test/config is a valid --configfile: merged with the embedded default
it passes the schema and resolves to model specs (a stale key or a typo fails here, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cnnvis_pipeline import config as cc

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / ".test" / "config").glob("*.yaml"))


def test_the_workflow_tests_have_their_configs():
    assert {p.stem for p in CONFIGS} >= {"tiny", "two_models", "report", "reproducible", "bulk",
                                         "shell_safety", "slurm", "factory"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_test_config_is_valid(path, workflow):
    user = workflow.config(path.stem)
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    merged = cc.merge_with_default(user, default)
    cc.check_schema(merged)
    specs = cc.model_specs(merged)
    assert set(user["models"]) <= {s.get("series") or name for name, s in specs.items()}
    assert merged["dataset"] == user["dataset"]  # the test's dataset replaces the default's
