"""Every category of the dataset in every table and figure, each in its one colour: the summary
table has a row per (model, layer, category) of the dataset, 0 where nothing detects it; the
summary, layer and series figures draw a category in tables.category_colors' colour; the mask of
a top image is outlined in black and white, no concept's colour."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cnnvis_pipeline.data.prepared import prepare_dataset
from cnnvis_pipeline.data.synth import generate_broden_synth
from cnnvis_pipeline.dissection.figures import plot_layer_detectors, plot_series
from cnnvis_pipeline.dissection.pipeline import run_summary
from cnnvis_pipeline.tables import CATEGORY_COLORS, category_colors
from cnnvis_pipeline.viz.images import mask_overlay

BRODEN = ["object", "part", "scene", "material", "texture", "color"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cats")
    generate_broden_synth(root / "synth", 6, 16, seed=2)
    return prepare_dataset(root / "synth", root / "prepared", progress=False)


def units_table(path, model, layer, rows):
    cols = {"model": [], "layer": [], "unit": [], "threshold": [], "concept": [], "label": [],
            "category": [], "iou": [], "detector": []}
    for u, (concept, label, category, iou) in enumerate(rows):
        for k, v in (("model", model), ("layer", layer), ("unit", u), ("threshold", 1.0),
                     ("concept", concept), ("label", label), ("category", category),
                     ("iou", iou), ("detector", iou > 0.04)):
            cols[k].append(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path)
    return path


def colors_in(png) -> set[tuple[int, int, int]]:
    a = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in c) for c in np.unique(a, axis=0)}


def rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))


def test_summary_table_lists_every_category_of_the_dataset(prepared, tmp_path):
    a = units_table(tmp_path / "m/a/units.parquet", "m", "a",
                    [("disc", 9, "object", 0.2), ("disc", 9, "object", 0.1),
                     ("red", 1, "color", 0.01)])
    b = units_table(tmp_path / "n/b/units.parquet", "n", "b", [("red", 1, "color", 0.3)])
    counts = run_summary([a, b], tmp_path / "detectors.parquet", tmp_path / "summary.png",
                         prepared=prepared)
    table = pq.read_table(tmp_path / "detectors.parquet").to_pandas()
    pd.testing.assert_frame_equal(table, counts.astype(table.dtypes.to_dict()))
    for _, g in table.groupby(["model", "layer"]):
        assert g["category"].tolist() == BRODEN  # the dataset's order, scene included
    m = table[table["model"] == "m"].set_index("category")
    assert m.loc["object", "detectors"] == 2 and m.loc["object", "unique_detectors"] == 1
    assert (m.drop(index="object")[["detectors", "unique_detectors"]] == 0).all().all()
    assert set(table["units"]) == {1, 3}
    # without the dataset: only the categories of the units' labels (the old behaviour)
    alone = run_summary([a, b], tmp_path / "d2.parquet")
    assert sorted(set(alone["category"])) == ["color", "object"]
    # the figure: each category's bars in its colour
    found = colors_in(tmp_path / "summary.png")
    assert rgb(CATEGORY_COLORS["object"]) in found and rgb(CATEGORY_COLORS["color"]) in found


def test_layer_and_series_figures_use_the_category_colours(tmp_path):
    units = pd.DataFrame({"unit": [0, 1, 2], "concept": ["disc", "grass", "red"],
                          "label": [9, 5, 1], "category": ["object", "material", "color"],
                          "iou": [0.2, 0.1, 0.05], "detector": [True, True, True]})
    plot_layer_detectors(units, tmp_path / "layer.png", "m a", BRODEN)
    found = colors_in(tmp_path / "layer.png")
    for c in ("object", "material", "color"):
        assert rgb(CATEGORY_COLORS[c]) in found, c
    rows = [{"model": f"s-{k}", "layer": "a", "category": c, "units": 4, "detectors": k,
             "unique_detectors": k} for k in range(3) for c in BRODEN]
    plot_series(pd.DataFrame(rows), "s", ["s-0", "s-1", "s-2"], tmp_path / "series.png")
    found = colors_in(tmp_path / "series.png")
    assert sum(rgb(CATEGORY_COLORS[c]) in found for c in BRODEN) == len(BRODEN)


def test_category_colors_are_fixed_and_distinct():
    assert category_colors(["color", "object"]) == {"color": CATEGORY_COLORS["color"],
                                                    "object": CATEGORY_COLORS["object"]}
    other = category_colors(["zeta", "object", "alpha"])
    assert other["object"] == CATEGORY_COLORS["object"]
    assert category_colors(["alpha"])["alpha"] == other["alpha"] != other["zeta"]
    assert len(set(category_colors(BRODEN).values())) == 6


def test_mask_outline_is_black_and_white_and_outside_is_dimmed():
    image = np.full((12, 12, 3), (255, 214, 0), np.uint8)  # a yellow image
    mask = np.zeros((12, 12), bool)
    mask[3:9, 3:9] = True
    out = mask_overlay(image, mask)
    inner = np.zeros_like(mask)
    inner[4:8, 4:8] = True
    edge = mask & ~inner
    assert {tuple(v) for v in out[edge]} == {(0, 0, 0), (255, 255, 255)}
    assert (out[inner] == image[inner]).all()
    assert (out[~mask] == (image[~mask] * 0.3).astype(np.uint8)).all()
