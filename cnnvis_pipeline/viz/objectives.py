"""Activation-maximisation objectives, composable in Lucent's manner.

An Objective is a callable on a layer's activations [N, C, H, W] returning a scalar tensor, the
quantity to MAXIMISE. Objectives combine with `+` and `-` (another objective or a number), `*`
and `/` by a number, and unary `-`; `sum()` of objectives works (0 + objective).

- channel(unit, batch=None): the mean of channel `unit` over its map (and over the batch, or
  only over image `batch`): Lucid's channel objective.
- channel_max(unit, batch=None): the maximum of the unit's map, averaged over the images.
- neuron(unit, y=None, x=None, batch=None): the unit at one position (default the centre).
- diversity(): minus the summed cosine similarity between the images' Gram matrices, over the
  batch (Lucent's diversity, sign flipped to be maximised).
- per_image(make, units): image i of the batch optimises `make(units[i], batch=i)`; the sum of
  those objectives, computed in one gather (`make` is channel, channel_max or neuron).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


class Objective:
    """A named scalar function of the layer's activations (to be maximised)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str,
                 maps: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.fn = fn
        self.name = name
        self.maps = maps  # per-map reduction [n, H, W] -> [n], for per_image

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda a: self(a) + other(a), f"{self.name} + {other.name}")
        return Objective(lambda a: self(a) + float(other), f"{self.name} + {float(other):g}")

    def __radd__(self, other) -> Objective:  # sum([...]) starts from 0
        if isinstance(other, (int, float)) and other == 0:
            return self
        return self + other

    def __neg__(self) -> Objective:
        return Objective(lambda a: -self(a), f"-({self.name})")

    def __sub__(self, other) -> Objective:
        return self + (-other)

    def __rsub__(self, other) -> Objective:
        return (-self) + other

    def __mul__(self, k) -> Objective:
        if isinstance(k, Objective):
            raise TypeError("objectives are multiplied by numbers only")
        return Objective(lambda a: float(k) * self(a), f"{float(k):g} * ({self.name})")

    __rmul__ = __mul__

    def __truediv__(self, k) -> Objective:
        if isinstance(k, Objective):
            raise TypeError("objectives are divided by numbers only")
        return Objective(lambda a: self(a) / float(k), f"({self.name}) / {float(k):g}")


def _select(acts: torch.Tensor, unit: int, batch: int | None) -> torch.Tensor:
    """The unit's maps [n, H, W]: every image's, or image `batch`'s alone."""
    a = acts[:, int(unit)]
    return a if batch is None else a[int(batch) : int(batch) + 1]


def _map_objective(kind: str, reduce, unit: int, batch: int | None) -> Objective:
    where = "" if batch is None else f", batch={int(batch)}"
    return Objective(lambda a: reduce(_select(a, unit, batch)).mean(),
                     f"{kind}({int(unit)}{where})", maps=reduce)


def _mean_map(maps: torch.Tensor) -> torch.Tensor:
    return maps.mean(dim=(1, 2))


def _max_map(maps: torch.Tensor) -> torch.Tensor:
    return maps.amax(dim=(1, 2))


def channel(unit: int, batch: int | None = None) -> Objective:
    return _map_objective("channel", _mean_map, unit, batch)


def channel_max(unit: int, batch: int | None = None) -> Objective:
    return _map_objective("channel_max", _max_map, unit, batch)


def neuron(unit: int, y: int | None = None, x: int | None = None,
           batch: int | None = None) -> Objective:
    def at(maps: torch.Tensor) -> torch.Tensor:
        h, w = maps.shape[-2:]
        return maps[:, h // 2 if y is None else int(y), w // 2 if x is None else int(x)]

    return _map_objective(f"neuron@{y},{x}", at, unit, batch)


def diversity() -> Objective:
    def fn(acts: torch.Tensor) -> torch.Tensor:
        n, c = acts.shape[:2]
        flat = acts.reshape(n, c, -1)
        grams = F.normalize(torch.matmul(flat, flat.transpose(1, 2)).reshape(n, -1), dim=1)
        sims = grams @ grams.T
        return -(sims.sum() - sims.diagonal().sum()) / n

    return Objective(fn, "diversity")


def per_image(make: Callable[..., Objective], units: Sequence[int]) -> Objective:
    """sum_i make(units[i], batch=i)(acts), one unit per image of the batch."""
    reduce = make(0).maps
    if reduce is None:
        raise TypeError(f"{make.__name__} is not an objective of one unit's map")
    unit_list = [int(u) for u in units]

    def fn(acts: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(unit_list), device=acts.device)
        return reduce(acts[rows, torch.tensor(unit_list, device=acts.device)]).sum()

    return Objective(fn, f"per_image({make.__name__}, {unit_list})")
