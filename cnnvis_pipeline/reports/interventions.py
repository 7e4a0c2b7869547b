"""The interventions of one layer in the report, when their tables exist (docs/DEFINITIONS.md,
"Ablation" and "Adversarial noise"; schemas tables.SCHEMAS["ablation" | "adversarial" |
"adversarial_concepts"]):

- ablation(layer_dir): per class its most harmful single units (rank <= TOP_UNITS) with the
  change's interval and whether the unit detects a related concept, the concept groups with the
  largest drops, the headline (classes whose most harmful unit is related), and per unit the
  classes it matters for (rank <= CARD_RANK or an interval below 0).
- adversarial(layer_dir): per attack eps, steps, flip rate, detectors lost of all detectors and
  the concepts losing the most detectors; per unit its IoU clean and attacked.
- summary_row(layer_dir): the summary page's comparison of models (ablation: the mean over
  classes of the largest single-unit drop, the share of related rank-1 units; adversarial: per
  attack the flip rate and detectors lost / detectors).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from cnnvis_pipeline.reports.format import number_or_none

TOP_UNITS = 5  # units listed per class
CARD_RANK = 3  # a unit's card lists the classes where it ranks this high (or is significant)
TOP_GROUPS = 10  # concept groups and concepts listed


def _read(path: Path) -> pd.DataFrame | None:
    return pq.read_table(path).to_pandas() if path.is_file() else None


def _change(r: dict) -> dict:
    return {"change": number_or_none(r["change"]), "low": number_or_none(r.get("change_low")),
            "high": number_or_none(r.get("change_high"))}


def _classes(units: pd.DataFrame) -> list[dict]:
    out = []
    for cls, g in units.sort_values(["class", "rank"]).groupby("class", sort=True):
        top = g[g["rank"] <= TOP_UNITS]
        out.append({"name": str(cls), "images": int(g["images"].iloc[0]),
                    "before": number_or_none(g["before"].iloc[0]),
                    "units": [dict(_change(r), unit=int(r["unit"]), concept=str(r["concept"]),
                                   related=bool(r["related"]), detector=bool(r["detector"]))
                              for r in top.to_dict("records")]})
    return out


def ablation(layer_dir: Path) -> dict | None:
    t = _read(layer_dir / "ablation.parquet")
    if t is None:
        return None
    units = t[t["kind"] == "unit"]
    groups = t[t["kind"] == "concept"].sort_values(["change", "group"])
    first = units[units["rank"] == 1]
    per_unit: dict[int, list[dict]] = {}
    mattering = units[(units["rank"] <= CARD_RANK) | (units["change_high"] < 0)]
    for r in mattering.sort_values(["change", "class"]).to_dict("records"):
        per_unit.setdefault(int(r["unit"]), []).append(dict(_change(r), name=str(r["class"])))
    return {
        "metric": str(t["metric"].iloc[0]) if len(t) else None,
        "classes": _classes(units),
        "groups": [dict(_change(r), group=str(r["group"]), name=str(r["class"]))
                   for r in groups.head(TOP_GROUPS).to_dict("records")],
        "related_first": int(first["related"].astype(bool).sum()), "n_classes": int(len(first)),
        "per_unit": {u: v[:CARD_RANK + 2] for u, v in per_unit.items()},
        "png": layer_dir / "ablation.png" if (layer_dir / "ablation.png").is_file() else None,
    }


def _attacks(t: pd.DataFrame, concepts: pd.DataFrame | None) -> list[dict]:
    out = []
    for attack, g in t.groupby("attack", sort=True):
        det = g[g["detector"].astype(bool)]
        c = (concepts[(concepts["attack"] == attack) & (concepts["detectors_lost"] > 0)]
             .sort_values(["detectors_lost", "concept"], ascending=[False, True])
             if concepts is not None else None)
        out.append({
            "attack": str(attack), "eps": number_or_none(g["eps"].iloc[0]), "steps": int(g["steps"].iloc[0]),
            "flip_rate": number_or_none(g["flip_rate"].iloc[0]), "detectors": int(len(det)),
            "lost": int((~det["detector_attacked"].astype(bool)).sum()),
            "concepts": [] if c is None else [
                {"concept": str(r["concept"]), "category": str(r["category"]),
                 "detectors": int(r["detectors"]), "lost": int(r["detectors_lost"])}
                for r in c.head(TOP_GROUPS).to_dict("records")]})
    return out


def adversarial(layer_dir: Path) -> dict | None:
    t = _read(layer_dir / "adversarial.parquet")
    if t is None:
        return None
    per_unit: dict[int, list[dict]] = {}
    for r in t.sort_values(["unit", "attack"]).to_dict("records"):
        per_unit.setdefault(int(r["unit"]), []).append({
            "attack": str(r["attack"]), "iou_clean": number_or_none(r["iou_clean"]),
            "iou_attacked": number_or_none(r["iou_attacked"]),
            "lost": bool(r["detector"]) and not bool(r["detector_attacked"])})
    return {"attacks": _attacks(t, _read(layer_dir / "adversarial_concepts.parquet")),
            "per_unit": per_unit,
            "png": layer_dir / "adversarial.png" if (layer_dir / "adversarial.png").is_file()
            else None}


def summary_row(layer_dir: Path) -> dict | None:
    """The summary page's intervention columns of one layer (None without any)."""
    a, x = ablation(layer_dir), adversarial(layer_dir)
    if a is None and x is None:
        return None
    row: dict = {"ablation": None, "attacks": {}}
    if a is not None and a["classes"]:
        drops = [c["units"][0]["change"] for c in a["classes"]
                 if c["units"] and c["units"][0]["change"] is not None]
        row["ablation"] = {"mean_drop": sum(drops) / len(drops) if drops else None,
                           "related": a["related_first"], "classes": a["n_classes"],
                           "metric": a["metric"]}
    for k in (x or {}).get("attacks", []):
        row["attacks"][k["attack"]] = {"flip_rate": k["flip_rate"], "lost": k["lost"],
                                       "detectors": k["detectors"]}
    return row
