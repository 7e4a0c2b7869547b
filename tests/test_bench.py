"""Smoke tests of the benchmark (no timing assertions) and of its dataset generator."""

from __future__ import annotations

import json

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
    for key in ("forward_s", "dissect_s", "load_s", "ratio", "peak_rss_mb", "peak_gpu_mb"):
        assert isinstance(out[key], (int, float)), key
    assert out["forward_s"] > 0 and out["dissect_s"] > 0 and out["peak_rss_mb"] > 0
    assert not out["cached"]
    # The second run finds the prepared dataset in the cache.
    assert bench.main(["--images", "16", "--size", "32", "--device", "cpu", "--cache",
                       str(tmp_path / "cache"), "--batch-size", "8", "--layers", "layer4",
                       "--no-forward", "--statistics", "compare"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["cached"] and again["layers"] == ["layer4"]
    # --statistics compare: the dissection with and without statistics, and the cost between
    assert again["dissect_nostats_s"] > 0 and again["statistics_s"] > 0
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
    assert 1100 <= len(ds.label_names) <= 1300 and len(ds.concepts) > len(ds.label_names)

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
    assert out["prepare_2_s"] > 0 and out["prepare_1_s"] > 0 and out["validate_s"] > 0
    assert out["forward_images"] == 8 and out["forward_extrapolated"] is True
    assert abs(out["forward_s"] - out["forward_timed_s"] * 24 / 8) < 0.005  # rate x 24 images
    assert abs(out["prepare_over_forward"] - out["prepare_s"] / out["forward_s"]) < 0.002
    # 24 images x (32 x 32 x 3 + 5 planes x 16 x 16 x 2 bytes) + headers and the small arrays
    assert out["prepared_bytes"] > 24 * (32 * 32 * 3 + 5 * 16 * 16 * 2)
    left = sorted(p.name for p in next(tmp_path.glob("broden-big-*")).iterdir())
    assert left == ["broden", "prepared"]  # the serial copy is removed
