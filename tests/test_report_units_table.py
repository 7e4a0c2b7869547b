"""The report's table of every unit, the cards of every detector, the link back to the summary,
formulas on the summary page, the readable views (DeconvNet tile scale and contrast, one
notation in the inversion caption) and the figures' empty and all-zero cases.
The tables are synthetic (tests/test_report_html.py's layer of four units)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_report_html import LAYER, PROV, Page, png, prepared, report, write  # noqa: F401

from cnnvis_pipeline.reports.html import build_model_report, build_summary_page
from cnnvis_pipeline.tables import read_manifest, write_manifest


def rows_of(text: str) -> dict[int, str]:
    """unit -> the visible text of its row in the layer's units table."""
    table = text[text.index('<table class="sortable units"'):]
    table = table[:table.index("</table>")]
    out = {}
    for m in re.finditer(r'<tr data-unit="(\d+)"[^>]*>(.*?)</tr>', table, re.S):
        out[int(m.group(1))] = " ".join(re.sub(r"<[^>]+>", " ", m.group(2)).split())
    return out


def significance(d) -> None:
    rows = {"model": [], "layer": [], "unit": [], "rank": [], "concept": [], "category": [],
            "iou": [], "detector_fdr": []}
    for u in range(4):
        for rank, (c, cat) in enumerate([("disc", "object"), ("wheel", "part"),
                                         ("grass", "material")]):
            for k, v in (("model", "tiny"), ("layer", LAYER), ("unit", u), ("rank", rank),
                         ("concept", c), ("category", cat), ("iou", 0.1 - 0.02 * rank - 0.001 * u),
                         ("detector_fdr", False)):
                rows[k].append(v)
    write(d / "significance.parquet", rows, PROV)


def test_every_unit_is_in_the_table_with_the_tables_values(tmp_path, prepared):  # noqa: F811
    _, _, out = report(tmp_path, prepared, extras=True)
    d = tmp_path / "results" / "tiny" / LAYER
    significance(d)
    build_model_report("tiny", {LAYER: d}, out, top_images=3, prepared=prepared)
    text = out.read_text()
    rows = rows_of(text)
    units = pq.read_table(d / "units.parquet").to_pandas()
    assert sorted(rows) == units["unit"].tolist() == [0, 1, 2, 3]
    for r in units.itertuples():
        row = rows[r.unit]
        assert row.startswith(f"{r.unit} {r.concept} {r.category} {r.iou:.3f} "
                              f"[{r.iou_low:.3f}, {r.iou_high:.3f}]"), row
        assert ("detector" in row) == bool(r.detector)
    assert "wheel 0.080, grass 0.060" in rows[0]  # ranks 1 and 2 of significance.parquet
    assert "FDR" in rows[0] and "not significant" in rows[1]
    assert ("(disc AND red) OR box IoU 0.310 [0.280, 0.340], p = 0.010, q = 0.020" in rows[0]
            and "not significant" not in rows[0].split("box")[1])
    assert rows[1].endswith("red AND NOT zigzag IoU 0.070 [0.030, 0.110], p = 0.400, q = 0.400 "
                            "not significant sparse 0")
    # units 0-2 have cards, unit 3 has none: only the first three link
    links = re.findall(r'<td data-value="(\d)"><a href="#([\w-]+)">', text)
    assert links == [(str(u), f"features-relu4-unit-{u}") for u in (0, 1, 2)]
    for _, target in links:
        assert f'id="{target}"' in text
    assert "All 4 units" in text and '<select class="units-show"' in text


def test_formulas_without_their_statistics_are_not_shown(tmp_path, prepared):  # noqa: F811
    _, _, out = report(tmp_path, prepared, extras=True)
    d = tmp_path / "results" / "tiny" / LAYER
    f = pq.read_table(d / "formulas.parquet").to_pandas()
    write(d / "formulas.parquet", f.drop(columns=["p_value", "q_value", "formula_detector"])
          .to_dict("list"), PROV)
    build_model_report("tiny", {LAYER: d}, out, top_images=3, prepared=prepared)
    text = out.read_text()
    assert "disc AND red" not in text and "red AND NOT zigzag" not in text
    assert "formulas.parquet has no statistics (p_value, q_value, formula_detector)" in text


def test_every_detector_gets_a_card_with_its_top_images(tmp_path, prepared):  # noqa: F811
    _, _, out = report(tmp_path, prepared, extras=True)
    d = tmp_path / "results" / "tiny" / LAYER
    units = pq.read_table(d / "units.parquet").to_pandas()
    units.loc[units["unit"] == 3, "detector"] = True  # a detector beyond the selected units
    write(d / "units.parquet", units.to_dict("list"), PROV)
    m = read_manifest(d / "viz" / "manifest.json")
    top = dict(m["units"][0]["views"]["top_images"])
    m["units"].append({"unit": 3, "requested": False, "selected": False,
                       "dataset_top_activation": 2.0, "views": {"top_images": top}})
    write_manifest(d / "viz" / "manifest.json", m)
    build_model_report("tiny", {LAYER: d}, out, top_images=2, prepared=prepared)
    text = out.read_text()
    page = Page(text)
    assert set(page.cards) == {0, 1, 2, 3}
    assert "top images only" in page.card(3) and "top images only" not in page.card(0)
    assert len(re.findall(r'alt="unit 3: top image \d', text)) == 2
    assert "activation maximisation" not in page.card(3)
    assert "3 with every view: the 3 highest IoUs and the requested ones; 1 more detectors" in (
        page.all_text())
    assert '<a href="#features-relu4-unit-3">3</a>' in text


