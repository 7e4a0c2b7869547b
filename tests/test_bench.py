"""Smoke tests of the benchmark (no timing assertions) and of its dataset generator."""

from __future__ import annotations

import json

import numpy as np

from cnnvis_pipeline import bench
from cnnvis_pipeline.bench.bigsynth import generate_broden_big
from cnnvis_pipeline.data.broden import load_broden
from cnnvis_pipeline.data.prepared import PreparedDataset, prepare_dataset, prepare_parallel


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


def test_bigsynth_is_broden_and_parallel_prepare_equals_serial(tmp_path):
    root = generate_broden_big(tmp_path / "broden", 40, 16, seed=3, workers=2, chunk=8)
    ds = load_broden(root)
    assert len(ds) == 40
    assert ds.categories == ["object", "part", "scene", "material", "texture", "color"]
    assert set(ds.pixel_categories) == {"object", "part", "material", "color"}
    assert set(ds.image_categories) == {"scene", "texture"}
    assert max(len(r.pixel.get("part", [])) for r in ds.records) == 2
    assert 1100 <= len(ds.label_names) <= 1300 and len(ds.concepts) > len(ds.label_names)

    serial = prepare_dataset(root, tmp_path / "serial", progress=False)
    joined = prepare_parallel(root, tmp_path / "joined", workers=2, chunk=8)
    a, b = PreparedDataset(serial), PreparedDataset(joined)
    assert a.meta == b.meta
    for name in ("images", "planes", "slots", "present", "plane_category"):
        assert np.array_equal(np.load(serial / f"{name}.npy"), np.load(joined / f"{name}.npy")), name

    # Same arguments, same bytes (whatever the number of worker processes).
    again = generate_broden_big(tmp_path / "again", 40, 16, seed=3, workers=1, chunk=8)
    for rel in ("index.csv", "label.csv", "images/big/00002/0000017_part_2.png"):
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
