"""Hostile and broken inputs: each gives one clear message naming the file, row or key, a
non-zero exit, and no partial output that looks valid.

Most cases run the `cnnvis` command functions in-process (fast); a few run the whole `snakemake`
command line on tiny data (marked slow): a malformed config, an unsafe name, a corrupt image, a
checkpoint with pickled code, and an extraction that fails midway.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cnnvis_pipeline import cli
from cnnvis_pipeline import config as cc
from cnnvis_pipeline.errors import CnnvisError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"

# A factory module for the model cases: a model whose layer "3" is a Linear layer, and one
# that raises on its second forward pass (an extraction that fails midway).
FACTORIES = '''
import torch
from torch import nn


def with_linear(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(5))


class FailsOnSecondBatch(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("hostile_models: boom on batch 2")
        return self.relu(self.conv(x))


def fails_midway(width=4):
    torch.manual_seed(0)
    return FailsOnSecondBatch(width)
'''


# -- helpers ------------------------------------------------------------------------------------
def cnnvis(capsys, *argv) -> tuple[int, str, str]:
    """`cnnvis ARGV` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    """The single `error:` line the user sees (asserting there is exactly one, no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def looks_valid(root: Path) -> list[str]:
    """Files under `root` that a later step would take for finished output."""
    names = {"meta.json", "info.json", ".complete", "index.csv"}
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.name in names or p.suffix in (".parquet", ".npz", ".png", ".pt")
    )


# `pristine` and `dataset` (a writable copy of it) come from conftest.py.


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    d = tmp_path_factory.mktemp("factories")
    (d / "hostile_models.py").write_text(FACTORIES)
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop("hostile_models", None)


def rewrite_index(root: Path, row: int, column: str, value: str) -> None:
    """Set one cell of index.csv (row 0 = the first image)."""
    import csv

    with open(root / "index.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[row + 1][rows[0].index(column)] = value
    with open(root / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def first_cell(root: Path, column: str) -> str:
    import csv

    with open(root / "index.csv", newline="") as f:
        return next(csv.DictReader(f))[column].split(";")[0]


def assert_refused(capsys, dataset: Path, tmp_path: Path, *needles: str) -> tuple[str, str]:
    """`validate` lists the problem (exit 1) and `prepare` stops on it (exit 2, nothing left)."""
    rc, out, err = cnnvis(capsys, "validate", dataset, "--quiet")
    assert rc == 1, (out, err)
    problems = out.strip().splitlines()
    assert any(all(n in p for n in needles) for p in problems), problems
    assert "Traceback" not in err
    out_dir = tmp_path / "prepared" / "p"
    rc, _, err = cnnvis(capsys, "prepare", "--dataset", dataset, "--out", out_dir, "--quiet")
    assert rc == 2
    line = one_error(err)
    assert all(n in line for n in needles), line
    assert not out_dir.parent.exists() or looks_valid(out_dir.parent) == []
    # nothing but the entry's lock file (which stays: see data/entries.py)
    left = sorted(p.name for p in out_dir.parent.iterdir()) if out_dir.parent.exists() else []
    assert left in ([], [".p.lock"]), left
    return problems[0], line


# -- dataset files ------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_names_the_file(capsys, dataset, tmp_path, damage):
    rel = first_cell(dataset, "image")
    path = dataset / "images" / rel
    data = path.read_bytes()
    path.write_bytes(b"this is not a JPEG" * 10 if damage == "garbage" else data[: len(data) // 3])
    problem, line = assert_refused(capsys, dataset, tmp_path, rel)
    assert "decode" in line
    print(problem, line, sep="\n")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_names_the_file(capsys, dataset, tmp_path, damage):
    rel = first_cell(dataset, "object")
    path = dataset / "images" / rel
    data = path.read_bytes()
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage" if damage == "garbage" else data[: len(data) // 2])
    problem, line = assert_refused(capsys, dataset, tmp_path, rel)
    assert "decode" in line
    print(problem, line, sep="\n")


@pytest.mark.parametrize(
    "column, value, reason",
    [
        ("image", "../../../../etc/passwd", "outside the dataset's images/"),
        ("image", "synth/../../index.csv", "outside the dataset's images/"),
        ("image", "/etc/passwd", "must be relative to images/"),
        ("object", "../category.png", "outside the dataset's images/"),
        ("object", "/tmp/x_object.png", "must be relative to images/"),
    ],
)
def test_index_paths_outside_images_are_refused(capsys, dataset, tmp_path, column, value, reason):
    rewrite_index(dataset, 0, column, value)
    problem, line = assert_refused(capsys, dataset, tmp_path, "index.csv", "line 2", value)
    assert reason in line and reason in problem
    print(problem, line, sep="\n")


def test_unknown_image_level_label(capsys, dataset, tmp_path):
    rewrite_index(dataset, 0, "scene", "999")
    problem, line = assert_refused(capsys, dataset, tmp_path, "index.csv", "line 2", "999")
    assert "not in label.csv" in line
    print(problem, line, sep="\n")


def test_unknown_label_in_png(capsys, dataset, tmp_path):
    rel = first_cell(dataset, "object")
    path = dataset / "images" / rel
    plane = np.asarray(Image.open(path).convert("RGB")).copy()
    plane[0, 0] = (250, 3, 0)  # label 250 + 256 * 3 = 1018, not in label.csv
    Image.fromarray(plane).save(path)
    problem, line = assert_refused(capsys, dataset, tmp_path, rel, "1018")
    assert "not in label.csv" in line
    print(problem, line, sep="\n")


def test_empty_dataset(capsys, dataset, tmp_path):
    header = (dataset / "index.csv").read_text().splitlines()[0]
    (dataset / "index.csv").write_text(header + "\n")
    problem, line = assert_refused(capsys, dataset, tmp_path, "index.csv", "no images")
    print(problem, line, sep="\n")


def test_empty_directory(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    rc, out, err = cnnvis(capsys, "validate", tmp_path / "empty", "--quiet")
    assert rc == 1 and "index.csv: required file is missing" in out
    rc, _, err = cnnvis(capsys, "prepare", "--dataset", tmp_path / "empty", "--out",
                        tmp_path / "p", "--quiet")
    assert rc == 2 and "required file is missing" in one_error(err)
    assert not (tmp_path / "p").exists()


# -- configuration ------------------------------------------------------------------------------
def base_config() -> dict:
    """.test/config/tiny.yaml, a fresh copy (the cases below change it in place)."""
    return yaml.safe_load((REPO / ".test" / "config" / "tiny.yaml").read_text())


def _set(cfg: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


BAD_CONFIGS = [
    # (what, change, words the message must contain)
    ("unknown top-level key", lambda c: _set(c, "dissectoin", {}), ["config:", "'dissectoin'"]),
    ("unknown resources key", lambda c: _set(c, "resources.shardz", 2),
     ["config: resources:", "'shardz'"]),
    ("unknown model key", lambda c: _set(c, "models.tiny.layer", ["x"]),
     ["config: models.tiny:", "'layer'"]),
    ("wrong type", lambda c: _set(c, "resources.shards", "two"),
     ["config: resources.shards:", "integer", "'two'"]),
    ("wrong type: layers", lambda c: _set(c, "models.tiny.layers", "features.relu3"),
     ["config: models.tiny.layers:", "array"]),
    ("out of range", lambda c: _set(c, "dissection.quantile", 1.5),
     ["config: dissection.quantile:"]),
    ("unknown arch", lambda c: _set(c, "models.tiny.arch", "alexnet"),
     ["config: models.tiny.arch:", "'alexnet'", "synthnet"]),
    ("two model sources", lambda c: _set(c, "models.tiny.torchvision", "resnet18"),
     ["config: models.tiny:", "exactly one of arch, torchvision, factory"]),
    ("two dataset sources", lambda c: _set(c, "dataset.url", "http://127.0.0.1:9/x.zip"),
     ["config: dataset:", "exactly one of synth, path, download, url"]),
    ("bad checksum", lambda c: c.update(dataset={"url": "http://h/x.zip", "sha256": "abc"}),
     ["config: dataset.sha256:", "'abc'"]),
    ("model name ../x", lambda c: c.update(models={"../x": c["models"]["tiny"]}),
     ["config: models:", "'../x'", "not allowed", "safe name"]),
    ("model name a/b", lambda c: c.update(models={"a/b": c["models"]["tiny"]}),
     ["config: models:", "'a/b'", "not allowed", "safe name"]),
    ("dataset name", lambda c: _set(c, "dataset.name", "../../etc"),
     ["config: dataset.name:", "'../../etc'", "not allowed", "safe name"]),
    ("layer name", lambda c: _set(c, "models.tiny.layers", ["../x"]),
     ["config: models.tiny.layers[0]:", "'../x'", "not allowed", "layer name"]),
]


@pytest.mark.parametrize("what, change, words", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_schema_names_the_key(what, change, words):
    cfg = base_config()
    change(cfg)
    with pytest.raises(CnnvisError) as e:
        cc.check_schema(cc.merge_with_default(cfg, {"data_root": "resources"}), SCHEMA)
    message = str(e.value)
    assert all(w in message for w in words), message
    assert "\n" not in message and len(message) < 400, message
    print(message)


def test_valid_configs_pass_the_schema():
    cc.check_schema(base_config(), SCHEMA)
    cc.check_schema(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), SCHEMA)
    for ds in ({"url": "http://h/x.zip", "sha256": "a" * 64}, {"path": "/data/broden1_224"},
               {"download": "broden1_224", "mirror": "https://m/b.zip"}):
        cc.check_schema(dict(base_config(), dataset=ds), SCHEMA)


@pytest.mark.parametrize(
    "models, words",
    [
        ({"../x": {"arch": "synthnet", "layers": ["features"]}}, ["config: models", "'../x'"]),
        ({"a/b": {"arch": "synthnet", "layers": ["features"]}}, ["config: models", "'a/b'"]),
        ({"m": {"arch": "synthnet", "layers": ["../x"]}}, ["config: models.m.layers", "'../x'"]),
        ({"m": {"arch": "synthnet", "layers": ["a/b"]}}, ["config: models.m.layers", "'a/b'"]),
        ({"m": {"arch": "synthnet", "checkpoints": ["/c/..pt"], "layers": ["f"]}},
         ["config: models.m:", "cannot derive a model name from checkpoint '/c/..pt'"]),
    ],
)
def test_unsafe_names_without_the_schema(models, words):
    """cnnvis_pipeline.config refuses them too (for callers that skip the schema)."""
    with pytest.raises(CnnvisError) as e:
        cc.model_specs({"models": models})
    assert all(w in str(e.value) for w in words), str(e.value)
    print(e.value)


def test_unsafe_dataset_name_without_the_schema():
    with pytest.raises(CnnvisError, match=r"config: dataset.name: dataset name '\.\./x' is not "
                                          r"allowed: names must be"):
        cc.dataset_name({"dataset": {"name": "../x", "synth": {}}})


# -- models and checkpoints ---------------------------------------------------------------------
def model_spec(tmp_path: Path | None = None, **model) -> dict:
    model = {"arch": "synthnet", "kwargs": {"width": 4}, "layers": ["features.relu3"], **model}
    spec = cc.model_specs({"models": {"tiny": model}})["tiny"]
    return dict(spec, name="tiny", resources={"batch_size": 4, "device": "cpu"})


def extract(capsys, prepared_dir, tmp_path, spec) -> tuple[int, str, Path]:
    out = tmp_path / "results" / "tiny" / "extract" / "0"
    rc, _, err = cnnvis(capsys, "extract", "--prepared", prepared_dir, "--spec", json.dumps(spec),
                        "--shard", 0, "--shards", 1, "--out", out, "--quiet")
    return rc, err, out


def assert_no_shard(out: Path) -> None:
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == [], leftovers
    assert looks_valid(out.parents[2]) == []


def test_unknown_layer_lists_the_valid_names(capsys, prepared_dir, tmp_path):
    rc, err, out = extract(capsys, prepared_dir, tmp_path, model_spec(layers=["features.relu9"]))
    line = one_error(err)
    assert rc == 2 and "tiny: no layer named 'features.relu9'; valid layer names:" in line
    assert "features.relu3" in line and "features.conv1" in line, line
    assert_no_shard(out)
    print(line)


@pytest.mark.parametrize(
    "model, words",
    [
        ({"arch": None, "factory": "no_such_module_xyz:build"},
         ["config: models.tiny:", "cannot import module 'no_such_module_xyz'"]),
        ({"arch": None, "factory": "os.path:no_such_function"},
         ["config: models.tiny:", "has no attribute 'no_such_function'"]),
        ({"arch": None, "torchvision": "resnet9000"},
         ["config: models.tiny:", "unknown torchvision model 'resnet9000'; known:", "resnet18"]),
        ({"arch": "lenet"}, ["config: models.tiny:", "unknown arch 'lenet'"]),
    ],
)
def test_unknown_model_source(capsys, prepared_dir, tmp_path, model, words):
    rc, err, out = extract(capsys, prepared_dir, tmp_path, model_spec(**model))
    line = one_error(err)
    assert rc == 2 and all(w in line for w in words), line
    assert_no_shard(out)
    print(line[:300])


def test_layer_that_is_not_a_feature_map(capsys, prepared_dir, tmp_path, factories):
    spec = model_spec(arch=None, factory="hostile_models:with_linear", layers=["1", "3"])
    rc, err, out = extract(capsys, prepared_dir, tmp_path, spec)
    line = one_error(err)
    assert rc == 2, err
    # the batch size is the calibration pass's or the extraction's: only the 5 features are fixed
    assert re.search(r"tiny: layer '3' outputs \(\d+, 5\), not a 4-D feature map \[N, C, H, W\]",
                     line), line
    assert_no_shard(out)
    print(line)


def _checkpoint(tmp_path: Path, obj, name="ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: _checkpoint(p, [torch.zeros(3)]), ["not a state dict", "got list"]),
        (lambda p: _checkpoint(p, {"epoch": 3, "lr": 0.1}),
         ["not a state dict", "got a dict with a non-tensor entry ('epoch': int)"]),
        (lambda p: _checkpoint(p, {}), ["not a state dict", "got an empty dict"]),
        (lambda p: (p / "text.pt").write_text("hello") and p / "text.pt",
         ["not a readable PyTorch checkpoint"]),
        (lambda p: _checkpoint(p, {"features.conv1.weight": torch.zeros(1)}),
         ["does not fit model 'tiny'", "Missing key(s)",
          "size mismatch for features.conv1.weight"]),
        (lambda p: p / "missing.pt", ["checkpoint file", "does not exist"]),
    ],
    ids=["list", "dict-of-numbers", "empty", "text", "wrong-shapes", "missing"],
)
def test_checkpoint_that_is_not_a_state_dict(capsys, prepared_dir, tmp_path, make, words):
    ckpt = make(tmp_path)
    rc, err, out = extract(capsys, prepared_dir, tmp_path, model_spec(checkpoint=str(ckpt)))
    line = one_error(err)
    assert rc == 2 and str(ckpt) in line and all(w in line for w in words), line
    assert_no_shard(out)
    print(line)


class _WritesMarker:
    """Unpickling this runs exec(): a checkpoint that carries code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# The refusal ends with the project's own sentence (never torch's advice to load unsafely).
