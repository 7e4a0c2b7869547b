"""The table of every unit of a layer (templates/_units_table.html): per unit its label, category,
IoU with its interval, p and q, the detector flags, the runner-up concepts (significance.parquet,
ranks after the label), its formula with the formula's own statistics (formulas.parquet), its
activity and T_k, and a link to its card when it has one.

A formula is shown only with its statistics (interval, p, q and `formula_detector`); one whose
`formula_detector` is false is marked "not significant". Formulas of a table without those
columns are not shown (the layer says why).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cnnvis_pipeline.reports.format import number_or_none as _num
from cnnvis_pipeline.tables import read_provenance

FORMULA_STATS = ("iou_low", "iou_high", "p_value", "q_value", "formula_detector")



def _flag(x) -> bool | None:
    return None if x is None or (isinstance(x, float) and x != x) else bool(x)


def runner_ups(sig: pd.DataFrame | None) -> dict[int, list[dict]]:
    """unit -> the concepts ranked after its label (rank 1, 2, ...), with IoU and FDR flag."""
    if sig is None or not len(sig) or "rank" not in sig.columns:
        return {}
    rows = sig[sig["rank"] > 0].sort_values(["unit", "rank"])
    out: dict[int, list[dict]] = {}
    for r in rows.to_dict("records"):
        out.setdefault(int(r["unit"]), []).append({
            "concept": str(r["concept"]), "category": str(r["category"]),
            "iou": float(r["iou"]), "q_value": _num(r.get("q_value")),
            "detector_fdr": _flag(r.get("detector_fdr"))})
    return out


def formulas_with_stats(formulas: pd.DataFrame | None) -> tuple[dict[int, dict], str | None]:
    """unit -> its formula entry, and a note when formulas exist but cannot be shown."""
    if formulas is None or not len(formulas):
        return {}, None
    missing = [c for c in FORMULA_STATS if c not in formulas.columns]
    if missing:
        return {}, ("formulas.parquet has no statistics (" + ", ".join(missing) + "): its "
                    "formulas are not shown; rerun the compositional step")
    out = {}
    for r in formulas.to_dict("records"):
        out[int(r["unit"])] = {
            "formula": str(r["formula"]), "iou": float(r["iou"]),
            "iou_low": _num(r["iou_low"]), "iou_high": _num(r["iou_high"]),
            "p_value": _num(r["p_value"]), "q_value": _num(r["q_value"]),
            "significant": bool(r["formula_detector"]),
            "single_concept": str(r["single_concept"]) if "single_concept" in r else None,
            "single_iou": _num(r.get("single_iou"))}
    return out, None


def formula_replicates(path: Path) -> int | None:
    """R, the label permutations behind the formulas' p-values (their provenance's
    `compositional` settings), when recorded."""
    settings = read_provenance(path).get("compositional")
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except ValueError:
            return None
    value = settings.get("null_replicates") if isinstance(settings, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def unit_rows(units: pd.DataFrame, runners: dict[int, list[dict]], formulas: dict[int, dict],
              activity: dict[int, str | None], card_ids: dict[int, str]) -> list[dict]:
    """One row per unit of the layer, by unit."""
    rows = []
    for r in units.sort_values("unit").to_dict("records"):
        u = int(r["unit"])
        rows.append({
            "unit": u, "concept": str(r["concept"]), "category": str(r["category"]),
            "iou": float(r["iou"]), "iou_low": _num(r.get("iou_low")),
            "iou_high": _num(r.get("iou_high")), "p_value": _num(r.get("p_value")),
            "q_value": _num(r.get("q_value")), "detector": bool(r["detector"]),
            "detector_fdr": _flag(r.get("detector_fdr")), "runner_ups": runners.get(u, []),
            "formula": formulas.get(u), "activity": activity.get(u),
            "threshold": float(r["threshold"]), "card": card_ids.get(u)})
    return rows
