"""Adversarial noise and the units: FGSM and PGD (L-inf) on the dissection images, and what the
attack does to each unit's activation and to its IoU with its label.

- fgsm(loss, x, eps): x + eps * sign(grad loss(x)), clipped to [0, 1] (Goodfellow et al.).
- pgd(loss, x, eps, steps, step_size, start): `steps` signed-gradient steps of `step_size` from
  x + start (a uniform draw in [-eps, eps], or none), each projected back into the eps ball
  around x and into [0, 1] (Madry et al.).
Images are attacked in [0, 1] pixel space at the model's input size (the normalisation is part
of the attacked function). The loss is summed over the batch (each image's gradient is its own):
cross-entropy with the clean prediction (single-label models), binary cross-entropy with the
clean decisions output > 0 (a `train:` model, multi-label), or with its own labels (`target:
labels`; an image not annotated for the trained category keeps the clean decisions).

attack_layer(...) runs the clean images and each attack through the model with a recorder on
the layer: per unit the mean activation (over positions, then images) clean and attacked, the
model's prediction flips, and a dissection.tally.ConceptTally of the clean and of the attacked
maps against the dissection's thresholds T_k (the tally's own masks: the maps upsampled to the
label size, > T_k; float32 maps, so the clean IoU can differ from the units table's float16
tally in the last digits). The tables compare both tallies' IoU with the unit's label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.stores import load_batches
from cnnvis_pipeline.dissection.tally import ConceptTally, TallyLookup
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.input import normalize, to_unit_float
from cnnvis_pipeline.progress import Progress

ATTACKS = ("fgsm", "pgd")
Loss = Callable[[torch.Tensor], torch.Tensor]


def _grad_sign(loss: Loss, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss(x), x)
    return g.sign()


def fgsm(loss: Loss, x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.detach() + eps * _grad_sign(loss, x)).clamp(0, 1)


def pgd(loss: Loss, x: torch.Tensor, eps: float, steps: int, step_size: float,
        start: torch.Tensor | None = None) -> torch.Tensor:
    x0 = x.detach()
    adv = x0 if start is None else (x0 + start).clamp(0, 1)
    for _ in range(steps):
        adv = adv + step_size * _grad_sign(loss, adv)
        adv = torch.minimum(torch.maximum(adv, x0 - eps), x0 + eps).clamp(0, 1)
    return adv


def uniform_start(indices: np.ndarray, shape, eps: float, seed: int) -> torch.Tensor:
    """PGD's random start: per image a uniform draw in [-eps, eps] seeded by (seed, image index),
    so it does not depend on the batches."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))
        out.append(torch.rand(tuple(shape), generator=g, dtype=torch.float32) * 2 - 1)
    return torch.stack(out) * eps


def model_loss(model, mean, std, target: torch.Tensor, multi_label: bool) -> Loss:
    """The summed loss of `model` on [0, 1] images against `target` (class indices [B], or
    0/1 [B, O] when multi-label)."""
    def loss(x01: torch.Tensor) -> torch.Tensor:
        out = model(normalize(x01, mean, std))
        if multi_label:
            return F.binary_cross_entropy_with_logits(out, target, reduction="sum")
        return F.cross_entropy(out, target, reduction="sum")
    return loss


@dataclass(frozen=True)
class Attack:
    name: str  # fgsm | pgd
    eps: float
    steps: int  # 1 for fgsm
    step_size: float
    random_start: bool

    def run(self, loss: Loss, x: torch.Tensor, indices: np.ndarray, seed: int) -> torch.Tensor:
        if self.name == "fgsm":
            return fgsm(loss, x, self.eps)
        if self.name != "pgd":
            raise CnnvisError(f"config: adversarial.attacks: unknown attack {self.name!r} "
                              f"(known: {', '.join(ATTACKS)})")
        start = (uniform_start(indices, x.shape[1:], self.eps, seed).to(x.device)
                 if self.random_start else None)
        return pgd(loss, x, self.eps, self.steps, self.step_size, start)


@dataclass
class LayerUnderAttack:
    """One attack's sums over the images (clean sums under the name "clean")."""

    activation: np.ndarray  # float64 [U]: sum over images of each map's mean
    tally: ConceptTally
    flips: int  # images whose prediction changed (multi-label: any decision)
    images: int


def _prediction_target(out: torch.Tensor, labels: torch.Tensor | None, multi_label: bool):
    if not multi_label:
        return out.argmax(1)
    target = (out > 0).float()
    if labels is not None:  # the image's own labels; rows not annotated (-1) keep the decision
        target = torch.where(labels >= 0, labels, target)
    return target


def _changed(a: torch.Tensor, b: torch.Tensor, multi_label: bool) -> int:
    if multi_label:
        return int(((a > 0) != (b > 0)).any(1).sum())
    return int((a.argmax(1) != b.argmax(1)).sum())