PICKLED_END = ("that a plain state dict never contains, and loading them could run code. Save the "
               "weights alone, torch.save(model.state_dict(), path), and give that file as "
               "checkpoint")


def pickled_code_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"features.conv1.weight": torch.zeros(4, 3, 3, 3), "x": _WritesMarker(marker)},
               path)
    return path


def test_pickled_code_is_refused_and_never_runs(capsys, prepared_dir, tmp_path):
    # The payload is live: a plain (unsafe) load does run it.
    control = tmp_path / "control-marker"
    torch.load(pickled_code_checkpoint(tmp_path / "control.pt", control), weights_only=False)
    assert control.read_text() == "pwned"

    marker = tmp_path / "marker"
    ckpt = pickled_code_checkpoint(tmp_path / "evil.pt", marker)
    rc, err, out = extract(capsys, prepared_dir, tmp_path, model_spec(checkpoint=str(ckpt)))
    line = one_error(err)
    assert rc == 2 and f"error: {ckpt}: refused: the checkpoint holds pickled objects" in line
    assert line.endswith(PICKLED_END) and "(exec)" in line  # what was refused, our own advice
    assert "Re-running" not in err and "weights_only" not in err
    assert not marker.exists()
    assert_no_shard(out)
    # and the same through `cnnvis layers` (no dataset involved)
    rc, _, err = cnnvis(capsys, "layers", "--spec", json.dumps(model_spec(checkpoint=str(ckpt))))
    assert rc == 2 and "refused" in one_error(err) and not marker.exists()
    print(line)


