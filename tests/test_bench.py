"""The benchmark's figures (no timing assertions: how they relate, and what a CPU run reports)
and its dataset generator."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from cnnvis_pipeline import bench
from cnnvis_pipeline.bench.bigsynth import generate_broden_big
from cnnvis_pipeline.data import prepared as prepared_mod
from cnnvis_pipeline.data.broden import load_broden
from cnnvis_pipeline.data.prepared import PreparedDataset, prepare_dataset


def test_bench_prints_one_json_line(tmp_path, capsys):
    rc = bench.main(["--images", "16", "--size", "32", "--device", "cpu", "--cache",
                     str(tmp_path / "cache"), "--batch-size", "8", "--workers", "1"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    assert out["images"] == 16 and out["device"] == "cpu"
    assert out["layers"] == ["layer3", "layer4"]
    assert (out["batch_size"], out["precision"], out["statistics"]) == (8, "fp32", "on")
    # one round: the reported figure is that round's; the ratio is of the unrounded times
    assert out["forward_runs_s"] == [out["forward_s"]]
    assert out["dissect_runs_s"] == [out["dissect_s"]]
    assert out["ratio"] == pytest.approx(out["dissect_s"] / out["forward_s"], rel=0.05, abs=2e-3)
    # a CPU run: no GPU memory, activations in files
    assert out["peak_gpu_mb"] == 0.0 and out["peak_gpu_forward_mb"] == 0.0
    assert out["keep_on_device"] is False and out["verified"] is None
    assert out["device_name"].endswith(f"({torch.get_num_threads()} threads)")
    assert set(out["detectors"]) == {"layer3", "layer4"}
    assert not out["cached"]
    # The second run finds the prepared dataset in the cache.
    assert bench.main(["--images", "16", "--size", "32", "--device", "cpu", "--cache",
                       str(tmp_path / "cache"), "--batch-size", "8", "--layers", "layer4",
                       "--no-forward", "--statistics", "compare"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["cached"] and again["layers"] == ["layer4"]
    assert again["gen_s"] == 0.0 and again["prep_s"] == 0.0
    # --no-forward: no forward figures, and no ratio to them
    assert again["forward_runs_s"] == [] and again["forward_s"] is None and again["ratio"] is None
    # --statistics compare: the dissection with and without statistics, and the cost between
    cost = again["dissect_s"] / again["dissect_nostats_s"] - 1
    assert abs(again["statistics_cost"] - cost) < 0.01
    assert set(again["detectors_fdr"]) == {"layer4"}
    assert again["detectors_fdr"]["layer4"] <= again["detectors"]["layer4"]


def test_bigsynth_is_broden_and_parallel_prepare_equals_serial(tmp_path, monkeypatch):
    root = generate_broden_big(tmp_path / "broden", 40, 16, seed=3, workers=2, chunk=8)
    ds = load_broden(root)
    assert len(ds) == 40
    assert ds.categories == ["object", "part", "scene", "material", "texture", "color"]
    assert set(ds.pixel_categories) == {"object", "part", "material", "color"}
    assert set(ds.image_categories) == {"scene", "texture"}
    assert max(len(r.pixel.get("part", [])) for r in ds.records) == 2
    # the vocabulary bigsynth documents: 11 colours, 584 objects, 84 own parts, 25 own
    # materials, 468 scenes, 47 textures; 150 objects are also parts and 7 also materials
    assert len(ds.label_names) == 11 + 584 + 84 + 25 + 468 + 47
    assert Counter(c.category for c in ds.concepts) == {
        "object": 584, "part": 150 + 84, "scene": 468, "material": 7 + 25, "texture": 47,
        "color": 11}

    serial = prepare_dataset(root, tmp_path / "serial", progress=False)
    monkeypatch.setattr(prepared_mod, "CHUNK", 7)  # 6 tasks, the last one short
    joined = prepare_dataset(root, tmp_path / "joined", workers=2, progress=False)
    assert PreparedDataset(serial).meta == PreparedDataset(joined).meta
    for f in sorted(serial.iterdir()):
        assert f.read_bytes() == (joined / f.name).read_bytes(), f.name

    # Same arguments, same bytes (whatever the number of worker processes).
    again = generate_broden_big(tmp_path / "again", 40, 16, seed=3, workers=1, chunk=8)
    for rel in ("index.csv", "label.csv", "images/big/00002/0000017_part_2.png"):
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_prepare_benchmark_times_both_preparations(tmp_path, capsys):
    from cnnvis_pipeline.bench import prepare as bench_prepare

    assert bench_prepare.main(["--images", "24", "--size", "32", "--cache", str(tmp_path),
                               "--workers", "2", "--forward-images", "8",
                               "--batch-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prepare_identical"] is True and out["workers"] == 2
    assert out["prepare_s"] == out["prepare_2_s"]  # the figure is the 2-worker preparation
    assert out["forward_images"] == 8 and out["forward_extrapolated"] is True
    assert abs(out["forward_s"] - out["forward_timed_s"] * 24 / 8) < 0.005  # rate x 24 images
    assert abs(out["prepare_over_forward"] - out["prepare_s"] / out["forward_s"]) < 0.002
    root = next(tmp_path.glob("broden-big-*"))
    assert sorted(p.name for p in root.iterdir()) == ["broden", "prepared"]  # serial copy removed
    assert out["prepared_bytes"] == sum(f.stat().st_size for f in (root / "prepared").iterdir())
