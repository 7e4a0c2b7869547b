"""The HTML reports from synthetic tables (no model, no browser): the Methods values, every
category with its fixed colour, the flags (sparse/dead units, AM below the dataset's top,
detector but not significant), the columns other stages add when present and their absence
tolerated, a refused view noted once per layer, the links to the tables behind the figures."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.reports.format import fmt, fmt_t, pct
from cnnvis_pipeline.reports.html import build_model_report, build_summary_page
from cnnvis_pipeline.tables import (
    CATEGORY_COLORS,
    MANIFEST_VERSION,
    category_colors,
    write_manifest,
)

CATEGORIES = [("object", "pixel"), ("part", "pixel"), ("scene", "image"), ("material", "pixel"),
              ("texture", "image"), ("color", "pixel")]
CONCEPTS = [("disc", "object", 1), ("box", "object", 2), ("wheel", "part", 3),
            ("beach", "scene", 4), ("grass", "material", 5), ("grass", "object", 5),
            ("zigzag", "texture", 6), ("red", "color", 7)]
LAYER = "features.relu4"
PROV = {"cnnvis_pipeline_version": "0.1.0", "torch_version": "9.9.9", "torchvision_version":
        "8.8.8", "config_digest": "c0ffee" * 10, "dataset_digest": "da7a" * 16,
        "checkpoint_sha256": None, "precision": "bf16", "device": "cuda:0",
        "dissection": {"quantile": 0.005, "iou_threshold": 0.04, "precision": "fp32",
                       "top_k": 3, "statistics": {"enabled": True}}}
AM = {"steps": 17, "size": 32, "lr": 0.05, "seed": 0, "preset": "default"}
INVERSION = {"images": 1, "steps": 5, "lr": 0.01, "lambda_tv": None, "lambda_alpha": 1e-4,
             "layers": {}, "seed": 0}


def write(path: Path, columns: dict, prov: dict | None = None) -> None:
    table = pa.table(columns)
    if prov is not None:
        table = table.replace_schema_metadata({b"cnnvis.provenance": json.dumps(prov).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def png(path: Path, w: int, h: int, value: int = 90) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)
    return path.name


@pytest.fixture
def prepared(tmp_path) -> Path:
    d = tmp_path / "prepared"
    d.mkdir()
    meta = {"categories": [{"name": n, "kind": k} for n, k in CATEGORIES],
            "concepts": [{"name": n, "category": c, "label": lab} for n, c, lab in CONCEPTS],
            "n_images": 10, "images": [f"synth/{i:06d}.jpg" for i in range(10)],
            "splits": ["train"] * 9 + ["val"], "image_size": [16, 16], "seg_size": [8, 8],
            "digest": "da7a" * 16}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def make_layer(root: Path, *, extras: bool, deconv_error: str | None = None) -> Path:
    """Four units: 0 a detector (object/disc), 1 a sparse detector (T_k = 0; color/red),
    2 a dead unit, 3 a plain one; units 0-2 visualised (3 images of 16 px each)."""
    d = root / "tiny" / LAYER
    units = {"model": ["tiny"] * 4, "layer": [LAYER] * 4, "unit": np.arange(4, dtype=np.int32),
             "threshold": [1.23456, 0.0, 0.0, 0.5], "concept": ["disc", "red", "box", "beach"],
             "label": np.array([1, 7, 2, 4], np.int32),
             "category": ["object", "color", "object", "scene"],
             "iou": [0.2, 0.05, 0.0, 0.01], "detector": [True, True, False, False]}
    if extras:
        units.update(active_fraction=[0.005, 0.0002, 0.0, 0.005],
                     activity=["ok", "sparse", "dead", "ok"],
                     iou_low=[0.15, 0.01, 0.0, 0.0], iou_high=[0.25, 0.09, 0.0, 0.03],
                     p_value=[0.0001, 0.3, 1.0, 0.9], q_value=[0.0004, 0.6, 1.0, 1.0],
                     detector_fdr=[True, False, False, False])
    write(d / "units.parquet", units, PROV)
    iou_rows = {"model": [], "layer": [], "unit": [], "concept": [], "label": [], "category": [],
                "iou": []}
    for u in range(4):
        for k, (n, c, lab) in enumerate(CONCEPTS):
            for key, v in (("model", "tiny"), ("layer", LAYER), ("unit", u), ("concept", n),
                           ("label", lab), ("category", c), ("iou", 0.01 * ((u + k) % 5))):
                iou_rows[key].append(v)
    write(d / "iou.parquet", iou_rows, PROV)
    write(d / "thresholds.parquet", {"unit": np.arange(4, dtype=np.int32),
                                     "quantile": [0.005] * 4,
                                     "threshold": units["threshold"]}, PROV)
    am = {"model": ["tiny"] * 3, "layer": [LAYER] * 3, "unit": np.arange(3, dtype=np.int32),
          "achieved_activation": [3.0, 0.1, 0.0], "dataset_top_activation": [2.0, 0.4, 0.0],
          "activation_ratio": [1.5, 0.25, float("nan")]}
    write(d / "activation_max.parquet", am, PROV)
    write(d / "inversion.parquet", {"image": ["synth/000009.jpg"], "error": [0.5]}, PROV)
    write(d / "top_images.parquet", {"unit": np.zeros(3, np.int32), "rank": np.arange(3),
                                     "max_activation": [2.0, 1.5, 1.0]}, PROV)
    write_manifest(d / "viz" / "manifest.json", manifest(d / "viz", units, am, deconv_error))
    png(d / "detectors.png", 40, 20)
    if extras:
        png(d / "sweep.png", 40, 20)
        write(d / "sweep.parquet", {"iou_threshold": [0.04]})
        write(d / "significance.parquet", {"unit": [0]})
        write(d / "formulas.parquet", {
            "model": ["tiny"] * 2, "layer": [LAYER] * 2, "unit": np.array([0, 1], np.int32),
            "formula": ["(disc AND red) OR box", "red AND NOT zigzag"], "length": [3, 2],
            "iou": [0.31, 0.07], "single_concept": ["disc", "red"], "single_iou": [0.2, 0.05],
            "iou_low": [0.28, 0.03], "iou_high": [0.34, 0.11], "p_value": [0.0099, 0.4],
            "q_value": [0.0198, 0.4], "formula_detector": [True, False]})
    return d


class Page(HTMLParser):
    """Text per element class and the attributes of elements, enough to check a page."""

    def __init__(self, text: str):
        super().__init__()
        self.cards: dict[int, list[str]] = {}
        self.card_classes: dict[int, list[str]] = {}
        self._card: int | None = None
        self.text: list[str] = []
        self.hrefs: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "article" and "card" in (a.get("class") or ""):
            self._card = int(a["data-unit"])
            self.cards[self._card], self.card_classes[self._card] = [], []
        if self._card is not None:
            self.card_classes[self._card] += (a.get("class") or "").split()

    def handle_endtag(self, tag):
        if self._card is not None and tag == "article":
            self._card = None

    def handle_data(self, data):
        self.text.append(data)
        if self._card is not None:
            self.cards[self._card].append(data)

    def card(self, unit: int) -> str:
        return " ".join("".join(self.cards[unit]).split())

    def all_text(self) -> str:
        return " ".join("".join(self.text).split())


def view(title: str, settings: dict, layer: dict | None = None, note: str | None = None,
         seconds: float = 0.1) -> dict:
    return {"title": title, "settings": settings, "note": note, "layer": layer or {},
            "seconds": seconds, "cpu_seconds": seconds}


def manifest(viz: Path, units: dict, am: dict, deconv_error: str | None) -> dict:
    """A views manifest (tables.MANIFEST_SCHEMA) of units 0-2, 3 top images of 16 px each."""
    cards = []
    for u, top in ((0, [2.0, 1.5, 1.0]), (1, [0.4, 0.2, 0.1]), (2, [0.0, 0.0, 0.0])):
        ratio = am["activation_ratio"][u]
        views = {
            "top_images": {"files": [png(viz / f"unit{u:04d}_top{r}.png", 16, 16)
                                     for r in range(3)],
                           "images": [f"synth/{i:06d}.jpg" for i in range(3)],
                           "image_index": [0, 1, 2], "max_activation": top,
                           "mask_fraction": [0.5, 0.25, 0.0]},
            "activation_max": {"file": png(viz / f"unit{u:04d}_am.png", 32, 32),
                               "objective": 0.5, "achieved": am["achieved_activation"][u],
                               "dataset_top": top[0], "ratio": None if ratio != ratio else ratio}}
        if deconv_error is None:
            views["deconvnet"] = {"file": png(viz / f"unit{u:04d}_deconv.png", 3 * 7 + 4, 16),
                                  "receptive_fields": [[0, 0, 7, 7]] * 3}
        cards.append({"unit": u, "requested": u == 2, "selected": True,
                      "dataset_top_activation": top[0],
                      "views": views})
    inversion = {"images": [{
        "image_index": 9, "image": "synth/000009.jpg", "error": 0.5, "normalized_error": 0.25,
        "original_file": png(viz / "inversion_0_original.png", 16, 16),
        "reconstruction_file": png(viz / "inversion_0_reconstruction.png", 16, 16)}],
        "weights": {"relative_depth": 0.5, "lambda_tv": 0.12, "lambda_alpha": 1e-4},
        "normalized_error_formula": "||Phi(x*) - Phi(x0)||^2 / spread"}
    return {"version": MANIFEST_VERSION, "model": "tiny", "layer": LAYER, "device": "cpu",
            "threads": 1, "top_units": 3,
            "order": ["top_images", "activation_max", "deconvnet", "inversion"],
            "units": cards,
            "views": {"top_images": view("top images", {}, {"max_abs_diff": 0.0}),
                      "activation_max": view("activation maximisation", AM, seconds=1.25),
                      "deconvnet": view("DeconvNet", {"enabled": True}, note=deconv_error),
                      "inversion": view("network inversion", INVERSION, inversion)}}


def report(tmp_path, prepared, top_images: int = 3, **kw) -> tuple[str, Page, Path]:
    d = make_layer(tmp_path / "results", **kw)
    out = tmp_path / "results" / "tiny" / "report" / "index.html"
    build_model_report("tiny", {LAYER: d}, out, top_images=top_images, prepared=prepared,
                       dataset_name="mini-broden",
                       spec={"arch": "synthnet", "seed": 3, "layers": [LAYER]})
    text = out.read_text()
    return text, Page(text), out


def test_methods_state_the_dataset_thresholds_settings_and_versions(tmp_path, prepared):
    text, page, _ = report(tmp_path, prepared, extras=True)
    words = page.all_text()
    for want in ("mini-broden: 10 images (9 train, 1 val), 16×16 px (segmentation 8×8); "
                 "6 categories, 7 labels, 8 concepts (label, category).",
                 "the 0.995 quantile (q = 0.005) of unit k's raw activations",
                 "has IoU > 0.04", "per category, the number of distinct labels",
                 "activation maximisation 17 steps at 32 px",
                 "synthnet (built in); no checkpoint: seeded random weights (seed 3)",
                 "device cuda:0, precision bf16",  # the provenance wins over the config
                 "cnnvis-pipeline 0.1.0, torch 9.9.9, torchvision 8.8.8",
                 "config digest c0ffeec0ffeec0ff",
                 "TV weight by the layer's relative depth, as in the paper",
                 "TV weight 0.12 (relative depth 0.50), α-norm weight 1.000e-04."):
        assert want in words, want
    assert "None" not in words


def test_every_category_in_its_fixed_colour(tmp_path, prepared):
    text, page, _ = report(tmp_path, prepared, extras=True)
    table = text[text.index('<table class="per-category">'):]
    table = table[:table.index("</table>")]
    heads = re.findall(r'<th class="category" data-category="([a-z]+)">', table)
    assert heads == [c for c, _ in CATEGORIES]
    # one detector of object (unit 0) and one of color (unit 1), 0 elsewhere
    rows = re.findall(r"<tr><td class=\"l\">(detectors|unique detectors)</td>(.*?)</tr>", table)
    values = {name: re.findall(r">(\d+)</td>", cells) for name, cells in rows}
    assert values == {"detectors": ["1", "0", "0", "0", "0", "1"],
                      "unique detectors": ["1", "0", "0", "0", "0", "1"]}
    for cat, color in CATEGORY_COLORS.items():
        assert f'data-category="{cat}"><span class="chip" style="background: {color}">' in text
    assert len(set(category_colors([c for c, _ in CATEGORIES]).values())) == 6


def test_flags_intervals_and_formulas_when_the_columns_are_present(tmp_path, prepared):
    text, page, _ = report(tmp_path, prepared, extras=True)
    c0, c1, c2 = page.card(0), page.card(1), page.card(2)
    assert "IoU 0.200 [0.150, 0.250] p = 1.00e-04, q = 4.00e-04" in c0
    assert ("formula (disc AND red) OR box IoU 0.310 [0.280, 0.340], p = 0.010, q = 0.020 "
            "formula detector (best single concept on the same images: disc, IoU 0.200)") in c0
    assert ("formula red AND NOT zigzag IoU 0.070 [0.030, 0.110], p = 0.400, q = 0.400 "
            "not significant (q = 0.400)") in c1
    assert "mask: activation > Tk = 1.235 (raw activation units); active (above Tk) at 0.5% of all positions" in c0
    assert "not-significant" not in page.card_classes[0] and "am-low" not in page.card_classes[0]
    assert "sparse: Tk = 0" in c1 and "detector, not significant (q = 0.600)" in c1
    assert "AM below the dataset's top (ratio 0.25)" in c1
    assert "dead: Tk = 0" in c2 and "detector, not significant" not in c2
    assert "AM below" not in c2  # ratio NaN: the dataset top is 0
    words = page.all_text()
    assert "1 unit sparse, 1 unit dead (1 of them detectors)" in words
    assert "1 of them stay detectors under false discovery rate control" in words
    # the figures link the tables behind them, relative to the page
    for name in ("units", "iou", "top_images", "activation_max", "formulas", "sweep",
                 "significance", "inversion"):
        assert f"../{LAYER}/{name}.parquet" in page.hrefs, name
    assert 'alt="features.relu4: detectors over the IoU threshold"' in text  # sweep.png


def test_absent_columns_are_tolerated_and_tk_zero_still_flagged(tmp_path, prepared):
    text, page, _ = report(tmp_path, prepared, extras=False)
    c0, c1, c2 = page.card(0), page.card(1), page.card(2)
    assert "IoU 0.200" in c0 and "[" not in c0 and "formula" not in c0
    assert "active (above" not in c0
    assert "sparse: Tk = 0" in c1  # T_k = 0 and a positive top activation
    assert "dead: Tk = 0" in c2  # T_k = 0 and nothing above 0
    assert "AM below the dataset's top (ratio 0.25)" in c1
    assert "not significant" not in text and "sweep" not in text
    assert "2 units with Tk = 0 (1 of them detectors)" in page.all_text()


def test_a_refused_view_is_noted_once_per_layer(tmp_path, prepared):
    msg = "tiny: DeconvNet needs nn.ReLU modules; this model calls a functional ReLU"
    text, page, _ = report(tmp_path, prepared, extras=False, deconv_error=msg)
    assert text.count(msg) == 1
    assert re.search(r'<p class="note layer-note view-deconvnet">DeconvNet: ' + re.escape(msg),
                     text)
    assert "DeconvNet" not in " ".join(page.card(u) for u in page.cards)


def test_top_images_at_native_size_or_larger_with_activation_and_name(tmp_path, prepared):
    text, page, _ = report(tmp_path, prepared, extras=False)
    card = text[text.index('id="features-relu4-unit-0"'):text.index('id="features-relu4-unit-1"')]
    # 16-px tiles scaled by 6 (the smallest integer giving >= 96 px)
    sizes = re.findall(r'<img class="px top" src="data:image/png;base64,[^"]+" width="(\d+)" '
                       r'height="(\d+)" alt="unit 0: top image (\d)', card)
    assert sizes == [("96", "96", "1"), ("96", "96", "2"), ("96", "96", "3")]
    captions = re.findall(r'<figure class="top-image" title="([^"]+)">.*?<figcaption[^>]*>'
                          r"<b>([^<]+)</b><br>([^<]+)</figcaption>", card, re.S)
    assert captions == [("synth/000000.jpg", "2", "000000.jpg"),
                        ("synth/000001.jpg", "1.5", "000001.jpg"),
                        ("synth/000002.jpg", "1", "000002.jpg")]


def test_report_top_images_only_changes_how_many_are_shown(tmp_path, prepared):
    text, page, _ = report(tmp_path, prepared, extras=False, top_images=2)
    for u in (0, 1, 2):
        assert len(re.findall(rf'alt="unit {u}: top image \d', text)) == 2
    assert "top 2 images (by the maximum of the unit's map)" in page.all_text()
    assert "000002.jpg" not in text


def test_a_manifest_off_its_schema_or_tables_without_settings_are_refused(tmp_path, prepared):
    d = make_layer(tmp_path / "results", extras=False)
    path = d / "viz" / "manifest.json"
    m = json.loads(path.read_text())
    del m["units"][1]["views"]["activation_max"]["ratio"]
    m["views"]["deconvnet"]["seconds"] = "fast"
    path.write_text(json.dumps(m))
    out = tmp_path / "r" / "index.html"
    with pytest.raises(CnnvisError) as e:
        build_model_report("tiny", {LAYER: d}, out, top_images=3)
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a views manifest of version {MANIFEST_VERSION}")
    assert "units.1.views.activation_max: 'ratio' is a required property" in msg
    assert "views.deconvnet.seconds: 'fast' is not of type 'number'" in msg
    with pytest.raises(CnnvisError, match="deconvnet.seconds"):
        write_manifest(tmp_path / "m.json", m)
    assert not (tmp_path / "m.json").exists()  # checked before it is written
    units = pq.read_table(d / "units.parquet")
    write(d / "units.parquet", units.to_pydict(), {k: v for k, v in PROV.items()
                                                   if k != "dissection"})
    with pytest.raises(CnnvisError, match=r"units.parquet: its provenance has no dissection"):
        build_model_report("tiny", {LAYER: d}, out, top_images=3)


def test_summary_lists_every_model_layer_and_category(tmp_path, prepared):
    _, _, page_path = report(tmp_path, prepared, extras=True)
    summary = tmp_path / "results" / "summary"
    rows = {"model": [], "layer": [], "category": [], "units": [], "detectors": [],
            "unique_detectors": [], "detectors_fdr": [], "unique_detectors_fdr": []}
    for m in ("tiny", "other"):
        for c, _ in CATEGORIES[:5]:  # a table that misses a category: it is shown anyway
            for k, v in (("model", m), ("layer", LAYER), ("category", c), ("units", 4),
                         ("detectors", int(c == "object") * (2 if m == "other" else 1)),
                         ("unique_detectors", int(c == "object")),
                         ("detectors_fdr", int(c == "object") if m == "other" else None),
                         ("unique_detectors_fdr", None)):
                rows[k].append(v)
    write(summary / "detectors.parquet", rows, PROV)
    png(summary / "unique_detectors.png", 30, 20)
    series = png(summary / "series_run.png", 30, 20)
    out = build_summary_page({"tiny": page_path}, summary / "detectors.parquet",
                             summary / "unique_detectors.png", summary / "index.html",
                             series={"run": summary / series}, prepared=prepared,
                             dataset_name="mini-broden",
                             units=[tmp_path / "results" / "tiny" / LAYER / "units.parquet"])
    text = out.read_text()
    head = text[text.index('<table class="sortable models-categories"'):]
    head = head[:head.index("</thead>")]
    assert re.findall(r'data-category="([a-z]+)"', head) == [c for c, _ in CATEGORIES]
    assert ">detectors (FDR)</th>" in head and "unique_detectors_fdr" not in head  # all null
    fdr = re.findall(r'<tr data-model="(\w+)"[^>]*>(?:<td[^>]*>.*?</td>){4}<td data-value="'
                     r'([-\d]+)">([^<]+)</td>', text)
    assert fdr == [("other", "1", "1"), ("tiny", "-1", "n/a")]
    body = re.findall(r'<tr data-model="(\w+)" data-layer="([\w.]+)">', text)
    assert body == [("other", LAYER), ("tiny", LAYER)]
    assert 'href="../tiny/report/index.html"' in text
    assert 'href="../tiny/report/index.html#layer-features-relu4"' in text
    assert 'href="detectors.parquet"' in text
    assert 'alt="unique detectors over training: run"' in text
    page = Page(text)
    assert "the 0.995 quantile (q = 0.005)" in page.all_text()
    assert ("device cuda:0, precision bf16, 3 top images kept per unit; config digests: tiny "
            "c0ffeec0ffeec0ff") in page.all_text()
    assert "model" not in re.findall(r"<dt>([^<]+)</dt>", text)  # several models: no one source


def test_number_formats():
    assert fmt(0.04) == "0.040" and fmt(float("nan")) == "n/a" and fmt(None) == "n/a"
    assert fmt(1e-5) == "1.00e-05"
    assert fmt_t(2.70654) == "2.707" and fmt_t(0.0) == "0" and fmt_t(12345.6) == "1.235e+04"
    assert pct(0.00031) == "0.031%" and pct(0.25) == "25%" and pct(0) == "0%"


def test_templates_and_static_files_are_package_data():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["cnnvis_pipeline.reports"]
    pkg = root / "cnnvis_pipeline" / "reports"
    files = {p.relative_to(pkg).as_posix() for d in ("templates", "static")
             for p in (pkg / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    covered = {f.relative_to(pkg).as_posix() for pat in patterns for f in pkg.glob(pat)}
    assert files and files <= covered, files - covered
    assert {"templates/model_report.html", "templates/summary.html", "static/report.css",
            "static/report.js", "templates/views/top_images.html"} <= files
