"""Self-contained HTML reports: one page per model and a summary page over all models.

build_model_report(model, layer_dirs, out, ...) writes results/<model>/report/index.html:
a Methods section (dataset, T_k, IoU, detector and unique-detector rules, visualisation
settings, digests, versions, device, precision), then per layer the counts, every category's
detectors (0 where there are none), the detectors figure and the significance sweep when there
is one (each linked to the Parquet table behind it), notes that hold for the whole layer (a
refused or disabled view), a list of unit cards (label, category, IoU with its interval, flags:
sparse or dead units, AM below the dataset's top activation, detector but not significant; top
images at native size or larger with their activation and name, AM, DeconvNet, the unit's best
formula) with plain-JS buttons that sort it by IoU, unit or label, and the labelled inversion
pairs; then the IoU distribution per category.

build_summary_page(reports, detectors, figure, out, ...) writes results/summary/index.html, the
entry point of a bulk audit: the same Methods, every model and layer, a sortable models x
categories table of unique detectors, the unique-detectors figure and the checkpoint-series
figures.

Pages are rendered from the jinja2 templates in templates/ with static/report.css and
static/report.js inlined, and every image is a base64 data URI: a page opens anywhere, offline,
and can be mailed around; it fetches nothing. Columns that other stages add (units:
active_fraction, activity, iou_low, iou_high, p_value, q_value, detector_fdr; activation_max:
activation_ratio; formulas.parquet; significance.parquet, sweep.png) are shown when present.

Sort orders (the browser test checks them): IoU descending, ties by unit; unit ascending; label
ascending (code-point order), ties by IoU descending, then unit.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import jinja2
import pandas as pd
import pyarrow.parquet as pq

from cnnvis_pipeline import __version__
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import write_text
from cnnvis_pipeline.reports import figures
from cnnvis_pipeline.reports.format import data_uri, fmt, fmt_t, pct, png_size, slug
from cnnvis_pipeline.tables import category_colors, read_provenance, unique_detectors

MIN_TILE_PX = 96  # top images are shown at an integer scale of at least this width


def layer_counts(units: pd.DataFrame) -> dict:
    """detectors / units, and unique concepts (distinct (category, label) among detectors)."""
    return {"units": int(len(units)), "detectors": int(units["detector"].sum()),
            "unique": unique_detectors(units)}


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; the {what} table is needed for the report")
    return pq.read_table(path).to_pandas()


def _optional(path: Path) -> pd.DataFrame | None:
    return pq.read_table(path).to_pandas() if path.is_file() else None


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cnnvis_pipeline.reports", "templates"),
        autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=fmt, fmt_t=fmt_t, pct=pct, uri=data_uri, slug=slug)
    return env


def _static(name: str) -> str:
    return (resources.files("cnnvis_pipeline.reports") / "static" / name).read_text("utf-8")


def render(template: str, **context) -> str:
    return _env().get_template(template).render(css=_static("report.css"),
                                                js=_static("report.js"), **context)


# --- the Methods section -----------------------------------------------------------------------
def dataset_info(prepared: str | Path | None, name: str | None, categories: list[str],
                 concepts: int, digest: str | None) -> dict:
    """What the Methods section says about the dataset: from the prepared dataset's meta.json
    when given, else what the tables show (the categories and concepts of the iou table)."""
    info = {"name": name, "digest": digest, "images": None, "splits": {}, "concepts": concepts,
            "labels": None, "image_size": None, "seg_size": None,
            "categories": [{"name": c, "kind": None, "concepts": None} for c in categories]}
    if prepared is None:
        return info
    path = Path(prepared)
    if path.is_file():  # the workflow's prepare receipt (JSON naming the shared directory)
        try:
            path = Path(json.loads(path.read_text(encoding="utf-8"))["prepared"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CnnvisError(f"{prepared}: not a prepare receipt ({e})") from None
    path = path / "meta.json"
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; prepare the dataset first")
    meta = json.loads(path.read_text())
    per_cat: dict[str, int] = {}
    for c in meta["concepts"]:
        per_cat[c["category"]] = per_cat.get(c["category"], 0) + 1
    splits: dict[str, int] = {}
    for s in meta.get("splits", []):
        splits[s] = splits.get(s, 0) + 1
    info.update(
        images=int(meta["n_images"]), splits=dict(sorted(splits.items())),
        concepts=len(meta["concepts"]), labels=len({c["label"] for c in meta["concepts"]}),
        image_size=meta.get("image_size"), seg_size=meta.get("seg_size"),
        digest=meta.get("digest") or digest,
        categories=[{"name": c["name"], "kind": c["kind"], "concepts": per_cat.get(c["name"], 0)}
                    for c in meta["categories"]])
    return info


def _model_source(spec: dict | None, prov: dict) -> str:
    sha = prov.get("checkpoint_sha256")
    if not spec:
        return f"checkpoint sha256 {sha}" if sha else "no checkpoint recorded"
    if spec.get("torchvision"):
        what = f"torchvision {spec['torchvision']}, weights {spec.get('weights') or 'none'}"
    elif spec.get("factory"):
        what = f"factory {spec['factory']}"
    else:
        what = f"{spec.get('arch')} (built in)"
        if spec.get("train"):
            what += ", trained by the workflow"
    if sha:
        return f"{what}; checkpoint sha256 {sha}"
    if spec.get("torchvision") and spec.get("weights"):
        return f"{what} (torchvision's published weights)"
    return f"{what}; no checkpoint: seeded random weights (seed {spec.get('seed', 0)})"


def method_info(*, prov: dict, dataset: dict, quantile, iou_threshold, spec: dict | None,
                dissection: dict | None, manifest: dict | None) -> dict:
    dissection = dissection or {}
    return {
        "dataset": dataset, "quantile": quantile, "iou_threshold": iou_threshold,
        "top_k": dissection.get("top_k"),
        "device": prov.get("device") or dissection.get("device"),
        "precision": prov.get("precision") or dissection.get("precision"),
        "source": _model_source(spec, prov) if spec is not False else None,
        "config_digest": prov.get("config_digest"),
        "model_digests": prov.get("model_config_digests"),
        "versions": {"cnnvis-pipeline": prov.get("cnnvis_pipeline_version") or __version__,
                     "torch": prov.get("torch_version"),
                     "torchvision": prov.get("torchvision_version")},
        "viz": (manifest or {}).get("settings"),
        "viz_device": (manifest or {}).get("device"),
        "report_version": __version__,
    }


# --- one layer -----------------------------------------------------------------------------
def _activity(row: dict, card: dict) -> str | None:
    """`sparse`/`dead` for a unit whose T_k is 0, from units.activity when present, else from
    its highest dataset activation (> 0: sparse)."""
    activity = row.get("activity")
    if isinstance(activity, str) and activity:
        return None if activity == "ok" else activity
    if float(row["threshold"]) > 0:
        return None
    top = card.get("dataset_top_activation")
    return "sparse" if top is not None and float(top) > 0 else "dead"


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v else v


def _tiles(viz: Path, card: dict, image_size) -> dict | None:
    """The top-images strip and where each image sits in it, scaled to >= MIN_TILE_PX."""
    if not card.get("top_file"):
        return None
    path = viz / card["top_file"]
    w, h = png_size(path)
    names = card.get("top_images", [])
    n = max(1, len(names))
    tw = int(image_size[1]) if image_size else h  # tiles are the dataset's image size
    gap = (w - n * tw) / (n - 1) if n > 1 else 0
    if gap < 0 or gap != int(gap):
        tw, gap = h, (w - n * h) / (n - 1) if n > 1 else 0
    scale = max(1, -(-MIN_TILE_PX // max(1, tw)))
    acts = card.get("top_max_activation") or [None] * n
    return {"file": path, "width": w * scale, "height": h * scale, "tile": tw * scale,
            "gap": int(gap) * scale, "scale": scale,
            "images": [{"name": nm, "short": str(nm).rsplit("/", 1)[-1], "activation": a}
                       for nm, a in zip(names, acts, strict=False)]}


def _card(card: dict, row: dict, am_row: dict | None, formula: dict | None, viz: Path,
          image_size, colors: dict, iou_threshold) -> dict:
    tiles = _tiles(viz, card, image_size)
    scale = tiles["scale"] if tiles else 2
    ratio = None
    if am_row is not None:
        ratio = _num(am_row.get("activation_ratio", am_row.get("ratio")))
    elif card.get("am_ratio") is not None:
        ratio = _num(card.get("am_ratio"))
    detector = bool(row["detector"])
    fdr = row.get("detector_fdr")
    fdr = None if fdr is None or (isinstance(fdr, float) and fdr != fdr) else bool(fdr)
    out = {
        "unit": int(card["unit"]), "concept": str(row["concept"]), "category": str(row["category"]),
        "color": colors.get(str(row["category"]), "#777"), "iou": float(row["iou"]),
        "iou_low": _num(row.get("iou_low")), "iou_high": _num(row.get("iou_high")),
        "p_value": _num(row.get("p_value")), "q_value": _num(row.get("q_value")),
        "detector": detector, "detector_fdr": fdr,
        "not_significant": detector and fdr is False,
        "requested": bool(card.get("requested")), "threshold": float(row["threshold"]),
        "activity": _activity(row, card), "active_fraction": _num(row.get("active_fraction")),
        "tiles": tiles, "am": None, "deconv": None, "formula": formula,
        "iou_threshold": iou_threshold,
    }
    if card.get("am_file"):
        aw, ah = png_size(viz / card["am_file"])
        s = max(1, -(-128 // max(1, aw)))
        out["am"] = {"file": viz / card["am_file"], "width": aw * s, "height": ah * s,
                     "achieved": _num(card.get("am_max_activation")),
                     "top": _num(card.get("dataset_top_activation")), "ratio": ratio,
                     "objective": _num(card.get("am_activation")),
                     "low": ratio is not None and ratio < 1}
    if card.get("deconv_file"):
        dw, dh = png_size(viz / card["deconv_file"])
        out["deconv"] = {"file": viz / card["deconv_file"], "width": dw * scale,
                         "height": dh * scale}
    return out


def _layer(model: str, layer: str, layer_dir: Path, out_dir: Path, colors: dict,
           categories: list[str], image_size, iou_threshold) -> dict:
    units = _read(layer_dir / "units.parquet", "units").sort_values("unit")
    viz = layer_dir / "viz"
    manifest_path = viz / "manifest.json"
    if not manifest_path.is_file():
        raise CnnvisError(f"{manifest_path}: missing; run the visualize step for {model} {layer}")
    manifest = json.loads(manifest_path.read_text())
    am = _read(layer_dir / "activation_max.parquet", "activation_max")
    am_by_unit = {int(r["unit"]): r for r in am.to_dict("records")}
    formulas = _optional(layer_dir / "formulas.parquet")
    formula_by_unit = ({int(r["unit"]): r for r in formulas.to_dict("records")}
                       if formulas is not None else {})
    rows = {int(r["unit"]): r for r in units.to_dict("records")}
    cards = [_card(c, rows[int(c["unit"])], am_by_unit.get(int(c["unit"])),
                   formula_by_unit.get(int(c["unit"])), viz, image_size, colors, iou_threshold)
             for c in manifest["units"]]
    cards.sort(key=lambda c: (-c["iou"], c["unit"]))
    det = units[units["detector"]]
    per_cat = [{"name": c, "color": colors[c],
                "detectors": int((det["category"] == c).sum()),
                "unique": unique_detectors(det[det["category"] == c])}
               for c in categories]
    zero_t = units[units["threshold"] <= 0]
    if "activity" in units.columns:
        flagged = {k: int((units["activity"] == k).sum()) for k in ("sparse", "dead")}
    else:
        flagged = {"T_k = 0": int(len(zero_t))}
    counts = layer_counts(units)
    counts.update(
        per_category=per_cat, flagged=flagged,
        flagged_detectors=int(det["threshold"].le(0).sum()) if "activity" not in units.columns
        else int(det["activity"].isin(["sparse", "dead"]).sum()),
        fdr=(int(units["detector_fdr"].astype(bool).sum())
             if "detector_fdr" in units.columns and units["detector_fdr"].notna().all()
             else None))
    rel = os.path.relpath(layer_dir.resolve(), out_dir.resolve())
    tables = {name: f"{Path(rel).as_posix()}/{name}.parquet"
              for name in ("units", "iou", "thresholds", "top_images", "activation_max",
                           "inversion", "formulas", "significance", "sweep")
              if (layer_dir / f"{name}.parquet").is_file()}
    notes = []
    if manifest.get("deconv_error"):
        notes.append(f"DeconvNet: {manifest['deconv_error']} (no unit of this layer has a "
                     "projection).")
    inversion = [dict(r, original=viz / r["original_file"],
                      reconstruction=viz / r["reconstruction_file"])
                 for r in manifest.get("inversion") or []]
    return {
        "name": layer, "slug": slug(layer), "counts": counts, "cards": cards,
        "detectors_png": layer_dir / "detectors.png" if (layer_dir / "detectors.png").is_file()
        else None,
        "sweep_png": layer_dir / "sweep.png" if (layer_dir / "sweep.png").is_file() else None,
        "tables": tables, "notes": notes, "inversion": inversion,
        "inversion_error": manifest.get("inversion_error"),
        "timings": manifest.get("timings", {}), "device": manifest.get("device"),
        "threads": manifest.get("threads"), "has_formulas": formulas is not None,
        "has_ci": "iou_low" in units.columns, "has_activity": "activity" in units.columns,
        "quantile": _quantile(layer_dir), "manifest": manifest,
    }


def _quantile(layer_dir: Path):
    t = _optional(layer_dir / "thresholds.parquet")
    if t is None or "quantile" not in t.columns or not len(t):
        return None
    return float(t["quantile"].iloc[0])


def _categories(iou: pd.DataFrame, dataset: dict | None) -> list[str]:
    if dataset and dataset["categories"] and dataset["categories"][0]["kind"] is not None:
        return [c["name"] for c in dataset["categories"]]
    return list(dict.fromkeys(iou["category"]))


# --- the pages -------------------------------------------------------------------------------
def build_model_report(model: str, layer_dirs: dict[str, str | Path], out: str | Path,
                       *, iou_figure: str | Path | None = None,
                       iou_threshold: float | None = None, prepared: str | Path | None = None,
                       dataset_name: str | None = None, spec: dict | None = None,
                       dissection: dict | None = None) -> Path:
    """results/<model>/report/index.html from the layers' tables and viz/ directories.
    `layer_dirs`: layer -> results/<model>/<layer>, in the order to show; `prepared`: the
    prepared dataset (for the Methods section's dataset facts and category list); `spec`: the
    model's resolved spec; `dissection`: the config's dissection section."""
    out = Path(out)
    layer_dirs = {k: Path(v) for k, v in layer_dirs.items()}
    if not layer_dirs:
        raise CnnvisError(f"{model}: no layers to report")
    first = next(iter(layer_dirs.values()))
    prov = read_provenance(first / "units.parquet")
    iou = pd.concat([pq.read_table(d / "iou.parquet", columns=["layer", "unit", "concept",
                                                                  "category", "iou"]).to_pandas()
                     for d in layer_dirs.values()], ignore_index=True)
    concepts = int(iou[["concept", "category"]].drop_duplicates().shape[0])
    dataset = dataset_info(prepared, dataset_name, list(dict.fromkeys(iou["category"])), concepts,
                           prov.get("dataset_digest"))
    categories = _categories(iou, dataset)
    colors = category_colors(categories)
    if iou_threshold is None and dissection:
        iou_threshold = dissection.get("iou_threshold")
    layers = [_layer(model, name, d, out.parent, colors, categories, dataset["image_size"],
                     iou_threshold) for name, d in layer_dirs.items()]
    iou_figure = Path(iou_figure) if iou_figure else out.with_name("iou_distribution.png")
    figures.plot_iou_distribution(iou, iou_figure, f"{model}: IoU distribution per category",
                                  categories, colors, iou_threshold)
    quantile = next((ly["quantile"] for ly in layers if ly["quantile"] is not None),
                    (dissection or {}).get("quantile"))
    method = method_info(prov=prov, dataset=dataset, quantile=quantile,
                         iou_threshold=iou_threshold, spec=spec, dissection=dissection,
                         manifest=layers[0]["manifest"])
    rel_iou = {name: f"{Path(os.path.relpath(d.resolve(), out.parent.resolve())).as_posix()}"
                     "/iou.parquet" for name, d in layer_dirs.items()}
    html = render("model_report.html", title=f"cnnvis report: {model}", model=model,
                  method=method, layers=layers, categories=categories, colors=colors,
                  iou_figure=iou_figure, iou_tables=rel_iou)
    return write_text(out, html)


def build_summary_page(reports: dict[str, str | Path], detectors: str | Path,
                       figure: str | Path, out: str | Path, *,
                       series: dict[str, str | Path] | None = None,
                       prepared: str | Path | None = None, dataset_name: str | None = None,
                       dissection: dict | None = None,
                       units: list[str | Path] | None = None) -> Path:
    """results/summary/index.html: Methods, every model and layer, the sortable models x
    categories table of unique detectors, the figure and the checkpoint-series figures
    (`series`: name -> PNG), links to each model's report (relative) and to the table.
    `units`: the units tables behind the counts (their provenance: each model's config digest,
    versions, device and precision)."""
    out, detectors = Path(out), Path(detectors)
    counts = _read(detectors, "detectors")
    prov = read_provenance(detectors)
    digests: dict[str, str] = {}
    for path in sorted(map(str, units or [])):
        p = read_provenance(path)
        model = p.get("model") or Path(path).parent.parent.name
        digests.setdefault(model, p.get("config_digest"))
        prov = {**p, **{k: v for k, v in prov.items() if v is not None}}
    if digests:
        prov["model_config_digests"] = dict(sorted(digests.items()))
    cats_seen = list(dict.fromkeys(counts["category"]))
    dataset = dataset_info(prepared, dataset_name, cats_seen, 0, prov.get("dataset_digest"))
    dataset["concepts"] = dataset["concepts"] or None
    categories = _categories(counts.rename(columns={}), dataset)
    categories += [c for c in cats_seen if c not in categories]
    colors = category_colors(categories)
    links = {m: Path(os.path.relpath(Path(p).resolve(), out.parent.resolve())).as_posix()
             for m, p in reports.items()}
    rows = []
    # FDR counts beside the plain ones, when the statistics produced them (null otherwise)
    extra = [c for c in ("detectors_fdr", "unique_detectors_fdr")
             if c in counts.columns and counts[c].notna().any()]
    for (m, lay), g in counts.groupby(["model", "layer"], sort=False):
        by_cat = g.set_index("category")
        rows.append({
            "model": m, "layer": lay, "report": links.get(m),
            "units": int(g["units"].iloc[0]), "detectors": int(g["detectors"].sum()),
            "unique": int(g["unique_detectors"].sum()),
            "extra": {c: int(g[c].sum()) if g[c].notna().all() else None for c in extra},
            "per_category": [int(by_cat["unique_detectors"].get(c, 0)) for c in categories]})
    rows.sort(key=lambda r: (r["model"], r["layer"]))
    method = method_info(prov=prov, dataset=dataset, quantile=(dissection or {}).get("quantile"),
                         iou_threshold=(dissection or {}).get("iou_threshold"), spec=False,
                         dissection=dissection, manifest=None)
    table = Path(os.path.relpath(detectors.resolve(), out.parent.resolve())).as_posix()
    html = render("summary.html", title="cnnvis summary", method=method, rows=rows,
                  categories=categories, colors=colors, extra=extra, figure=Path(figure),
                  series={k: Path(v) for k, v in sorted((series or {}).items())},
                  links=links, table=table)
    return write_text(out, html)
