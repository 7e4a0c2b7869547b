"""Self-contained HTML reports: one page per model and a summary page over all models.

build_model_report(model, layer_dirs, out, ...) writes results/<model>/report/index.html: per
layer the detector count ("X/Y units are detectors, Z unique concepts"), the detectors bar chart,
a grid of unit cards (label, category, IoU, top images with masks, activation maximisation,
DeconvNet projections) with plain-JS buttons that sort it by IoU, unit or label, and the inversion
panel; then the seaborn IoU distribution per category. Every image is a base64 data URI and the
CSS/JS are inline: the file opens anywhere, offline, and can be mailed around.

build_summary_page(reports, detectors, figure, out) writes results/summary/index.html: links to
every model's report, the detectors table and the unique-detectors figure (embedded).

Sort orders (the browser test checks them): IoU descending, ties by unit; unit ascending; label
ascending (code-point order), ties by IoU descending, then unit.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cnnvis_pipeline import __version__
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.tables import read_provenance

CSS = """
:root { --fg: #1d2430; --muted: #5b6575; --line: #d9dee6; --accent: #2a62c9; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
header, main, footer { max-width: 1400px; margin: 0 auto; padding: 12px 20px; }
header { border-bottom: 1px solid var(--line); background: #fff; max-width: none; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 19px; margin: 28px 0 6px; }
h3 { font-size: 16px; margin: 18px 0 6px; } h4 { font-size: 14px; margin: 0 0 4px; }
h5 { font-size: 12px; margin: 6px 0 2px; color: var(--muted); font-weight: 600; }
.meta, .muted { color: var(--muted); font-size: 12px; }
nav a { margin-right: 14px; color: var(--accent); }
section.layer { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 4px 16px 16px;
                margin: 18px 0; }
p.count { font-size: 16px; font-weight: 600; }
figure { margin: 8px 0; } figure img.plot { max-width: 100%; height: auto; }
.toolbar { margin: 6px 0 10px; } .toolbar button { font: inherit; padding: 3px 10px; margin-right: 6px;
  border: 1px solid var(--line); border-radius: 4px; background: #fff; cursor: pointer; }
.toolbar button[aria-pressed="true"] { background: var(--accent); color: #fff; border-color: var(--accent); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px; background: #fff; overflow: hidden; }
.card .label { margin: 0 0 4px; } .card .concept { font-weight: 600; }
.badge { display: inline-block; font-size: 11px; padding: 0 6px; border-radius: 8px; margin-left: 4px;
         background: #e3ecfb; color: #1f4fa8; font-weight: 500; }
.badge.req { background: #fbeede; color: #8a4a00; }
.card img { image-rendering: pixelated; max-width: 100%; height: auto; display: block; }
.card img.am { width: 128px; } .card img.strip { width: 100%; }
.refused { color: #9a1b1b; font-size: 12px; background: #fdf0f0; padding: 4px 6px; border-radius: 4px; }
.inversion { display: flex; flex-wrap: wrap; gap: 14px; }
.inversion figure { border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; }
.inversion img { width: 128px; image-rendering: pixelated; }
table { border-collapse: collapse; margin: 8px 0; background: #fff; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: right; }
th { background: #eef1f5; } td.l, th.l { text-align: left; }
"""

SORT_JS = """
(function () {
  var cmp = {
    iou: function (a, b) { return (+b.dataset.iou - +a.dataset.iou) || (+a.dataset.unit - +b.dataset.unit); },
    unit: function (a, b) { return +a.dataset.unit - +b.dataset.unit; },
    label: function (a, b) {
      var x = a.dataset.label, y = b.dataset.label;
      if (x < y) return -1;
      if (x > y) return 1;
      return (+b.dataset.iou - +a.dataset.iou) || (+a.dataset.unit - +b.dataset.unit);
    }
  };
  document.querySelectorAll("button.sort").forEach(function (button) {
    button.addEventListener("click", function () {
      var grid = document.getElementById(button.dataset.grid);
      var cards = Array.prototype.slice.call(grid.querySelectorAll(":scope > .card"));
      cards.sort(cmp[button.dataset.key]);
      cards.forEach(function (card) { grid.appendChild(card); });
      grid.dataset.sorted = button.dataset.key;
      button.parentNode.querySelectorAll("button.sort").forEach(function (other) {
        other.setAttribute("aria-pressed", other === button ? "true" : "false");
      });
    });
  });
})();
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def data_uri(path: str | Path) -> str:
    path = Path(path)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
            ".svg": "image/svg+xml"}.get(path.suffix.lower())
    if mime is None:
        raise CnnvisError(f"{path}: cannot embed a {path.suffix} file as an image")
    if not path.is_file():
        raise CnnvisError(f"{path}: image missing; rerun the visualize step")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def img(path: str | Path, alt: str, cls: str = "") -> str:
    c = f' class="{esc(cls)}"' if cls else ""
    return f'<img{c} src="{data_uri(path)}" alt="{esc(alt)}">'


def fmt(x, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(v):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def layer_counts(units: pd.DataFrame) -> dict:
    """detectors / units, and unique concepts (distinct (category, label) among detectors)."""
    det = units[units["detector"]]
    return {"units": int(len(units)), "detectors": int(len(det)),
            "unique": int(det[["category", "label"]].drop_duplicates().shape[0])}


def best_iou_per_category(iou: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, unit, category): the unit's highest IoU over the category's concepts."""
    return (iou.groupby(["layer", "unit", "category"], sort=True)["iou"].max().reset_index())


def plot_iou_distribution(iou: pd.DataFrame, path: str | Path, title: str,
                          iou_threshold: float | None = None) -> Path:
    """Seaborn box + strip plot: each unit's best IoU per category, one hue per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = best_iou_per_category(iou)
    cats = sorted(data["category"].unique())
    layers = list(dict.fromkeys(iou["layer"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(cats) * max(1, len(layers)) ** 0.5 + 2), 4))
    if len(data):
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated `vert`
            warnings.simplefilter("ignore", DeprecationWarning)
            sns.boxplot(data=data, x="category", y="iou", hue="layer", order=cats,
                        hue_order=layers, showfliers=False, ax=ax, palette="pastel")
        sns.stripplot(data=data, x="category", y="iou", hue="layer", order=cats,
                      hue_order=layers, dodge=True, size=2.5, alpha=0.6, ax=ax, palette="dark",
                      legend=False)
        if iou_threshold is not None:
            ax.axhline(iou_threshold, color="#b22", ls="--", lw=1, label="detector threshold")
        ax.legend(fontsize=8, title=None)
    ax.set_xlabel("category")
    ax.set_ylabel("best IoU of each unit in the category")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None, "Creation Time": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _unit_card(card: dict, am_row: dict | None, viz: Path, deconv_error: str | None) -> str:
    u = card["unit"]
    badges = ('<span class="badge">detector</span>' if card["detector"] else "") + (
        '<span class="badge req">requested</span>' if card.get("requested") else "")
    parts = [
        f'<article class="card" id="{esc(card["layer_slug"])}-unit-{u}" data-unit="{u}" '
        f'data-iou="{card["iou"]!r}" data-label="{esc(card["concept"])}">',
        f"<h4>unit {u}{badges}</h4>",
        f'<p class="label"><span class="concept">{esc(card["concept"])}</span> '
        f'<span class="muted">({esc(card["category"])})</span> IoU <b>{fmt(card["iou"])}</b></p>',
    ]
    n_top = len(card.get("top_images", []))
    if card.get("top_file"):
        parts.append(f"<h5>top {n_top} images, mask &gt; {fmt(card['threshold'])}</h5>")
        parts.append(img(viz / card["top_file"], f"unit {u}: top images with masks", "strip"))
    if card.get("am_file"):
        top = card.get("dataset_top_activation")
        parts.append("<h5>activation maximisation</h5>")
        parts.append(img(viz / card["am_file"], f"unit {u}: activation maximisation", "am"))
        ratio = am_row.get("ratio") if am_row else card.get("am_ratio")
        parts.append(
            f'<p class="muted">max activation {fmt(card.get("am_max_activation"))} vs dataset '
            f'top {fmt(top)}: ratio {fmt(ratio, 2)}; mean over the map (the objective) '
            f'{fmt(card.get("am_activation"))}</p>')
    parts.append("<h5>DeconvNet: receptive-field patch (top) and projection (bottom)</h5>")
    if card.get("deconv_file"):
        parts.append(img(viz / card["deconv_file"], f"unit {u}: DeconvNet projections", "strip"))
    else:
        parts.append(f'<p class="refused">{esc(deconv_error or "no projection")}</p>')
    parts.append("</article>")
    return "\n".join(parts)


def _layer_section(model: str, layer: str, layer_dir: Path) -> tuple[str, dict]:
    units = pq.read_table(layer_dir / "units.parquet").to_pandas()
    viz = layer_dir / "viz"
    manifest_path = viz / "manifest.json"
    if not manifest_path.is_file():
        raise CnnvisError(f"{manifest_path}: missing; run the visualize step for {model} {layer}")
    manifest = json.loads(manifest_path.read_text())
    am = pq.read_table(layer_dir / "activation_max.parquet").to_pandas()
    am_by_unit = {int(r["unit"]): r for r in am.to_dict("records")}
    counts = layer_counts(units)
    ls = slug(layer)
    out = [f'<section class="layer" id="layer-{ls}">', f"<h2>{esc(layer)}</h2>",
           f'<p class="count">{counts["detectors"]}/{counts["units"]} units are detectors, '
           f'{counts["unique"]} unique concepts</p>']
    if (layer_dir / "detectors.png").is_file():
        out.append(f"<figure>{img(layer_dir / 'detectors.png', f'{layer}: detectors per concept', 'plot')}"
                   "</figure>")
    cards = manifest["units"]
    out.append(f"<h3>Units ({len(cards)} visualised: the highest IoUs and the requested ones)</h3>")
    grid = f"grid-{ls}"
    out.append('<div class="toolbar">sort by '
               + "".join(f'<button type="button" class="sort" data-grid="{grid}" data-key="{k}" '
                         f'aria-pressed="{"true" if k == "iou" else "false"}">{t}</button>'
                         for k, t in (("iou", "IoU"), ("unit", "unit"), ("label", "label")))
               + "</div>")
    out.append(f'<div class="grid" id="{grid}" data-sorted="iou">')
    order = sorted(cards, key=lambda c: (-c["iou"], c["unit"]))
    for c in order:
        out.append(_unit_card(dict(c, layer_slug=ls), am_by_unit.get(c["unit"]), viz,
                              manifest.get("deconv_error")))
    out.append("</div>")
    out.append("<h3>Network inversion</h3>")
    inv = manifest.get("inversion") or []
    if inv:
        out.append('<p class="muted">Each image reconstructed from the whole representation of '
                   "the layer. error = ||&Phi;(x*) &minus; &Phi;0||&sup2; / ||&Phi;0||&sup2;; "
                   "normalised = ||&Phi;(x*) &minus; &Phi;0||&sup2; / mean pairwise squared "
                   "distance of dataset images' representations.</p>")
        out.append('<div class="inversion">')
        for r in inv:
            out.append(
                "<figure>" + img(viz / r["original_file"], f"original {r['image']}")
                + img(viz / r["reconstruction_file"], f"reconstruction of {r['image']}")
                + f'<figcaption>{esc(r["image"])}<br>error {fmt(r["error"])}, normalised '
                f'{fmt(r["normalized_error"])}</figcaption></figure>')
        out.append("</div>")
    else:
        out.append(f'<p class="refused">{esc(manifest.get("inversion_error") or "no images inverted")}</p>')
    t = manifest.get("timings", {})
    out.append(f'<p class="meta">visualised on {esc(manifest.get("device"))} '
               f'({manifest.get("threads")} threads): top images {fmt(t.get("top_images_s"), 2)} s, '
               f'activation maximisation {fmt(t.get("activation_max_s"), 2)} s, DeconvNet '
               f'{fmt(t.get("deconvnet_s"), 2)} s, inversion {fmt(t.get("inversion_s"), 2)} s</p>')
    out.append("</section>")
    return "\n".join(out), counts


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
            f"<script>{SORT_JS}</script>\n</body>\n</html>\n")


def build_model_report(model: str, layer_dirs: dict[str, str | Path], out: str | Path,
                       *, iou_figure: str | Path | None = None,
                       iou_threshold: float | None = None) -> Path:
    """results/<model>/report/index.html from the layers' tables and viz/ directories.
    `layer_dirs`: layer -> results/<model>/<layer>, in the order to show."""
    out = Path(out)
    layer_dirs = {k: Path(v) for k, v in layer_dirs.items()}
    if not layer_dirs:
        raise CnnvisError(f"{model}: no layers to report")
    sections, counts = [], {}
    for layer, d in layer_dirs.items():
        text, counts[layer] = _layer_section(model, layer, d)
        sections.append(text)
    iou = pd.concat([pq.read_table(d / "iou.parquet").to_pandas() for d in layer_dirs.values()],
                    ignore_index=True)
    iou_figure = Path(iou_figure) if iou_figure else out.with_name("iou_distribution.png")
    plot_iou_distribution(iou, iou_figure, f"{model}: IoU distribution per category",
                          iou_threshold)
    prov = read_provenance(next(iter(layer_dirs.values())) / "units.parquet")
    nav = " ".join(f'<a href="#layer-{slug(k)}">{esc(k)}</a>' for k in layer_dirs)
    summary_rows = "".join(
        f'<tr><td class="l">{esc(k)}</td><td>{c["units"]}</td><td>{c["detectors"]}</td>'
        f'<td>{c["unique"]}</td></tr>' for k, c in counts.items())
    body = "\n".join([
        "<header>",
        f"<h1>Network Dissection of {esc(model)}</h1>",
        f'<p class="meta">cnnvis-pipeline {esc(__version__)}; dataset digest '
        f'{esc(str(prov.get("dataset_digest"))[:16])}; checkpoint sha256 '
        f'{esc(str(prov.get("checkpoint_sha256"))[:16])}</p>',
        f"<nav>{nav} <a href=\"#iou-distribution\">IoU distribution</a></nav>",
        "</header>",
        "<main>",
        '<table><tr><th class="l">layer</th><th>units</th><th>detectors</th>'
        f"<th>unique concepts</th></tr>{summary_rows}</table>",
        *sections,
        '<section class="layer" id="iou-distribution"><h2>IoU distribution per category</h2>',
        '<p class="muted">For every unit, its highest IoU over the concepts of each category.</p>',
        f"<figure>{img(iou_figure, f'{model}: IoU distribution per category', 'plot')}</figure>",
        "</section>",
        "</main>",
    ])
    return _write_atomic(out, _page(f"cnnvis report: {model}", body))


def build_summary_page(reports: dict[str, str | Path], detectors: str | Path,
                       figure: str | Path, out: str | Path) -> Path:
    """results/summary/index.html: links to each model's report (relative), the detectors table
    and the unique-detectors figure embedded."""
    out = Path(out)
    counts = pq.read_table(detectors).to_pandas()
    links = []
    for model, path in reports.items():
        rel = os.path.relpath(Path(path).resolve(), out.parent.resolve())
        links.append(f'<li><a class="model-report" href="{esc(Path(rel).as_posix())}">'
                     f"{esc(model)}</a></li>")
    per_layer = (counts.groupby(["model", "layer"], sort=True)
                 .agg(units=("units", "first"), detectors=("detectors", "sum"),
                      unique=("unique_detectors", "sum")).reset_index())
    rows = "".join(
        f'<tr><td class="l">{esc(r.model)}</td><td class="l">{esc(r.layer)}</td>'
        f"<td>{int(r.units)}</td><td>{int(r.detectors)}</td><td>{int(r.unique)}</td></tr>"
        for r in per_layer.itertuples())
    cats = sorted(counts["category"].unique())
    pivot = counts.pivot_table(index=["model", "layer"], columns="category",
                               values="unique_detectors", aggfunc="sum", fill_value=0)
    cat_rows = "".join(
        f'<tr><td class="l">{esc(m)}</td><td class="l">{esc(lay)}</td>'
        + "".join(f"<td>{int(v)}</td>" for v in np.asarray(vals)) + "</tr>"
        for (m, lay), vals in zip(pivot.index, pivot.to_numpy(), strict=True))
    body = "\n".join([
        "<header><h1>Network Dissection: summary</h1>",
        f'<p class="meta">cnnvis-pipeline {esc(__version__)}</p></header>',
        "<main>",
        "<h2>Model reports</h2>",
        f"<ul>{''.join(links)}</ul>",
        "<h2>Unique detectors per category</h2>",
        f"<figure>{img(figure, 'unique detectors per category', 'plot')}</figure>",
        '<table><tr><th class="l">model</th><th class="l">layer</th><th>units</th>'
        f"<th>detectors</th><th>unique concepts</th></tr>{rows}</table>",
        '<table><tr><th class="l">model</th><th class="l">layer</th>'
        + "".join(f"<th>{esc(c)}</th>" for c in cats) + f"</tr>{cat_rows}</table>",
        "</main>",
    ])
    return _write_atomic(out, _page("cnnvis summary", body))
