"""Self-contained HTML reports: one page per model and a summary page over all models.

build_model_report(model, layer_dirs, out, top_images=...) writes
results/<model>/report/index.html: a Methods section (dataset, T_k, IoU, detector and
unique-detector rules, the views' settings, digests, versions, device, precision; the
dissection's settings come from the units tables' provenance), then per layer (reports.layer)
the counts, every category's detectors (0 where there are none), the detectors figure and the
significance sweep when there is one (each linked to the Parquet table behind it), the views'
notes (a refused or disabled view), a list of unit cards (label, category, IoU with its
interval, flags: sparse or dead units, detector but not significant; the unit's best formula;
then each view's block: top images at native size or larger with their activation and name,
AM with its flag when below the dataset's top, DeconvNet) with plain-JS buttons that sort it by
IoU, unit or label, and each view's layer block (the labelled inversion pairs); then the IoU
distribution per category.

build_summary_page(reports, detectors, figure, out, ...) writes results/summary/index.html, the
entry point of a bulk audit: the same Methods, every model and layer, a sortable models x
categories table of unique detectors, the unique-detectors figure and the checkpoint-series
figures.

Pages are rendered from the jinja2 templates in templates/ with static/report.css and
static/report.js inlined, and every image is a base64 data URI: a page opens anywhere, offline,
and can be mailed around; it fetches nothing. Columns that other stages add (units:
active_fraction, activity, iou_low, iou_high, p_value, q_value, detector_fdr; activation_max:
formulas.parquet; significance.parquet, sweep.png) are shown when present.

Sort orders (the browser test checks them): IoU descending, ties by unit; unit ascending; label
ascending (code-point order), ties by IoU descending, then unit.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import jinja2
import pandas as pd
import pyarrow.parquet as pq

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import write_text
from cnnvis_pipeline.reports import figures, interventions
from cnnvis_pipeline.reports.format import data_uri, fmt, fmt_t, pct, slug
from cnnvis_pipeline.reports.layer import layer_section, read
from cnnvis_pipeline.reports.methods import dataset_info, dissection_settings, method_info
from cnnvis_pipeline.tables import category_colors, read_provenance


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cnnvis_pipeline.reports", "templates"),
        autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=fmt, fmt_t=fmt_t, pct=pct, uri=data_uri, slug=slug)
    return env


def _static(name: str) -> str:
    return (resources.files("cnnvis_pipeline.reports") / "static" / name).read_text("utf-8")


def render(template: str, views: list[str] = (), **context) -> str:
    """The page; `views`: the names whose templates/views/<name>.html macros it uses."""
    env = _env()
    macros = {name: env.get_template(f"views/{name}.html").module for name in views}
    return env.get_template(template).render(css=_static("report.css"), js=_static("report.js"),
                                             view_macros=macros, **context)


def _categories(iou: pd.DataFrame, dataset: dict | None) -> list[str]:
    if dataset and dataset["categories"] and dataset["categories"][0]["kind"] is not None:
        return [c["name"] for c in dataset["categories"]]
    return list(dict.fromkeys(iou["category"]))


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), start.resolve())).as_posix()


def build_model_report(model: str, layer_dirs: dict[str, str | Path], out: str | Path,
                       *, top_images: int, iou_figure: str | Path | None = None,
                       prepared: str | Path | None = None, dataset_name: str | None = None,
                       spec: dict | None = None, summary_page: str | Path | None = None) -> Path:
    """results/<model>/report/index.html from the layers' tables and viz/ directories.
    `layer_dirs`: layer -> results/<model>/<layer>, in the order to show; `top_images`: the
    top images shown per unit (report.top_images); `prepared`: the prepared dataset (for the
    Methods section's dataset facts and category list); `spec`: the model's resolved entry;
    `summary_page`: the run's summary page (linked, relative to the report)."""
    out = Path(out)
    layer_dirs = {k: Path(v) for k, v in layer_dirs.items()}
    if not layer_dirs:
        raise CnnvisError(f"{model}: no layers to report")
    first = next(iter(layer_dirs.values())) / "units.parquet"
    prov = read_provenance(first) if first.is_file() else {}
    dissection = dissection_settings(prov, first)
    iou = pd.concat([pq.read_table(d / "iou.parquet", columns=["layer", "unit", "concept",
                                                                  "category", "iou"]).to_pandas()
                     for d in layer_dirs.values()], ignore_index=True)
    concepts = int(iou[["concept", "category"]].drop_duplicates().shape[0])
    dataset = dataset_info(prepared, dataset_name, list(dict.fromkeys(iou["category"])), concepts,
                           prov.get("dataset_digest"))
    categories = _categories(iou, dataset)
    colors = category_colors(categories)
    threshold = dissection["iou_threshold"]
    layers = [layer_section(name, d, out.parent, colors=colors, categories=categories,
                            image_size=dataset["image_size"], iou_threshold=threshold)
              for name, d in layer_dirs.items()]
    iou_figure = Path(iou_figure) if iou_figure else out.with_name("iou_distribution.png")
    figures.plot_iou_distribution(iou, iou_figure, f"{model}: IoU distribution per category",
                                  categories, colors, threshold)
    report = {"top_images": int(top_images)}
    method = method_info(prov=prov, dataset=dataset, dissection=dissection, spec=spec,
                         views={"top_units": layers[0]["top_units"], "views": layers[0]["views"],
                                "device": layers[0]["device"]})
    rel_iou = {name: f"{_relative(d, out.parent)}/iou.parquet" for name, d in layer_dirs.items()}
    names = list(dict.fromkeys(v["name"] for ly in layers for v in ly["views"]))
    html = render("model_report.html", views=names, title=f"cnnvis report: {model}",
                  model=model, method=method, layers=layers, categories=categories,
                  colors=colors, iou_figure=iou_figure, iou_tables=rel_iou, report=report,
                  summary=_relative(summary_page, out.parent) if summary_page else None)
    return write_text(out, html)


def _summary_provenance(detectors: Path, units: list[str | Path] | None) -> dict:
    """The provenance the summary's Methods show: the units tables' merged under the
    detectors table's, with each model's config digest."""
    prov = read_provenance(detectors)
    digests: dict[str, str] = {}
    for path in sorted(map(str, units or [])):
        p = read_provenance(path)
        model = p.get("model") or Path(path).parent.parent.name
        digests.setdefault(model, p.get("config_digest"))
        prov = {**p, **{k: v for k, v in prov.items() if v is not None}}
    if digests:
        prov["model_config_digests"] = dict(sorted(digests.items()))
    return prov


def _formula_counts(formulas: list[str | Path] | None) -> dict[tuple[str, str], dict]:
    """(model, layer) -> units explained by a formula and, with the formulas' statistics,
    how many are formula detectors (significant); the table's relative path is added later."""
    out = {}
    for path in map(Path, formulas or []):
        f = read(path, "formulas")
        key = (path.parent.parent.name, path.parent.name)
        if len(f):
            key = (str(f["model"].iloc[0]), str(f["layer"].iloc[0]))
        sig = (int(f["formula_detector"].astype(bool).sum())
               if "formula_detector" in f.columns else None)
        out[key] = {"units": int(len(f)), "significant": sig, "path": path}
    return out


def _interventions(units: list[str | Path] | None) -> list[dict]:
    """Per layer with ablation or adversarial tables (beside its units table): the summary's
    comparison (reports.interventions.summary_row), by model and layer."""
    rows = []
    for path in sorted(map(Path, units or [])):
        row = interventions.summary_row(path.parent)
        if row is not None:
            rows.append(dict(row, model=path.parent.parent.name, layer=path.parent.name))
    return rows


def _summary_rows(counts: pd.DataFrame, categories: list[str], links: dict,
                  extra: list[str], formulas: dict | None = None) -> list[dict]:
    rows = []
    for (m, lay), g in counts.groupby(["model", "layer"], sort=False):
        by_cat = g.set_index("category")
        rows.append({"formulas": (formulas or {}).get((m, lay)),
            "model": m, "layer": lay, "report": links.get(m),
            "units": int(g["units"].iloc[0]), "detectors": int(g["detectors"].sum()),
            "unique": int(g["unique_detectors"].sum()),
            "extra": {c: int(g[c].sum()) if g[c].notna().all() else None for c in extra},
            "per_category": [int(by_cat["unique_detectors"].get(c, 0)) for c in categories]})
    return sorted(rows, key=lambda r: (r["model"], r["layer"]))


def build_summary_page(reports: dict[str, str | Path], detectors: str | Path,
                       figure: str | Path, out: str | Path, *,
                       series: dict[str, str | Path] | None = None,
                       prepared: str | Path | None = None, dataset_name: str | None = None,
                       units: list[str | Path] | None = None,
                       formulas: list[str | Path] | None = None) -> Path:
    """results/summary/index.html: Methods, every model and layer, the sortable models x
    categories table of unique detectors, the figure and the checkpoint-series figures
    (`series`: name -> PNG), links to each model's report (relative) and to the table.
    `units`: the units tables behind the counts (their provenance: each model's config digest,
    versions, device, precision and the dissection's settings); `formulas`: the layers'
    formulas.parquet (compositional explanations: units explained and formula detectors per
    model and layer)."""
    out, detectors = Path(out), Path(detectors)
    counts = read(detectors, "detectors")
    prov = _summary_provenance(detectors, units)
    dissection = dissection_settings(prov, detectors)
    cats_seen = list(dict.fromkeys(counts["category"]))
    dataset = dataset_info(prepared, dataset_name, cats_seen, 0, prov.get("dataset_digest"))
    dataset["concepts"] = dataset["concepts"] or None
    categories = _categories(counts, dataset)
    categories += [c for c in cats_seen if c not in categories]
    colors = category_colors(categories)
    links = {m: _relative(p, out.parent) for m, p in reports.items()}
    # FDR counts beside the plain ones, when the statistics produced them (null otherwise)
    extra = [c for c in ("detectors_fdr", "unique_detectors_fdr")
             if c in counts.columns and counts[c].notna().any()]
    method = method_info(prov=prov, dataset=dataset, dissection=dissection, spec=False)
    formula_counts = _formula_counts(formulas)
    compared = _interventions(units)
    for v in formula_counts.values():
        v["path"] = _relative(v["path"], out.parent)
    html = render("summary.html", title="cnnvis summary", method=method,
                  rows=_summary_rows(counts, categories, links, extra, formula_counts),
                  formulas=bool(formula_counts), categories=categories, interventions=compared,
                  colors=colors, extra=extra, figure=Path(figure),
                  series={k: Path(v) for k, v in sorted((series or {}).items())},
                  links=links, table=_relative(detectors, out.parent))
    return write_text(out, html)