def test_the_report_links_back_to_the_summary_page(tmp_path, prepared):  # noqa: F811
    _, _, out = report(tmp_path, prepared, extras=False)
    d = tmp_path / "results" / "tiny" / LAYER
    build_model_report("tiny", {LAYER: d}, out, top_images=3,
                       summary_page=tmp_path / "results" / "summary" / "index.html")
    assert re.search(r'<nav><a class="summary-link" href="../../summary/index.html">',
                     out.read_text())


def summary(tmp_path, prepared, formulas):  # noqa: F811
    _, _, page = report(tmp_path, prepared, extras=True)
    s = tmp_path / "results" / "summary"
    write(s / "detectors.parquet", {"model": ["tiny"], "layer": [LAYER], "category": ["object"],
                                    "units": [4], "detectors": [1], "unique_detectors": [1]}, PROV)
    png(s / "unique_detectors.png", 30, 20)
    f = [tmp_path / "results" / "tiny" / LAYER / "formulas.parquet"] if formulas else []
    out = build_summary_page({"tiny": page}, s / "detectors.parquet", s / "unique_detectors.png",
                             s / "index.html", prepared=prepared, formulas=f,
                             units=[tmp_path / "results" / "tiny" / LAYER / "units.parquet"])
    return out.read_text()


def test_the_summary_page_mentions_formulas_when_there_are_some(tmp_path, prepared):  # noqa: F811
    text = summary(tmp_path, prepared, formulas=True)
    assert "Compositional explanations" in text
    assert re.search(r'<td class="formulas" data-value="2"><a class="table-link" '
                     rf'href="../tiny/{LAYER}/formulas.parquet">2</a></td>'
                     r'<td class="formula-detectors" data-value="1">1</td>', text)
    plain = summary(tmp_path / "b", prepared, formulas=False)
    plain = Page(plain[plain.index("<main>"):plain.index("</main>")]).all_text()
    assert "formula" not in plain.lower() and "Compositional" not in plain


def test_deconvnet_tiles_at_96_px_or_more_and_one_notation_for_inversion(tmp_path, prepared):  # noqa: F811
    text, page, _ = report(tmp_path, prepared, extras=False)
    # three 7-px tiles per row (2-px gaps) in two rows: 7 px tiles shown 14x = 98 px
    imgs = re.findall(r'<img class="px strip deconv" src="[^"]+" width="(\d+)" height="(\d+)" '
                      r'data-tile="(\d+)"', text)
    assert imgs and all(t == "7" and int(h) == 16 * 14 and int(w) == 25 * 14
                        for w, h, t in imgs), imgs
    caption = page.all_text()
    caption = caption[caption.index("Each image x0 reconstructed"):]
    caption = caption[:caption.index("Table: inversion.parquet")]
    assert "Σi,j=1…n ‖Φ(xi) − Φ(xj)‖²" in caption and "‖Φ(x*) − Φ(x0)‖² / ‖Φ(x0)‖²" in caption
    for ascii_math in ("sum_", "Phi", "||", "^2"):
        assert ascii_math not in caption, ascii_math


def test_deconvnet_projection_tiles_are_contrast_normalised_each():
    from cnnvis_pipeline.viz.views.deconvnet import contrast_tile

    rng = np.random.default_rng(0)
    weak = rng.normal(0, 1e-4, (18, 18, 3))
    weak[0, 0] = 5.0  # one outlier that a max-scaling would let wash out the rest to grey
    tile = contrast_tile(weak)
    assert tile.dtype == np.uint8 and tile.shape == (18, 18, 3)
    assert tile[1:, 1:].std() > 20  # the weak structure is visible
    assert abs(float(np.median(tile)) - 128) <= 1  # the median at grey
    scaled = contrast_tile(weak * 1e6)
    assert np.abs(scaled.astype(int) - tile.astype(int)).max() <= 1  # scale-free
    assert (contrast_tile(np.zeros((5, 4, 3))) == 128).all()


def captured_figures(monkeypatch):
    from cnnvis_pipeline.dissection import figures

    figs = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, **kw: figs.append(fig))
    return figures, figs


def test_no_detectors_figure_draws_no_axes(monkeypatch, tmp_path):
    figures, figs = captured_figures(monkeypatch)
    units = pd.DataFrame({"unit": [0, 1], "detector": [False, False], "category": ["object"] * 2,
                          "concept": ["disc", "box"], "label": [1, 2]})
    figures.plot_layer_detectors(units, tmp_path / "d.png", "tiny relu4", ["object"])
    [ax] = figs[0].axes
    assert not ax.axison
    assert [t.get_text() for t in ax.texts] == ["no detectors"]


