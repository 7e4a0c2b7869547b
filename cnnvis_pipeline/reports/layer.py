"""One layer of a model's report: counts, per-category detectors, notes, the table of every
unit (reports.units_table), unit cards (the selected units with every view, the other
detectors with their top images) and the views' entries, from the layer's tables and its views
manifest (tables.read_manifest).

Every view of the manifest is shown through its template, templates/views/<name>.html, whose
macros `method(settings, report)`, `card(entry, card)` and `layer(view, layer)` render its part
of the Methods line, of a unit's card and of the layer. Before that, every `...file` string and
`...files` list of an entry (PNGs in viz/) becomes an image {path, width, height}.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.reports import interventions
from cnnvis_pipeline.reports.format import number_or_none as _num
from cnnvis_pipeline.reports.format import png_size, slug
from cnnvis_pipeline.reports.units_table import (
    formula_replicates,
    formulas_with_stats,
    runner_ups,
    unit_rows,
)
from cnnvis_pipeline.tables import read_manifest, unique_detectors

MIN_TILE_PX = 96  # dataset images are shown at an integer scale of at least this width
TABLES = ("units", "iou", "thresholds", "top_images", "activation_max", "inversion", "formulas",
          "significance", "sweep", "ablation", "adversarial", "adversarial_concepts")


def layer_counts(units: pd.DataFrame) -> dict:
    """detectors / units, and unique concepts (distinct (category, label) among detectors)."""
    return {"units": int(len(units)), "detectors": int(units["detector"].sum()),
            "unique": unique_detectors(units)}


def read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; the {what} table is needed for the report")
    return pq.read_table(path).to_pandas()



def _activity(row: dict, card: dict | None) -> str | None:
    """`sparse`/`dead` for a unit whose T_k is 0, from units.activity when present, else from
    its highest dataset activation (> 0: sparse; without a card: `T_k = 0`)."""
    activity = row.get("activity")
    if isinstance(activity, str) and activity:
        return None if activity == "ok" else activity
    if float(row["threshold"]) > 0:
        return None
    if card is None:
        return "T_k = 0"
    top = card.get("dataset_top_activation")
    return "sparse" if top is not None and float(top) > 0 else "dead"


def embed(entry, viz: Path):
    """The entry with its files (keys ending in `file` / `files`) as images in viz/."""
    def image(name: str) -> dict:
        w, h = png_size(viz / name)
        return {"path": viz / name, "width": w, "height": h}

    if isinstance(entry, dict):
        out = {}
        for k, v in entry.items():
            if k.endswith("file") and isinstance(v, str):
                out[k] = image(v)
            elif k.endswith("files") and isinstance(v, list):
                out[k] = [image(f) for f in v]
            else:
                out[k] = embed(v, viz)
        return out
    if isinstance(entry, list):
        return [embed(v, viz) for v in entry]
    return entry


def _fdr(row: dict) -> bool | None:
    fdr = row.get("detector_fdr")
    return None if fdr is None or (isinstance(fdr, float) and fdr != fdr) else bool(fdr)


def _card(card: dict, row: dict, formula: dict | None, viz: Path, scale: int | None,
          colors: dict, iou_threshold) -> dict:
    detector, fdr = bool(row["detector"]), _fdr(row)
    return {
        "unit": int(card["unit"]), "concept": str(row["concept"]),
        "category": str(row["category"]), "color": colors.get(str(row["category"]), "#777"),
        "iou": float(row["iou"]), "iou_low": _num(row.get("iou_low")),
        "iou_high": _num(row.get("iou_high")), "p_value": _num(row.get("p_value")),
        "q_value": _num(row.get("q_value")), "detector": detector, "detector_fdr": fdr,
        "not_significant": detector and fdr is False, "requested": bool(card["requested"]),
        "selected": bool(card["selected"]),
        "threshold": float(row["threshold"]), "activity": _activity(row, card),
        "active_fraction": _num(row.get("active_fraction")), "formula": formula,
        "iou_threshold": iou_threshold, "scale": scale,
        "views": {name: embed(entry, viz) for name, entry in card["views"].items()},
    }


def _per_category(units: pd.DataFrame, categories: list[str], colors: dict) -> dict:
    det = units[units["detector"]]
    per_cat = [{"name": c, "color": colors[c], "detectors": int((det["category"] == c).sum()),
                "unique": unique_detectors(det[det["category"] == c])} for c in categories]
    if "activity" in units.columns:
        flagged = {k: int((units["activity"] == k).sum()) for k in ("sparse", "dead")}
        flagged_detectors = int(det["activity"].isin(["sparse", "dead"]).sum())
    else:
        flagged = {"T_k = 0": int((units["threshold"] <= 0).sum())}
        flagged_detectors = int(det["threshold"].le(0).sum())
    fdr = (int(units["detector_fdr"].astype(bool).sum())
           if "detector_fdr" in units.columns and units["detector_fdr"].notna().all() else None)
    return dict(layer_counts(units), per_category=per_cat, flagged=flagged,
                flagged_detectors=flagged_detectors, fdr=fdr)


def _views(manifest: dict, viz: Path) -> list[dict]:
    return [dict(manifest["views"][name], name=name,
                 layer=embed(manifest["views"][name]["layer"], viz))
            for name in manifest["order"]]


def _optional(path: Path) -> pd.DataFrame | None:
    return pq.read_table(path).to_pandas() if path.is_file() else None


def layer_section(layer: str, layer_dir: Path, out_dir: Path, *, colors: dict,
                  categories: list[str], image_size, iou_threshold) -> dict:
    """The template context of one layer."""
    units = read(layer_dir / "units.parquet", "units").sort_values("unit")
    viz = layer_dir / "viz"
    manifest = read_manifest(viz / "manifest.json")
    formula_by_unit, formula_note = formulas_with_stats(_optional(layer_dir / "formulas.parquet"))
    replicates = formula_replicates(layer_dir / "formulas.parquet") if formula_by_unit else None
    rows = {int(r["unit"]): r for r in units.to_dict("records")}
    scale = max(1, -(-MIN_TILE_PX // int(image_size[1]))) if image_size else None
    cards = [_card(c, rows[int(c["unit"])], formula_by_unit.get(int(c["unit"])), viz, scale,
                   colors, iou_threshold) for c in manifest["units"]]
    cards.sort(key=lambda c: (-c["iou"], c["unit"]))
    abl, adv = interventions.ablation(layer_dir), interventions.adversarial(layer_dir)
    for c in cards:
        c["ablation"] = abl["per_unit"].get(c["unit"], []) if abl else None
        c["adversarial"] = adv["per_unit"].get(c["unit"], []) if adv else None
    by_unit = {int(c["unit"]): c for c in manifest["units"]}
    card_ids = {c["unit"]: f"{slug(layer)}-unit-{c['unit']}" for c in cards}
    table = unit_rows(units, runner_ups(_optional(layer_dir / "significance.parquet")),
                      formula_by_unit, {u: _activity(r, by_unit.get(u)) for u, r in rows.items()},
                      card_ids)
    rel = Path(os.path.relpath(layer_dir.resolve(), out_dir.resolve())).as_posix()
    figure = {name: layer_dir / f"{name}.png" if (layer_dir / f"{name}.png").is_file() else None
              for name in ("detectors", "sweep")}
    return {
        "name": layer, "slug": slug(layer), "counts": _per_category(units, categories, colors),
        "cards": cards, "units_table": table, "formula_note": formula_note,
        "formula_replicates": replicates, "ablation": abl, "adversarial": adv,
        "selected": sum(c["selected"] for c in cards),
        "detectors_png": figure["detectors"], "sweep_png": figure["sweep"],
        "tables": {name: f"{rel}/{name}.parquet" for name in TABLES
                   if (layer_dir / f"{name}.parquet").is_file()},
        "views": _views(manifest, viz), "device": manifest["device"],
        "threads": manifest["threads"], "top_units": manifest["top_units"],
    }