def test_extraction_failing_midway_leaves_no_shard(capsys, prepared_dir, tmp_path, factories):
    spec = model_spec(arch=None, factory="hostile_models:fails_midway", layers=["relu"])
    out = tmp_path / "results" / "tiny" / "extract" / "0"
    with pytest.raises(RuntimeError, match="boom on batch 2"):
        cnnvis(capsys, "extract", "--prepared", prepared_dir, "--spec", json.dumps(spec),
               "--shard", 0, "--shards", 1, "--out", out, "--quiet")
    assert_no_shard(out)


def test_interrupted_prepare_leaves_nothing(capsys, dataset, tmp_path, monkeypatch):
    """A prepare that fails on the last image leaves no directory (and no temporary one)."""
    import cnnvis_pipeline.data.broden as broden

    real, calls = broden.BrodenDataset.read_image, []

    def flaky(self, i):
        calls.append(i)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(broden.BrodenDataset, "read_image", flaky)
    rc, _, err = cnnvis(capsys, "prepare", "--dataset", dataset, "--out", tmp_path / "out" / "p",
                        "--quiet")
    assert rc == 130 and "error: interrupted" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".p.lock"]  # the lock stays


# -- through the whole snakemake command line (tiny data) ---------------------------------------
def outputs(workdir: Path) -> list[str]:
    """Results and datasets a run left behind (not Snakemake's own metadata, not logs, not the
    content digests of the inputs in results/digests/ and their cache in
    {data_root}/manifests/, not lock files)."""
    return sorted(
        str(p.relative_to(workdir)) for p in workdir.rglob("*")
        if p.is_file()
        and not {".snakemake", "logs", "manifests"} & set(p.relative_to(workdir).parts)
        and p.name != "cfg.yaml" and not p.name.endswith(".lock")
        and not (p.parent.name == "digests" and p.name != "validated.txt"
                 and p.name != "prepared.json")
    )


