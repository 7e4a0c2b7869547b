"""Ablation: what removing units of a layer does to each class (Bau et al., PNAS 2020).

For every group of units (each unit alone, and the `top_n` detectors of each concept together,
from the layer's units table) the model classifies the images of a ClassData with the group's
units zeroed (models.edits.run_groups: many groups per forward pass), and each class's score is
compared with the unablated model's on the same images.

Scores of class k on an image of class k (`metric`):
- accuracy: single-label, 1 when output k is the largest (1/m when m outputs tie for the
  largest: the expected accuracy under random tie-breaking, so a model with all outputs equal
  is at chance, 1/outputs); multi-label, 1 when output k > 0 (1/2 at exactly 0), i.e. the
  recall of class k at the model's own decision threshold;
- probability: softmax (single-label) or sigmoid (multi-label) of output k;
- logit: output k.
`before`/`after` are the means over the class's images; `change` = after - before; its interval
is a percentile bootstrap over the class's images (paired: the same draw for before and after),
`replicates` draws seeded by the run's seed and the class index.

`rank` orders the single units of each class by change (1 = the most harmful; ties by unit).
`related`: the unit is a detector (a group: its concept) whose concept is among the class's
related concepts (classdata: the class's own concept for a `train:` model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.interventions.classdata import ClassData
from cnnvis_pipeline.models.edits import run_groups
from cnnvis_pipeline.models.input import normalize
from cnnvis_pipeline.progress import Progress

log = logging.getLogger(__name__)
METRICS = ("accuracy", "probability", "logit")


@dataclass(frozen=True)
class Group:
    """Units ablated together: one unit ("unit"), or a concept's top detectors ("concept")."""

    kind: str
    units: tuple[int, ...]
    concept: str | None
    category: str | None
    detector: bool

    @property
    def name(self) -> str:
        if self.kind == "unit":
            return f"unit {self.units[0]}"
        return f"{self.concept} ({self.category}) top {len(self.units)}"


def ablation_groups(units: pd.DataFrame, *, single: bool = True, top_n: int = 0) -> list[Group]:
    """Each unit of a units table alone (`single`), then for each concept with detectors its
    `top_n` detectors by IoU (ties by unit) together, concepts in (category, concept) order."""
    units = units.sort_values("unit")
    out = []
    if single:
        out += [Group("unit", (int(r.unit),), r.concept, r.category, bool(r.detector))
                for r in units.itertuples()]
    if top_n > 0:
        det = units[units["detector"].astype(bool)]
        for (cat, concept), g in sorted(det.groupby(["category", "concept"]), key=lambda t: t[0]):
            top = g.sort_values(["iou", "unit"], ascending=[False, True]).head(top_n)
            out.append(Group("concept", tuple(int(u) for u in top["unit"]), concept, cat, True))
    return out


def class_scores(out: torch.Tensor, outputs: torch.Tensor, metric: str,
                 multi_label: bool) -> torch.Tensor:
    """[..., O] model outputs -> [..., K] scores of the classes at `outputs` (module docstring)."""
    out = out.float()
    if metric == "logit":
        return out[..., outputs]
    if metric == "probability":
        p = torch.sigmoid(out) if multi_label else torch.softmax(out, -1)
        return p[..., outputs]
    if metric != "accuracy":
        raise CnnvisError(f"config: ablation.metric: {metric!r} is not one of {METRICS}")
    if multi_label:
        o = out[..., outputs]
        return (o > 0).float() + 0.5 * (o == 0).float()
    top = out.amax(-1, keepdim=True)
    tied = (out == top).float()
    return tied[..., outputs] / tied.sum(-1, keepdim=True)


@torch.no_grad()
def at_layer_ok(model, x: torch.Tensor, layer: str, groups, layouts, model_name: str) -> bool:
    """Whether repeating at the layer gives what repeating the input gives (same up to float
    rounding) on this batch: a model whose later part uses a tensor from before the layer
    fails it (or raises)."""
    try:
        fast = run_groups(model, x, layer, groups, layouts=layouts, model_name=model_name,
                          at_layer=True)
    except (CnnvisError, RuntimeError):
        return False
    plain = run_groups(model, x, layer, groups, layouts=layouts, model_name=model_name)
    scale = float(plain.abs().max()) or 1.0
    return fast.shape == plain.shape and float((fast - plain).abs().max()) <= 1e-4 * scale


