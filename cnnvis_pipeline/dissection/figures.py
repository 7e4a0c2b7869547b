"""The dissection's figures (seaborn/matplotlib, drawn headless, written by fileio.save_figure).

- plot_layer_detectors(units, path, title, categories): detectors per concept, by category.
- plot_summary(counts, path): unique detectors per category, by model and layer.
- plot_series(counts, name, models, path): unique detectors over a checkpoint series.
- plot_sweep(sweep, path, title, iou_threshold): detectors against the IoU threshold, plain and
  under FDR (statistics).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cnnvis_pipeline.dissection.results import series_counts
from cnnvis_pipeline.fileio import save_figure
from cnnvis_pipeline.tables import category_colors, unique_detectors


def plot_layer_detectors(units: pd.DataFrame, path: str | Path, title: str,
                         categories: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels are data, never math
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
                    hue_order=[c for c in categories if c in set(counts["category"])],
                    palette=category_colors(categories), saturation=1, ax=ax)
        ax.tick_params(axis="x", rotation=90)
        ax.legend(title="category", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no detectors", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()  # no 0-1 axes around the sentence
    n_units = len(units)
    ax.set_title(f"{title}: {int(units['detector'].sum())}/{n_units} units are detectors, "
                 f"{unique_detectors(units)} unique concepts", fontsize=10)
    ax.set_xlabel("")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_summary(counts: pd.DataFrame, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels are data, never math
    import matplotlib.pyplot as plt

    data = counts.assign(where=counts["model"] + "\n" + counts["layer"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * data["where"].nunique() + 2), 4))
    # every category of the table, in its order and its colour (a category no unit detects
    # still has its legend entry, with 0)
    categories = list(dict.fromkeys(data["category"]))
    colors = category_colors(categories)
    totals = data.groupby("where", sort=False)["unique_detectors"].sum()
    bottom = pd.Series(0, index=totals.index)
    for cat in categories:
        g = data[data["category"] == cat]
        vals = g.set_index("where")["unique_detectors"].reindex(totals.index, fill_value=0)
        ax.bar(totals.index, vals, bottom=bottom, label=cat, color=colors[cat])
        bottom += vals
    if categories:
        ax.legend(title="category", fontsize=8)
    from matplotlib.ticker import MaxNLocator

    # counts: from 0, integer ticks, at least 0..1 (all zeros would give -0.04..0.04)
    ax.set_ylim(0, max(1.0, float(totals.max()) if len(totals) else 1.0) * 1.08)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("unique detectors")
    ax.set_title("Unique detectors per category, by model and layer")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_series(counts: pd.DataFrame, name: str, models: list[str], path: str | Path) -> None:
    """Unique detectors over training: x = checkpoint index in the series, y = unique detectors,
    hue = category, one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels are data, never math
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = series_counts(counts, name, models)
    layers = sorted(data["layer"].unique())
    present = set(data["category"])
    categories = [c for c in dict.fromkeys(counts["category"]) if c in present]
    ticks = sorted(set(data["checkpoint"]))
    labels = dict(zip(data["checkpoint"], data["checkpoint_name"], strict=False))
    cols = min(len(layers), 4)
    grid = sns.relplot(
        data=data, x="checkpoint", y="unique_detectors", hue="category", hue_order=categories,
        col="layer", col_order=layers, col_wrap=cols if len(layers) > cols else None,
        kind="line", marker="o", height=3.2, aspect=1.2, palette=category_colors(categories),
        facet_kws={"sharey": True},
    )
    from matplotlib.ticker import MaxNLocator

    top = max(1, int(data["unique_detectors"].max()) if len(data) else 1)
    for ax in grid.axes.flat:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{k}\n{labels[k]}" for k in ticks], fontsize=8)
        ax.set_ylim(-0.05 * top, top * 1.08)  # counts: integer ticks, zero lines visible
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    grid.set_axis_labels("checkpoint (index in the series)", "unique detectors")
    grid.set_titles(col_template="{col_name}")
    grid.figure.suptitle(f"Unique detectors over training: {name}", y=1.02)
    save_figure(grid.figure, path, bbox_inches="tight")
    plt.close(grid.figure)


def plot_sweep(sweep: pd.DataFrame, path: str | Path, title: str, iou_threshold: float) -> None:
    """Detectors and unique detectors of one layer against the IoU threshold, plain (wide, pale,
    solid) and under FDR (dashed, drawn above every plain line: where the two counts are equal
    the FDR line stays visible), summed over categories; a dotted line at the configured
    threshold."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # labels are data, never math
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = ["detectors", "unique_detectors", "detectors_fdr", "unique_detectors_fdr"]
    totals = sweep.groupby("iou_threshold", sort=True)[cols].sum(min_count=1)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = totals.index.to_numpy()
    lines = (("detectors", "tab:blue"), ("unique_detectors", "tab:orange"))
    for col, color in lines:
        ax.plot(x, totals[col], color=color, linewidth=3, alpha=0.45, zorder=2,
                label=col.replace("_", " "))
    for col, color in lines:
        if totals[f"{col}_fdr"].notna().all():
            ax.plot(x, totals[f"{col}_fdr"], color=color, linestyle="--", linewidth=1.5,
                    zorder=3, label=f"{col.replace('_', ' ')} (FDR)")
    ax.axvline(iou_threshold, color="0.4", linestyle=":", linewidth=1)
    ax.text(iou_threshold, 0.98, f" threshold {iou_threshold:g}", va="top", fontsize=8,
            color="0.3", transform=ax.get_xaxis_transform())
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("units / concepts")
    ax.set_title(f"{title}: detectors against the IoU threshold", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
