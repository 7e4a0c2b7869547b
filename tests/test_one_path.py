"""One dissection path: the workflow's commands (`cnnvis extract` per shard, then `cnnvis
tables` per layer, as the rules run them) and the in-process `dissect()` both go through
`pipeline.dissect_layer`, and give byte-identical tables, whatever the number of shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cnnvis_pipeline.cli import main
from cnnvis_pipeline.dissection.pipeline import dissect
from cnnvis_pipeline.settings import Job, job_spec

LAYERS = ["features.relu3", "features.relu4"]
TABLES = ("thresholds", "iou", "units", "significance", "sweep", "top_images")


def spec(**sections) -> dict:
    model = {"name": "tiny", "arch": "synthnet", "kwargs": {"width": 4}, "seed": 1,
             "layers": LAYERS, "mean": [0.5] * 3, "std": [0.25] * 3}
    config = {"seed": 4, "dissection": {"quantile": 0.02, "statistics": {"null_replicates": 50,
                                                                         "replicates": 20}},
              "resources": {"batch_size": 7, "device": "cpu"}, **sections}
    return job_spec(model, config, ("dissection", "resources"))


def workflow_path(prepared: Path, out: Path, shards: int) -> Path:
    """What the rules extract_shard and layer_tables run, through the CLI."""
    text = json.dumps(spec())
    extracts = [out / "extract" / str(k) for k in range(shards)]
    for k, d in enumerate(extracts):
        assert main(["extract", "--prepared", str(prepared), "--spec", text, "--shard", str(k),
                     "--shards", str(shards), "--out", str(d), "--quiet"]) == 0
    for layer in LAYERS:
        assert main(["tables", "--prepared", str(prepared), "--spec", text, "--layers", layer,
                     "--extracts", *map(str, extracts), "--out-dir", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def in_process(prepared_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inprocess")
    dissect(Job.from_spec(spec()), prepared_dir, out, keep_on_device=False,
            scratch=out / "scratch", progress=False)
    return out


@pytest.mark.parametrize("shards", [1, 3])
def test_workflow_commands_equal_in_process(prepared_dir, in_process, tmp_path, shards):
    out = workflow_path(prepared_dir, tmp_path, shards)
    for layer in LAYERS:
        for name in TABLES:
            a = (in_process / layer / f"{name}.parquet").read_bytes()
            b = (out / layer / f"{name}.parquet").read_bytes()
            assert a == b, f"{layer}/{name}.parquet differs with {shards} shard(s)"
    units = pq.read_table(out / LAYERS[1] / "units.parquet").to_pandas()
    assert len(units) == 8 and units["iou"].max() > 0  # width 4 -> relu4 has 8 units
    assert units["p_value"].notna().all()  # statistics ran on this path too


def test_tables_carry_the_dissection_settings_they_were_made_with(in_process):
    from cnnvis_pipeline.tables import read_provenance

    prov = read_provenance(in_process / LAYERS[0] / "units.parquet")
    assert prov["dissection"]["quantile"] == 0.02
    assert prov["dissection"]["statistics"]["null_replicates"] == 50
    assert prov["dissection"]["statistics"]["seed"] == 4  # the run's one seed


def test_resources_do_not_change_the_config_digest(prepared_dir):
    from cnnvis_pipeline.dissection.pipeline import config_digest

    a = Job.from_spec(spec())
    b = Job.from_spec(spec(resources={"batch_size": 3, "shards": 5, "device": "cpu"}))
    c = Job.from_spec(spec(dissection={"quantile": 0.03}))
    assert config_digest(a) == config_digest(b) != config_digest(c)
