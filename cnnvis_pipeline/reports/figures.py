"""The report's own figure: each unit's best IoU per category, one panel per layer, in the
category colours every figure and page shares (tables.category_colors)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from cnnvis_pipeline.fileio import save_figure


def best_iou_per_category(iou: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, unit, category): the unit's highest IoU over the category's concepts."""
    return iou.groupby(["layer", "unit", "category"], sort=True)["iou"].max().reset_index()


def plot_iou_distribution(iou: pd.DataFrame, path: str | Path, title: str,
                          categories: list[str], colors: dict[str, str],
                          iou_threshold: float | None = None) -> Path:
    """Box + strip plot per category (every category of the dataset, in its colour), one panel
    per layer; the detector threshold as a dashed line labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels are data, never math
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = best_iou_per_category(iou)
    layers = list(dict.fromkeys(iou["layer"]))
    n = max(1, len(layers))
    width = max(4.0, 0.75 * len(categories) + 1.4)
    fig, axes = plt.subplots(1, n, figsize=(min(22.0, width * n), 3.8), sharey=True,
                             squeeze=False)
    palette = {c: colors[c] for c in categories}
    for ax, layer in zip(axes[0], layers, strict=False):
        d = data[data["layer"] == layer]
        with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib's deprecated `vert`
            warnings.simplefilter("ignore", DeprecationWarning)
            sns.boxplot(data=d, x="category", y="iou", hue="category", order=categories,
                        hue_order=categories, palette=palette, showfliers=False, ax=ax,
                        legend=False, boxprops={"alpha": 0.45})
        sns.stripplot(data=d, x="category", y="iou", hue="category", order=categories,
                      hue_order=categories, palette=palette, size=2.5, alpha=0.8, ax=ax,
                      legend=False)
        if iou_threshold is not None:
            ax.axhline(iou_threshold, color="#b22", ls="--", lw=1,
                       label=f"detector threshold: IoU > {iou_threshold:g}")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    axes[0][0].set_ylabel("best IoU of each unit in the category")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)
