"""The workflow's download path: `dataset: {url: ..., sha256: ...}` (or `download:` with
`mirror:`) served from a loopback HTTP server, through download_dataset -> validate_dataset ->
prepare_dataset -> the dissection of a tiny model; and a checksum mismatch, which stops the run
before anything that looks valid is written.

The fast tests check that `cnnvis download` (fetch_dataset) writes exactly the directory the
workflow reads (cnnvis_pipeline.config.dataset_source_dir), for every kind of download spec.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from loopback_http import LoopbackServer

from cnnvis_pipeline import cli
from cnnvis_pipeline import config as cc
from cnnvis_pipeline.data.download import COMPLETE_MARKER, resolve_source
from cnnvis_pipeline.data.synth import generate_broden_synth

REPO = Path(__file__).resolve().parents[1]
ZERO = "0" * 64


@pytest.fixture(scope="module")
def synth_zip(tmp_path_factory) -> bytes:
    """A broden-synth dataset of 24 images at 32 px, zipped under one top-level folder."""
    src = generate_broden_synth(tmp_path_factory.mktemp("dl") / "synth", 24, 32, seed=1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"broden_synth/{p.relative_to(src).as_posix()}")
    return buf.getvalue()


@pytest.fixture
def server(synth_zip):
    with LoopbackServer() as s:
        s.files["/data/x.zip"] = synth_zip
        yield s


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config(dataset: dict, **top) -> dict:
    """.test/config/tiny.yaml with `dataset` (and the `top` sections) in place, on the CPU."""
    cfg = yaml.safe_load((REPO / ".test" / "config" / "tiny.yaml").read_text())
    cfg.setdefault("resources", {})["device"] = "cpu"
    return {**cfg, "dataset": dataset, **top}


# -- fast: the directory cnnvis download writes is the one the workflow reads -------------------
SPECS = [
    {"url": "http://127.0.0.1:1/data/x.zip", "sha256": ZERO},
    {"url": "https://example.org/a/broden1_224.zip?token=1", "md5": "0" * 32},
    {"url": "http://127.0.0.1:1/data/x.zip", "sha256": ZERO, "name": "mine"},
    {"download": "broden1_224"},
    {"download": "broden1_224", "mirror": "http://127.0.0.1:1/m.zip"},
    {"download": "broden1_227", "mirror": "http://127.0.0.1:1/m.zip", "sha256": ZERO,
     "name": "b227"},
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("data_root", ["resources", "/scratch/shared data"])
def test_download_dir_is_the_workflow_dataset_dir(spec, data_root):
    cfg = {"dataset": spec, "data_root": data_root}
    name = cc.dataset_name(cfg)
    # the rule runs: cnnvis download --data-root {data_root}/datasets --name {name} --spec ...
    assert resolve_source(spec).name == name  # the default names agree, too
    src = resolve_source(dict(spec, name=name))
    assert str(Path(f"{data_root}/datasets") / src.name) == cc.dataset_source_dir(cfg)
    if spec.get("mirror"):
        assert src.url == spec["mirror"]


def test_cli_spec_honours_mirror_and_name(server, synth_zip, tmp_path, capsys):
    spec = {"download": "broden1_224", "mirror": server.url("/data/x.zip"),
            "sha256": sha256(synth_zip)}
    cfg = {"dataset": spec, "data_root": str(tmp_path)}
    rc = cli.main(["download", "--data-root", f"{tmp_path}/datasets", "--name",
                   cc.dataset_name(cfg), "--spec", json.dumps(spec), "--quiet"])
    out = capsys.readouterr().out.strip()
    assert rc == 0 and out == cc.dataset_source_dir(cfg) == f"{tmp_path}/datasets/broden1_224"
    assert (Path(out) / COMPLETE_MARKER).is_file()
    assert [r["path"] for r in server.gets("/data/x.zip")] == ["/data/x.zip"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--spec", "{not json"], "download: --spec is not valid JSON"),
        (["--spec", "[1]"], "download: --spec must be a JSON object, got list"),
        (["--spec", "{}", "--url", "http://h/x.zip"], "give either --spec or --url"),
        (["--spec", '{"url": "http://h/x.zip"}'], "needs sha256: or md5:"),
        (["--spec", '{"synth": {}}'], "dataset: give download:"),
    ],
)
def test_cli_spec_errors(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["cnnvis_pipeline.data.commands"])
    assert cli.main(["download", "--data-root", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- slow: the whole snakemake command line ----------------------------------------------------
@pytest.mark.slow
def test_workflow_downloads_validates_prepares_and_dissects(server, synth_zip, tmp_path, workflow):
    url = server.url("/data/x.zip")
    cfg = config({"url": url, "sha256": sha256(synth_zip)})
    # the dissection targets only (the default target adds the visualisations and reports)
    proc = workflow.run(tmp_path, cfg, "results/tiny/features.relu3/units.parquet",
                         "results/summary/detectors.parquet")
    assert proc.returncode == 0
    dataset_dir = tmp_path / cc.dataset_source_dir(cfg)
    assert json.loads((dataset_dir / COMPLETE_MARKER).read_text())["url"] == url
    name = cc.dataset_name(cfg)
    digest = json.loads((tmp_path / "results/digests/dataset.json").read_text())["digest"]
    entry = f"{name}-{digest[:16]}"  # shared entries are keyed by the content digest
    assert "OK: 24 images" in (tmp_path / f"resources/validated/{entry}.txt").read_text()
    receipt = json.loads((tmp_path / "results/digests/prepared.json").read_text())
    assert receipt["prepared"] == f"resources/prepared/{entry}" and receipt["digest"] == digest
    assert json.loads((tmp_path / receipt["prepared"] / "meta.json").read_text())["digest"] == digest
    units = pq.read_table(tmp_path / "results/tiny/features.relu3/units.parquet").to_pandas()
    assert len(units) > 0 and set(units["model"]) == {"tiny"} and units["unit"].is_unique
    assert (tmp_path / "results/summary/detectors.parquet").is_file()
    assert len(server.gets("/data/x.zip")) == 1
    assert not list((tmp_path / "resources/datasets").glob("*.zip*"))  # archive removed


@pytest.mark.slow
def test_workflow_mirror_is_used(server, synth_zip, tmp_path, workflow):
    cfg = config({"download": "broden1_224", "mirror": server.url("/data/x.zip"),
                  "sha256": sha256(synth_zip)})
    proc = workflow.run(tmp_path, cfg, "results/digests/dataset.json")
    assert proc.returncode == 0
    assert (tmp_path / "resources/datasets/broden1_224" / COMPLETE_MARKER).is_file()
    assert len(server.gets("/data/x.zip")) == 1


@pytest.mark.slow
def test_workflow_checksum_mismatch_stops_before_anything_valid(server, synth_zip, tmp_path,
                                                               workflow):
    url = server.url("/data/x.zip")
    proc = workflow.run(tmp_path, config({"url": url, "sha256": ZERO}))
    assert proc.returncode != 0
    # the failed job's error line is repeated on the terminal by the workflow's onerror
    assert (f"error: {url}: sha256 checksum mismatch: expected {ZERO}, got {sha256(synth_zip)}"
            in proc.stderr), proc.stderr[-3000:]
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                  and ".snakemake" not in p.parts)
    # nothing but logs, locks and the digest files of the models (results/digests/)
    assert [p for p in left if "/logs/" not in p and not p.endswith(".lock")
            and not p.startswith("results/digests/model_")] == ["cfg.yaml"], left


@pytest.mark.slow
def test_workflow_url_without_checksum_fails_before_any_job(tmp_path, workflow):
    proc = workflow.run(tmp_path, config({"url": "http://127.0.0.1:9/x.zip"}))
    assert proc.returncode != 0
    assert ("invalid configuration: dataset: url http://127.0.0.1:9/x.zip needs sha256: or md5:"
            in proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "resources").exists() and not (tmp_path / "results").exists()