def test_summary_chart_of_zeros_starts_at_zero(monkeypatch, tmp_path):
    figures, figs = captured_figures(monkeypatch)
    counts = pd.DataFrame({"model": ["m"] * 2, "layer": ["l"] * 2, "category": ["object", "part"],
                           "unique_detectors": [0, 0]})
    figures.plot_summary(counts, tmp_path / "s.png")
    low, high = figs[0].axes[0].get_ylim()
    assert low == 0 and high >= 1
    assert all(float(t) == int(t) for t in figs[0].axes[0].get_yticks())


def test_sweep_fdr_lines_are_drawn_above_the_plain_ones(monkeypatch, tmp_path):
    figures, figs = captured_figures(monkeypatch)
    sweep = pd.DataFrame({"iou_threshold": [0.02, 0.04, 0.06], "category": ["object"] * 3,
                          "detectors": [5, 3, 1], "unique_detectors": [5, 3, 1],
                          "detectors_fdr": [5, 3, 1], "unique_detectors_fdr": [5, 3, 1]})
    figures.plot_sweep(sweep, tmp_path / "w.png", "tiny relu4", 0.04)
    lines = {ln.get_label(): ln for ln in figs[0].axes[0].get_lines()
             if not ln.get_label().startswith("_")}
    fdr = [ln for k, ln in lines.items() if k.endswith("(FDR)")]
    plain = [ln for k, ln in lines.items() if not k.endswith("(FDR)")]
    assert len(fdr) == len(plain) == 2
    assert min(ln.get_zorder() for ln in fdr) > max(ln.get_zorder() for ln in plain)


def test_manifest_records_which_units_got_every_view(tmp_path, prepared):  # noqa: F811
    _, _, _ = report(tmp_path, prepared, extras=False)
    m = json.loads((tmp_path / "results" / "tiny" / LAYER / "viz" / "manifest.json").read_text())
    del m["units"][0]["selected"]
    with pytest.raises(Exception, match="'selected' is a required property"):
        write_manifest(tmp_path / "m.json", m)


def test_the_formulas_permutation_count_is_stated(tmp_path, prepared):  # noqa: F811
    _, _, out = report(tmp_path, prepared, extras=True)
    d = tmp_path / "results" / "tiny" / LAYER
    f = pq.read_table(d / "formulas.parquet").to_pandas()
    prov = dict(PROV, compositional=json.dumps({"beam_size": 5, "null_replicates": 100}))
    write(d / "formulas.parquet", f.to_dict("list"), prov)
    build_model_report("tiny", {LAYER: d}, out, top_images=3, prepared=prepared)
    assert ("A formula's p-value comes from the same search on 100 label permutations, so it is "
            "never below 1/101.") in Page(out.read_text()).all_text()


def test_methods_say_when_the_labels_are_a_segmenters_predictions(tmp_path, prepared):  # noqa: F811
    meta = json.loads((prepared / "meta.json").read_text())
    words = report(tmp_path / "a", prepared, extras=False)[1].all_text()
    assert "predictions" not in words  # human annotations: nothing said
    meta.update(labels="predictions", source_info={
        "kind": "colour", "labels": "predictions",
        "base": {"kind": "segmenter", "labels": "predictions", "factory": "segs:build",
                 "checkpoint_sha256": "5eed" * 16}})
    (prepared / "meta.json").write_text(json.dumps(meta))
    words = report(tmp_path / "b", prepared, extras=False)[1].all_text()
    assert ("labels a segmentation model's predictions, not human annotations (segmenter "
            "segs:build, checkpoint sha256 5eed5eed5eed5eed): an IoU here measures agreement "
            "with that model's masks") in words
    assert "source colour (docs/DATA_SOURCES.md)" in words
    meta.update(labels="annotations", source_info={
        "kind": "concepts", "labels": "annotations", "base": {"kind": "ade20k"},
        "extras": [{"kind": "colour", "labels": "computed", "rule": "nearest of 11 prototypes"}]})
    (prepared / "meta.json").write_text(json.dumps(meta))
    words = report(tmp_path / "c", prepared, extras=False)[1].all_text()
    assert ("source concepts (docs/DATA_SOURCES.md); colour concepts computed from the pixels: "
            "nearest of 11 prototypes") in words and "predictions" not in words


def test_thumbnails_of_the_other_detectors_fit_96_px():
    from cnnvis_pipeline.viz.images import fit
    from cnnvis_pipeline.viz.views.top_images import THUMB_PX

    a = np.zeros((160, 224, 3), np.uint8)
    a[:, 112:] = 200  # right half bright: the area average keeps it
    t = fit(a, THUMB_PX)
    assert t.shape == (69, 96, 3) and t.dtype == np.uint8
    assert (t[:, :47] == 0).all() and (t[:, 49:] == 200).all()
    small = np.ones((64, 64, 3), np.uint8)
    assert fit(small, THUMB_PX) is small
