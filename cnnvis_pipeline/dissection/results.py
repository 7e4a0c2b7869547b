"""From merged statistics to the dissection tables and figures.

- iou_columns / unit_columns: the iou and units tables of one layer from a ConceptTally.
- top_image_columns: per unit the k images with the highest maximum activation.
- detector_counts(units_df): per (model, layer, category) the detectors and unique detectors
  (the paper's counting rule: distinct labels that are some unit's top concept with IoU above the
  threshold, per category).
- plot_layer_detectors(units_df, path): seaborn bar chart of detectors per concept by category.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.stats import ConceptTally


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
    }


def top_image_columns(model: str, layer: str, maxima: np.ndarray, ds: PreparedDataset,
                      k: int) -> dict:
    """maxima: float [N, U] each image's maximum activation per unit (image order)."""
    n, u = maxima.shape
    k = min(k, n)
    vals = maxima.astype(np.float64)
    # Highest first; ties broken by the lower image index (lexsort is stable).
    order = np.stack([np.lexsort((np.arange(n), -vals[:, j]))[:k] for j in range(u)])
    names = ds.meta["images"]
    return {
        "model": [model] * (u * k),
        "layer": [layer] * (u * k),
        "unit": np.repeat(np.arange(u, dtype=np.int32), k),
        "rank": np.tile(np.arange(k, dtype=np.int32), u),
        "image_index": order.reshape(-1).astype(np.int64),
        "image": [names[i] for i in order.reshape(-1)],
        "max_activation": np.take_along_axis(vals.T, order, axis=1).reshape(-1),
    }


def detector_counts(units: pd.DataFrame, categories: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for (model, layer), g in units.groupby(["model", "layer"], sort=True):
        cats = categories or sorted(units["category"].unique())
        det = g[g["detector"]]
        for cat in cats:
            d = det[det["category"] == cat]
            rows.append({
                "model": model, "layer": layer, "category": cat, "units": len(g),
                "detectors": len(d), "unique_detectors": d["label"].nunique(),
            })
    return pd.DataFrame(rows, columns=["model", "layer", "category", "units", "detectors",
                                       "unique_detectors"])


def plot_layer_detectors(units: pd.DataFrame, path: str | Path, title: str,
                         categories: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    det = units[units["detector"]]
    counts = det.groupby(["category", "concept"]).size().reset_index(name="detectors")
    order = {c: i for i, c in enumerate(categories)}
    counts = counts.sort_values(
        ["category", "detectors", "concept"], key=lambda s: s.map(order) if s.name == "category" else s,
        ascending=[True, False, True],
    )
    fig_w = max(6.0, 0.28 * len(counts) + 2)
    fig, ax = plt.subplots(figsize=(fig_w, 3.6))
    if len(counts):
        sns.barplot(data=counts, x="concept", y="detectors", hue="category", dodge=False,
                    hue_order=[c for c in categories if c in set(counts["category"])], ax=ax)
        ax.tick_params(axis="x", rotation=90)
        ax.legend(title="category", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no detectors", ha="center", va="center", transform=ax.transAxes)
    n_units = len(units)
    ax.set_title(f"{title}: {int(units['detector'].sum())}/{n_units} units are detectors, "
                 f"{det.groupby('category')['label'].nunique().sum()} unique concepts", fontsize=10)
    ax.set_xlabel("")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None, "Creation Time": None})
    plt.close(fig)
