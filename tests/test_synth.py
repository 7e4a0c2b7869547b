"""broden-synth: deterministic, complete Broden format, read by the same reader."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from cnnvis_pipeline.data.broden import load_broden
from cnnvis_pipeline.data.synth import generate_broden_synth
from cnnvis_pipeline.errors import CnnvisError


def test_generator_is_deterministic_and_seed_dependent(tmp_path):
    a = generate_broden_synth(tmp_path / "a", n_images=12, image_size=32, seed=7)
    b = generate_broden_synth(tmp_path / "b", n_images=12, image_size=32, seed=7)
    c = generate_broden_synth(tmp_path / "c", n_images=12, image_size=32, seed=8)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors and len(match) == len(files)
    assert (a / "index.csv").read_bytes() != (c / "index.csv").read_bytes()


def test_synth_has_all_categories_layered_parts_and_gaps(synth_dir):
    ds = load_broden(synth_dir)
    assert set(ds.pixel_categories) == {"color", "object", "part", "material"}
    assert set(ds.image_categories) == {"scene", "texture"}
    assert len(ds.concepts) >= 30
    assert any(len(r.pixel.get("part", [])) == 2 for r in ds.records)  # two layered planes
    for cat in ("part", "material"):
        assert any(cat not in r.pixel for r in ds.records)  # missing from some images
    assert any("texture" not in r.labels for r in ds.records)
    grass = [c.category for c in ds.concepts if c.name == "grass"]
    assert grass == ["object", "material"]  # one label, two categories
    planes = ds.read_planes(0)
    assert all(p.shape[1:] == (16, 16) for p in planes.values())
    assert ds.read_image(0).shape == (32, 32, 3)
    assert np.unique(planes["color"]).size >= 1


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(CnnvisError, match="already exists"):
        generate_broden_synth(tmp_path / "x", n_images=2, image_size=16)
