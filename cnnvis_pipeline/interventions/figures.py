"""The interventions' figures, one PNG per layer (matplotlib, headless, math text off, written by
fileio.save_figure).

- plot_ablation(table, path, title, classes, top): for the `classes` classes hurt most by a
  single unit, the `top` most harmful units of each (change of the class's score), bars
  coloured by whether the unit detects a concept related to the class.
- plot_adversarial(units, concepts, path, title): per attack, each unit's IoU with its label
  clean against attacked (detectors marked), and the detectors each concept loses.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cnnvis_pipeline.fileio import save_figure

RELATED, OTHER = "#D55E00", "#7F7F7F"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ablation(table: pd.DataFrame, path: str | Path, title: str, classes: int = 12,
                  top: int = 5) -> None:
    plt = _pyplot()
    single = table[table["kind"] == "unit"].dropna(subset=["change"])
    worst = (single.groupby("class")["change"].min().sort_values(kind="stable").head(classes))
    n = max(len(worst), 1)
    cols = min(4, n)
    rows = -(-n // cols)
    with plt.rc_context({"text.parse_math": False}):
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.35 * top * rows + 1.2 * rows),
                                 squeeze=False)
        for ax in axes.flat[len(worst):]:
            ax.axis("off")
        if not len(worst):
            axes[0, 0].axis("on")
            axes[0, 0].text(0.5, 0.5, "no ablation rows", ha="center", va="center",
                            transform=axes[0, 0].transAxes)
        for ax, cls in zip(axes.flat, worst.index, strict=False):
            rows_c = single[single["class"] == cls].sort_values(["change", "unit"]).head(top)
            labels = [f"{int(r.unit)} {r.concept if r.detector else '-'}"
                      for r in rows_c.itertuples()]
            y = range(len(rows_c))[::-1]
            ax.barh(list(y), rows_c["change"], color=[RELATED if r else OTHER
                                                      for r in rows_c["related"]])
            ax.set_yticks(list(y), labels, fontsize=7)
            ax.axvline(0, color="black", linewidth=0.6)
            ax.set_title(str(cls), fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
        metric = str(table["metric"].iloc[0]) if len(table) else ""
        fig.suptitle(f"{title}: change of {metric} when one unit is ablated (orange: the unit "
                     "detects a related concept)", fontsize=9)
        fig.tight_layout()
        save_figure(fig, path)
        plt.close(fig)


def plot_adversarial(units: pd.DataFrame, concepts: pd.DataFrame, path: str | Path,
                     title: str) -> None:
    plt = _pyplot()
    attacks = list(dict.fromkeys(units["attack"])) or ["-"]
    with plt.rc_context({"text.parse_math": False}):
        fig, axes = plt.subplots(2, len(attacks), figsize=(4.2 * len(attacks), 7.0),
                                 squeeze=False)
        for j, name in enumerate(attacks):
            u = units[units["attack"] == name]
            ax = axes[0, j]
            det = u["detector"].astype(bool)
            ax.scatter(u.loc[~det, "iou_clean"], u.loc[~det, "iou_attacked"], s=8, c=OTHER,
                       label="other units")
            ax.scatter(u.loc[det, "iou_clean"], u.loc[det, "iou_attacked"], s=10, c=RELATED,
                       label="detectors")
            top = float(max(u["iou_clean"].max(), u["iou_attacked"].max(), 0.01)) if len(u) \
                else 1.0
            ax.plot([0, top], [0, top], color="black", linewidth=0.6)
            eps = float(u["eps"].iloc[0]) if len(u) else 0.0
            flips = float(u["flip_rate"].iloc[0]) if len(u) else 0.0
            ax.set_title(f"{name} eps {eps:.4g}: {flips:.0%} predictions flip", fontsize=9)
            ax.set_xlabel("IoU with its label, clean", fontsize=8)
            ax.set_ylabel("IoU with the same label, attacked", fontsize=8)
            ax.legend(fontsize=7)
            ax = axes[1, j]
            c = concepts[concepts["attack"] == name].sort_values(
                ["detectors_lost", "detectors", "concept"], ascending=[False, False, True]).head(20)
            x = range(len(c))
            ax.bar(list(x), c["detectors"], color=OTHER, label="detectors, clean")
            ax.bar(list(x), c["detectors_lost"], color=RELATED, label="stop detecting")
            ax.set_xticks(list(x), list(c["concept"]), rotation=90, fontsize=7)
            ax.legend(fontsize=7)
            if not len(c):
                ax.text(0.5, 0.5, "no detectors", ha="center", va="center",
                        transform=ax.transAxes)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        save_figure(fig, path)
        plt.close(fig)
