"""From merged statistics to the dissection tables and figures.

- iou_columns / unit_columns: the iou and units tables of one layer from a ConceptTally.
- unit_activity(tally, ds, thresholds): active_fraction and activity ("ok", "sparse", "dead");
  log_activity warns about sparse and dead units.
- top_images: per unit the k images with the highest maximum activation (of some units, a part
  of a layer's units); top_image_table: the top_images table's columns from those of every unit.
- detector_counts(units_df): per (model, layer, category) the detectors and unique detectors
  (tables.unique_detectors, the paper's counting rule).
- series_counts(counts, name, models): the rows of one checkpoint series, in checkpoint order.

The figures drawn from these are in figures.py.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.tally import ConceptTally
from cnnvis_pipeline.tables import unique_detectors

log = logging.getLogger(__name__)


def iou_columns(model: str, layer: str, tally: ConceptTally, ds: PreparedDataset) -> dict:
    iou, inter, union = tally.iou(ds.concept_category)
    u, c = iou.shape
    names = np.array([x["name"] for x in ds.concepts], dtype=object)
    cats = np.array([x["category"] for x in ds.concepts], dtype=object)
    return {
        "model": [model] * (u * c),
        "layer": [layer] * (u * c),
        "unit": np.repeat(np.arange(u, dtype=np.int32), c),
        "concept": np.tile(names, u),
        "label": np.tile(ds.concept_label.astype(np.int32), u),
        "category": np.tile(cats, u),
        "iou": iou.reshape(-1),
        "intersection": inter.reshape(-1),
        "union": union.reshape(-1),
    }


def unit_columns(model: str, layer: str, tally: ConceptTally, ds: PreparedDataset,
                 thresholds: np.ndarray, iou_threshold: float) -> dict:
    iou, _, _ = tally.iou(ds.concept_category)
    best = iou.argmax(axis=1)  # first maximum: ties go to the earlier concept (stable)
    best_iou = iou[np.arange(len(best)), best]
    fraction, activity = unit_activity(tally, ds, thresholds)
    return {
        "model": [model] * len(best),
        "layer": [layer] * len(best),
        "unit": np.arange(len(best), dtype=np.int32),
        "threshold": np.asarray(thresholds, np.float64),
        "concept": [ds.concepts[i]["name"] for i in best],
        "label": ds.concept_label[best].astype(np.int32),
        "category": [ds.concepts[i]["category"] for i in best],
        "iou": best_iou,
        "detector": best_iou > iou_threshold,
        "active_fraction": fraction,
        "activity": activity,
    }


def unit_activity(tally: ConceptTally, ds: PreparedDataset, thresholds: np.ndarray):
    """(active_fraction [U], activity [U]): the fraction of all (image, position) cells of each
    unit's upsampled map above T_k, and "ok", "sparse" (T_k == 0 and some cell above it) or
    "dead" (no cell above T_k: all zero, constant, or ties at the top)."""
    area = tally.unit_area.cpu().numpy().astype(np.int64)
    cells = len(ds) * int(np.prod(ds.seg_size))
    fraction = area / cells if cells else np.zeros(len(area))
    t = np.asarray(thresholds, np.float64)
    activity = np.where(area == 0, "dead", np.where(t == 0, "sparse", "ok"))
    return fraction.astype(np.float64), [str(a) for a in activity]


def log_activity(model: str, layer: str, activity) -> None:
    """Warn (the tables job's log) about dead units and units with threshold 0."""
    act = np.asarray(activity)
    for kind, why in (("dead", "never above their threshold (all zero, constant or tied at the "
                               "top)"),
                      ("sparse", "have threshold 0 (active at fewer positions than the quantile)")):
        ids = np.flatnonzero(act == kind)
        if len(ids):
            shown = ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "")
            log.warning("%s %s: %d of %d units are %s: %s (units %s)", model, layer, len(ids),
                        len(act), kind, why, shown)


def top_images(maxima: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(image index int64 [U, k], maximum float64 [U, k]): each unit's k images with the highest
    maximum, highest first, ties broken by the lower image index (each unit on its own)."""
    n, u = maxima.shape
    k = min(k, n)
    vals = maxima.astype(np.float64)
    # Highest first; ties broken by the lower image index (lexsort is stable).
    order = np.stack([np.lexsort((np.arange(n), -vals[:, j]))[:k] for j in range(u)])
    order = order.reshape(u, k).astype(np.int64)
    return order, np.take_along_axis(vals.T, order, axis=1)


def top_image_table(model: str, layer: str, order: np.ndarray, values: np.ndarray,
                    ds: PreparedDataset) -> dict:
    """The top_images table of a layer from top_images of all its units (in unit order)."""
    u, k = order.shape
    names = ds.meta["images"]
    return {
        "model": [model] * (u * k),
        "layer": [layer] * (u * k),
        "unit": np.repeat(np.arange(u, dtype=np.int32), k),
        "rank": np.tile(np.arange(k, dtype=np.int32), u),
        "image_index": order.reshape(-1).astype(np.int64),
        "image": [names[i] for i in order.reshape(-1)],
        "max_activation": values.reshape(-1),
    }


def detector_counts(units: pd.DataFrame, categories: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for (model, layer), g in units.groupby(["model", "layer"], sort=True):
        cats = categories or sorted(units["category"].unique())
        det = g[g["detector"]]
        # under FDR control (significance columns; null when statistics were disabled)
        fdr = "detector_fdr" in g and g["detector_fdr"].notna().all()
        for cat in cats:
            d = det[det["category"] == cat]
            f = d[d["detector_fdr"].astype(bool)] if fdr else None
            rows.append({
                "model": model, "layer": layer, "category": cat, "units": len(g),
                "detectors": len(d), "unique_detectors": unique_detectors(d),
                "detectors_fdr": len(f) if fdr else None,
                "unique_detectors_fdr": unique_detectors(f) if fdr else None,
            })
    return pd.DataFrame(rows, columns=["model", "layer", "category", "units", "detectors",
                                       "unique_detectors", "detectors_fdr",
                                       "unique_detectors_fdr"])


def series_counts(counts: pd.DataFrame, name: str, models: list[str]) -> pd.DataFrame:
    """The rows of `counts` for one checkpoint series, with `checkpoint` (index in the series)
    and `checkpoint_name` (the checkpoint's stem: the model name without `<series>-`)."""
    index = {m: k for k, m in enumerate(models)}
    data = counts[counts["model"].isin(index)].copy()
    data["checkpoint"] = data["model"].map(index).astype(int)
    prefix = f"{name}-"
    data["checkpoint_name"] = [m[len(prefix):] if m.startswith(prefix) else m for m in data["model"]]
    return data.sort_values(["layer", "checkpoint", "category"]).reset_index(drop=True)