def pass_shape(groups: int, batch_size: int, groups_per_pass: int,
               at_layer: bool) -> tuple[int, int]:
    """(images, groups) of one forward pass, at most batch_size x groups_per_pass rows after
    the layer. Repeating the input: batch_size images x groups_per_pass groups. Repeating at the
    layer: every group in one pass when the rows allow (the part before the layer then runs
    once per image), with as many images as fit."""
    if not at_layer:
        return batch_size, groups_per_pass
    rows = batch_size * groups_per_pass
    per_pass = min(groups, rows)
    return max(1, rows // per_pass), per_pass


@torch.inference_mode()
def ablation_scores(model, data: ClassData, layer: str, groups: list[Group], *, mean, std,
                    device: torch.device, metric: str = "accuracy", batch_size: int = 64,
                    groups_per_pass: int = 32, layouts: dict | None = None,
                    model_name: str = "model",
                    at_layer: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(before [P], after [G, P]): the score of every (image, class) pair of data.targets
    (pairs in row-major order of targets.nonzero()) without ablation and with each group
    ablated. A forward pass carries at most batch_size x groups_per_pass rows (pass_shape),
    repeated at the layer when that is verified to be right on the first images (`at_layer`
    True or False chooses without the check)."""
    model.eval().to(device)
    outputs = torch.as_tensor(data.outputs, device=device)
    plan = [[]] + [list(g.units) for g in groups]  # plan[0]: the unablated model
    if at_layer is None:
        first = normalize(data.read(np.arange(min(4, len(data))), device), mean, std)
        at_layer = at_layer_ok(model, first, layer, plan[: min(len(plan), 3)], layouts,
                               model_name)
        log.info("%s %s: ablations repeat the batch at %s", model_name, layer,
                 "the layer" if at_layer else "the input")
    images, per_pass = pass_shape(len(plan), batch_size, groups_per_pass, at_layer)
    before, after = [], []
    lines = Progress(f"ablate {model_name} {layer} ({len(groups)} ablations)", len(data))
    for start in range(0, len(data), images):
        rows = np.arange(start, min(start + images, len(data)))
        x = normalize(data.read(rows, device), mean, std)
        pb, pk = np.nonzero(data.targets[rows])
        pb_t, pk_t = torch.as_tensor(pb, device=device), torch.as_tensor(pk, device=device)
        parts = []
        for g0 in range(0, len(plan), per_pass):
            out = run_groups(model, x, layer, plan[g0 : g0 + per_pass], layouts=layouts,
                             model_name=model_name, at_layer=at_layer)
            if out.dim() != 3 or int(data.outputs.max()) >= out.shape[-1]:
                raise CnnvisError(f"{model_name}: {data.source}: class outputs up to "
                                  f"{int(data.outputs.max())}, but the model gives outputs of "
                                  f"shape {tuple(out.shape[1:])} per image")
            s = class_scores(out, outputs, metric, data.multi_label)  # [g, B, K]
            parts.append(s[:, pb_t, pk_t].cpu())
        s = torch.cat(parts).double().numpy()
        before.append(s[0])
        after.append(s[1:])
        lines.update(len(rows))
    lines.close()
    return np.concatenate(before), np.concatenate(after, axis=1)


def bootstrap_change(delta: np.ndarray, replicates: int, level: float,
                     seed: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the mean of delta [G, n] over its n images (columns), the same
    `replicates` draws of images with replacement for every row; seeded by `seed`."""
    n = delta.shape[1]
    if n == 0:
        nan = np.full(delta.shape[0], np.nan)
        return nan, nan
    rng = np.random.default_rng(list(seed))
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
    boot = delta @ counts.T / n  # [G, R]
    a = (1.0 - level) / 2
    return np.quantile(boot, a, axis=1), np.quantile(boot, 1 - a, axis=1)


def ablation_columns(model: str, layer: str, data: ClassData, groups: list[Group],
                     before: np.ndarray, after: np.ndarray, *, metric: str, replicates: int,
                     level: float, seed: int) -> dict:
    """The `ablation` table's columns (tables.SCHEMAS): one row per (group, class)."""
    _, pair_class = np.nonzero(data.targets)
    G, K = len(groups), len(data.names)
    b, a = np.zeros((G, K)), np.zeros((G, K))
    low, high, n_img = np.zeros((G, K)), np.zeros((G, K)), np.zeros(K, np.int64)
    for k in range(K):
        sel = pair_class == k
        n_img[k] = sel.sum()
        if not n_img[k]:
            b[:, k] = a[:, k] = low[:, k] = high[:, k] = np.nan
            continue
        b[:, k] = before[sel].mean()
        a[:, k] = after[:, sel].mean(1)
        low[:, k], high[:, k] = bootstrap_change(after[:, sel] - before[sel][None], replicates,
                                                 level, (seed, k))
    change = a - b
    single = np.array([g.kind == "unit" for g in groups])
    rank = np.full((G, K), -1, np.int64)
    if single.any():
        idx = np.flatnonzero(single)
        order = np.argsort(change[idx], axis=0, kind="stable")  # units in order: ties by unit
        rank[idx[order], np.arange(K)[None, :]] = np.arange(1, len(idx) + 1)[:, None]
    related = np.array([[g.detector and g.concept is not None
                         and g.concept.lower() in data.related[k] for k in range(K)]
                        for g in groups]).reshape(G, K)
    rep = lambda v: np.repeat(np.asarray(v, dtype=object), K)  # noqa: E731
    return {
        "model": [model] * (G * K), "layer": [layer] * (G * K),
        "group": rep([g.name for g in groups]), "kind": rep([g.kind for g in groups]),
        "unit": [g.units[0] if g.kind == "unit" else None for g in groups for _ in range(K)],
        "units": rep([",".join(map(str, g.units)) for g in groups]),
        "concept": rep([g.concept for g in groups]), "category": rep([g.category for g in groups]),
        "detector": np.repeat([g.detector for g in groups], K),
        "class": np.tile(np.asarray(data.names, dtype=object), G),
        "class_index": np.tile(data.outputs.astype(np.int32), G),
        "images": np.tile(n_img.astype(np.int32), G), "metric": [metric] * (G * K),
        "before": b.reshape(-1), "after": a.reshape(-1), "change": change.reshape(-1),
        "change_low": low.reshape(-1), "change_high": high.reshape(-1),
        "rank": [None if r < 0 else int(r) for r in rank.reshape(-1)],
        "related": related.reshape(-1),
    }
