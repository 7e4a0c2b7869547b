"""Text from a dataset or a config is never interpreted by a renderer.

Concept, category, layer and model names holding `$` (an unbalanced `$\\notacommand{$` and a
balanced `US$5 ... $10`), a backslash, `_{}` and `<script>` go through every figure function: the
figures are written, and every text the figure holds is drawn as the plain string (matplotlib's
math parser never sees it). In the summary page the same names come out HTML-escaped.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cnnvis_pipeline import fileio
from cnnvis_pipeline.dissection import figures as dfig
from cnnvis_pipeline.reports import figures as rfig

HOSTILE = ["red $\\notacommand{$", "US$5 ... $10", "back\\slash", "x_{sub}^2", "<script>alert(1)</script>"]


@pytest.fixture
def drawn(monkeypatch):
    """Every text of every figure saved, with whether matplotlib would parse it as math."""
    texts: list[tuple[str, object]] = []

    def record(fig, path, **kw):
        from matplotlib.text import Text

        for t in fig.findobj(Text):
            if t.get_text():
                texts.append((t.get_text(), t._preprocess_math(t.get_text())[1]))
        return fileio.save_figure(fig, path, **kw)

    monkeypatch.setattr(dfig, "save_figure", record)
    monkeypatch.setattr(rfig, "save_figure", record)
    return texts


def _png_ok(path) -> None:
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_hostile_names_are_plain_text_in_every_figure(tmp_path, drawn):
    cats = HOSTILE[:3]
    units = pd.DataFrame({
        "unit": np.arange(10), "detector": [True] * 8 + [False] * 2,
        "category": [cats[i % 3] for i in range(10)],
        "concept": [HOSTILE[i % 5] for i in range(10)], "label": [i % 5 for i in range(10)],
    })
    dfig.plot_layer_detectors(units, tmp_path / "detectors.png", "layer $a$_{1}", cats)
    counts = pd.DataFrame({"model": [HOSTILE[1]] * 3, "layer": [HOSTILE[0]] * 3,
                           "category": cats, "unique_detectors": [1, 2, 3]})
    dfig.plot_summary(counts, tmp_path / "summary.png")
    iou = pd.DataFrame({"layer": [HOSTILE[3]] * 12, "unit": np.repeat(np.arange(4), 3),
                        "category": cats * 4, "iou": np.linspace(0.01, 0.3, 12)})
    rfig.plot_iou_distribution(iou, tmp_path / "iou.png", HOSTILE[4], cats,
                               dict(zip(cats, ["#112233", "#445566", "#778899"], strict=True)),
                               iou_threshold=0.04)
    for name in ("detectors.png", "summary.png", "iou.png"):
        _png_ok(tmp_path / name)
    shown = {text for text, _ in drawn}
    for name in HOSTILE:  # every hostile name is drawn, as itself
        assert any(name in text for text in shown), name
    assert "layer $a$_{1}: 8/10 units are detectors, 8 unique concepts" in shown
    parsed = [text for text, math in drawn if math]
    assert parsed == [], parsed


PROV = {"cnnvis_pipeline_version": "0.1.0", "torch_version": "2", "torchvision_version": "0",
        "config_digest": "c0ffee" * 10, "dataset_digest": "da7a" * 16, "checkpoint_sha256": None,
        "precision": "fp32", "device": "cpu",
        "dissection": {"quantile": 0.005, "iou_threshold": 0.04, "precision": "fp32", "top_k": 3,
                       "statistics": {"enabled": False}}}


def test_hostile_names_are_escaped_in_the_summary_page(tmp_path):
    from cnnvis_pipeline.reports.html import build_summary_page

    summary = tmp_path / "results" / "summary"
    summary.mkdir(parents=True)
    n = len(HOSTILE)
    table = pa.table({"model": ["tiny"] * n, "layer": ["features.relu4"] * n,
                      "category": HOSTILE, "units": [4] * n, "detectors": [1] * n,
                      "unique_detectors": [1] * n})
    pq.write_table(table.replace_schema_metadata(
        {b"cnnvis.provenance": json.dumps(PROV).encode()}), summary / "detectors.parquet")
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(summary / "unique_detectors.png")
    out = build_summary_page({}, summary / "detectors.parquet", summary / "unique_detectors.png",
                             summary / "index.html")
    text = out.read_text()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    for name in HOSTILE[:4]:  # drawn as themselves (only <, >, &, quotes are escaped)
        assert name.replace("&", "&amp;") in text, name