@pytest.mark.slow
def test_workflow_malformed_config_names_the_key(tmp_path, workflow):
    cfg = base_config()
    cfg.setdefault("dissection", {})["shardz"] = 2
    proc = workflow.run(tmp_path / "a", cfg)
    assert proc.returncode != 0
    assert ("invalid configuration: config: dissection: unknown key(s) 'shardz'; allowed:"
            in proc.stderr), proc.stderr
    assert "Failed validating" not in proc.stderr  # not the whole schema
    assert "Traceback" not in proc.stdout + proc.stderr
    assert outputs(tmp_path / "a") == []

    cfg = base_config()
    cfg["models"] = {"a/b": cfg["models"]["tiny"]}
    proc = workflow.run(tmp_path / "b", cfg)
    assert proc.returncode != 0
    assert "invalid configuration: config: models: model name 'a/b' is not allowed" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert outputs(tmp_path / "b") == []


@pytest.mark.slow
def test_workflow_refuses_pickled_code_and_failed_extraction_leaves_nothing(
    tmp_path, factories, pristine, workflow
):
    """Two models on one tiny synth dataset: one with a code-carrying checkpoint, one whose
    forward pass fails on the second batch. Neither leaves a shard, a table or a marker."""
    marker = tmp_path / "marker"
    ckpt = pickled_code_checkpoint(tmp_path / "evil.pt", marker)
    cfg = base_config()
    cfg["dataset"] = {"path": str(pristine)}  # 8 images: two batches of 4
    cfg["models"] = {
        "evil": {"arch": "synthnet", "kwargs": {"width": 4}, "checkpoint": str(ckpt),
                 "layers": ["features.relu3"]},
        "midway": {"factory": "hostile_models:fails_midway", "layers": ["relu"]},
    }
    cfg["resources"].update(batch_size=4, device="cpu")
    env = workflow.env(factories)
    work = tmp_path / "w"
    proc = workflow.run(work, cfg, "--keep-going", env=env)
    assert proc.returncode != 0
    err = proc.stderr
    # The extraction builds the model first, which loads the checkpoint and refuses it.
    assert re.search(r"evil/extract_0\.log: error: \S*evil\.pt: refused: the checkpoint holds pickled",
                     err), err[-3000:]
    assert re.search(r"evil/extract_0\.log: error: .*" + re.escape(PICKLED_END) + "$", err, re.M)
    assert "Re-running" not in err
    assert re.search(r"midway/extract_0\.log: RuntimeError: hostile_models: boom on batch 2",
                     err), err[-3000:]
    assert not marker.exists()
    for model in ("evil", "midway"):
        assert not (work / "results" / model).exists() or looks_valid(work / "results" / model) == []
        extract_dir = work / "results" / model / "extract"
        assert not extract_dir.exists() or list(extract_dir.iterdir()) == []
    assert not (work / "results" / "summary").exists()


@pytest.mark.slow
def test_workflow_corrupt_image_stops_at_validation(dataset, tmp_path, workflow):
    rel = first_cell(dataset, "image")
    (dataset / "images" / rel).write_bytes(b"not a JPEG at all")
    cfg = base_config()
    cfg["dataset"] = {"path": str(dataset)}
    work = tmp_path / "w"
    proc = workflow.run(work, cfg)
    assert proc.returncode != 0
    assert re.search(rf"index\.csv: line 2: \S*images/{re.escape(rel)}: cannot decode image",
                     proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert outputs(work) == []  # no validated marker, no prepared arrays, no results