def attack_layer(model, ds: PreparedDataset, layer: str, thresholds: np.ndarray,
                 attacks: list[Attack], *, indices: np.ndarray, mean, std, input_size,
                 device: torch.device, batch_size: int = 64, labels: np.ndarray | None = None,
                 multi_label: bool = False, seed: int = 0, layouts: dict | None = None,
                 model_name: str = "model") -> dict[str, LayerUnderAttack]:
    """{"clean": ..., attack name: ...} over the dataset images `indices` (module docstring).
    `labels`: float [N] x outputs multi-hot (-1 rows: not annotated), for `target: labels`."""
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    lookup = TallyLookup(ds, device)
    t = torch.as_tensor(np.asarray(thresholds, np.float32), device=device)
    sums: dict[str, LayerUnderAttack] = {}
    lines = Progress(f"attack {model_name} {layer} ({len(attacks)} attacks)", len(indices))
    with lines, LayerRecorder(model, [layer], model_name=model_name, layouts=layouts) as rec:
        for b in load_batches(ds, indices, batch_size, ("images", "planes", "slots", "present"),
                              device):
            x = to_unit_float(b.images, input_size, device)
            planes = b.planes.to(device)
            with torch.no_grad():
                clean_out = model(normalize(x, mean, std)).float()
            maps = {"clean": (rec.outputs[layer], clean_out)}
            lab = None if labels is None else torch.as_tensor(labels[b.indices], device=device)
            target = _prediction_target(clean_out, lab, multi_label)
            loss = model_loss(model, mean, std, target, multi_label)
            for a in attacks:
                adv = a.run(loss, x, b.indices, seed)
                with torch.no_grad():
                    out = model(normalize(adv, mean, std)).float()
                maps[a.name] = (rec.outputs[layer], out)
            for name, (fmap, out) in maps.items():
                fmap = fmap.float()
                if name not in sums:
                    sums[name] = LayerUnderAttack(
                        np.zeros(fmap.shape[1]), ConceptTally(fmap.shape[1], len(ds.concepts),
                                                              len(ds.categories), device), 0, 0)
                s = sums[name]
                s.activation += fmap.mean((2, 3)).sum(0).double().cpu().numpy()
                s.tally.add(fmap, t, planes, b.slots, b.present, lookup)
                s.flips += 0 if name == "clean" else _changed(out, clean_out, multi_label)
                s.images += len(b.indices)
            lines.update(len(b.indices))
    return sums


def _label_concepts(units: pd.DataFrame, ds: PreparedDataset) -> np.ndarray:
    where = {(c["name"], c["category"]): i for i, c in enumerate(ds.concepts)}
    try:
        return np.array([where[(r.concept, r.category)] for r in units.itertuples()], np.int64)
    except KeyError as e:
        raise CnnvisError(f"units table: concept {e.args[0]} is not in the dataset") from None


def adversarial_columns(model: str, layer: str, units: pd.DataFrame, ds: PreparedDataset,
                        sums: dict[str, LayerUnderAttack], attacks: list[Attack],
                        iou_threshold: float) -> tuple[dict, dict]:
    """The `adversarial` (per attack and unit) and `adversarial_concepts` (per attack and
    concept of a clean detector) tables' columns."""
    units = units.sort_values("unit").reset_index(drop=True)
    concept = _label_concepts(units, ds)
    rows = np.arange(len(units))
    clean = sums["clean"]
    iou_clean = clean.tally.iou(ds.concept_category)[0][rows, concept]
    act_clean = clean.activation / max(clean.images, 1)
    detector = units["detector"].to_numpy(bool)
    u_cols: dict[str, list] = {}
    c_cols: dict[str, list] = {k: [] for k in ("attack", "eps", "steps", "concept", "category",
                                                "detectors", "detectors_lost")}
    for a in attacks:
        s = sums[a.name]
        iou_adv = s.tally.iou(ds.concept_category)[0][rows, concept]
        act_adv = s.activation / max(s.images, 1)
        still = iou_adv > iou_threshold
        part = {
            "attack": [a.name] * len(units), "eps": [a.eps] * len(units),
            "steps": [a.steps] * len(units), "unit": units["unit"].to_numpy(np.int32),
            "concept": units["concept"].tolist(), "category": units["category"].tolist(),
            "detector": detector, "activation_clean": act_clean, "activation_attacked": act_adv,
            "activation_change": act_adv - act_clean, "iou_clean": iou_clean,
            "iou_attacked": iou_adv, "iou_change": iou_adv - iou_clean,
            "detector_attacked": detector & still,
            "flip_rate": [s.flips / max(s.images, 1)] * len(units),
        }
        for k, v in part.items():
            u_cols.setdefault(k, []).extend(list(v))
        det = units[detector].assign(lost=~still[detector])
        grouped = det.groupby(["category", "concept"], sort=True)["lost"].agg(["size", "sum"])
        for (cat, name), r in grouped.iterrows():
            for k, v in (("attack", a.name), ("eps", a.eps), ("steps", a.steps),
                         ("concept", name), ("category", cat), ("detectors", int(r["size"])),
                         ("detectors_lost", int(r["sum"]))):
                c_cols[k].append(v)
    n = len(u_cols["unit"]) if u_cols else 0
    m = len(c_cols["concept"])
    return ({"model": [model] * n, "layer": [layer] * n, **u_cols},
            {"model": [model] * m, "layer": [layer] * m, **c_cols})
