"""Per-unit storage coordinates of the float16 activation stores (issue 10).

- Affine: stored = float16((a - offset) / scale) per unit, `scale` a power of two and `offset`
  at the unit's (1 - q) quantile (where masks are decided: a float16 number of scales near
  zero, float32 exactly far from it), chosen on a calibration sample (Affine.calibrate), the
  scale bringing the sample into [-1, 1]. IoU is then invariant to a positive scale of the layer
  and to an offset of any size; the one inexact step is the float16 rounding, relative 2^-11 of
  |a - offset|.
- calibration_indices(n): the calibration sample (spread over the dataset, the same for every
  shard, so all shards store in the same coordinates).
- StoredHistogram: a Float16Histogram of stored values and their Affine; quantiles in the
  layer's own units; merging shards stored in other coordinates is refused.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnvis_pipeline.dissection.stats import Float16Histogram
from cnnvis_pipeline.errors import CnnvisError

# Images of the calibration sample (spread over the whole dataset, the same for every shard).
CALIBRATION_IMAGES = 16


def calibration_indices(n_images: int) -> np.ndarray:
    return np.unique(np.linspace(0, max(n_images - 1, 0), min(n_images, CALIBRATION_IMAGES))
                     .round().astype(np.int64))


class Affine:
    """Per-unit storage coordinates: stored = float16((a - offset) / scale).

    `scale` is a power of two and `offset` a float32 number, at most 2^20 scales from zero, so
    dividing by the scale is exact and offset + scale * q is exact in float64 for every float16
    q (thresholds survive the round trip to stored coordinates). Where the offset is within ~32
    scales of zero it is scale * (a float16 number), so a = 0 is stored exactly (as
    -offset / scale). identity(U): offset 0, scale 1 (plain float16).
    """

    def __init__(self, offset, scale):
        self.offset = np.asarray(offset, np.float64).reshape(-1)
        self.scale = np.asarray(scale, np.float64).reshape(-1)
        self._dev: dict = {}

    @classmethod
    def identity(cls, units: int) -> Affine:
        return cls(np.zeros(units), np.ones(units))

    @property
    def is_identity(self) -> bool:
        return bool((self.offset == 0).all() and (self.scale == 1).all())

    @classmethod
    def calibrate(cls, acts: torch.Tensor, quantile: float) -> Affine:
        """From float activations [B, U, h, w] of the calibration sample: the offset near the
        (1 - quantile) quantile of each unit (where masks are decided, float16's resolution is
        finest around 0) and the scale that brings the sample into [-1, 1] (65504x headroom)."""
        flat = acts.detach().float().reshape(acts.shape[0], acts.shape[1], -1)
        flat = flat.transpose(0, 1).reshape(acts.shape[1], -1)
        m = flat.shape[1]
        k = max(1, min(m, int(np.ceil(quantile * m))))
        top = torch.topk(flat, k, dim=1).values[:, -1]
        lo, hi = torch.aminmax(flat, dim=1)
        top, lo, hi = (v.double().cpu().numpy() for v in (top, lo, hi))
        spread = np.maximum(hi - top, top - lo)
        ok = np.isfinite(spread) & (spread > 0)
        if not np.isfinite(top).all():
            raise CnnvisError("the calibration sample has NaN or infinite activations")
        fallback = spread[ok].max() if ok.any() else max(float(np.abs(top).max()), 1.0)
        spread = np.where(ok, spread, fallback)
        # |offset| / scale <= 2^20 keeps offset + scale * q exact in float64 for every float16 q
        # (bits from 2^20 to 2^-24 scales); a spread below that is below float32's own
        # resolution of the activations.
        spread = np.maximum(spread, np.abs(top) / 2.0**20)
        spread = np.maximum(spread, np.finfo(np.float32).tiny * 2**24)
        scale = np.exp2(np.ceil(np.log2(spread)))
        return cls(_offsets(top, scale), scale)

    def _tensors(self, device):
        key = str(device)
        if key not in self._dev:
            u = len(self.offset)
            self._dev[key] = (
                torch.as_tensor(self.offset, dtype=torch.float32, device=device).view(1, u, 1, 1),
                torch.as_tensor(1.0 / self.scale, dtype=torch.float32, device=device)
                .view(1, u, 1, 1))
        return self._dev[key]

    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        """float activations [B, U, h, w] -> stored float16 (contiguous)."""
        if self.is_identity:
            return acts.to(torch.float16).contiguous()
        off, inv = self._tensors(acts.device)
        return ((acts.float() - off) * inv).to(torch.float16).contiguous()

    def to_stored(self, values) -> np.ndarray:
        return (np.asarray(values, np.float64) - self.offset) / self.scale

    def from_stored(self, values) -> np.ndarray:
        return self.offset + self.scale * np.asarray(values, np.float64)

    def same_as(self, other: Affine) -> bool:
        return np.array_equal(self.offset, other.offset) and np.array_equal(self.scale, other.scale)

    def state(self) -> dict[str, np.ndarray]:
        return {"affine_offset": self.offset, "affine_scale": self.scale}

    @classmethod
    def from_state(cls, state, units: int) -> Affine:
        if "affine_offset" not in state:
            return cls.identity(units)
        return cls(np.asarray(state["affine_offset"]), np.asarray(state["affine_scale"]))


# The offset is a float16 number of scales while that is within 2^-6 scales of the quantile.
_NEAR = 2.0**-6


def _offsets(top: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Each unit's offset: scale * float16(top / scale) where that is within _NEAR scales of
    `top` (|top| below ~32 scales: a = 0 is then stored exactly, as a float16 number of
    scales); elsewhere float32(top) itself, so the stored values near T_k keep float16's full
    resolution whatever the offset (zero, 32 or more scales away, cannot be near T_k)."""
    with np.errstate(over="ignore"):  # beyond float16's range: inf, never chosen
        coarse = scale * (top / scale).astype(np.float16).astype(np.float64)
    fine = top.astype(np.float32).astype(np.float64)
    return np.where(np.abs(coarse - top) <= _NEAR * scale, coarse, fine)


class StoredHistogram(Float16Histogram):
    """A Float16Histogram of stored values and their Affine: quantiles in the layer's own units
    (exact quantiles of the stored values, mapped back exactly); shards merge only when they were
    stored in the same coordinates."""

    def __init__(self, units: int, device: torch.device | str = "cpu",
                 affine: Affine | None = None):
        super().__init__(units, device)
        self.affine = affine or Affine.identity(units)

    def quantiles(self, q: float) -> np.ndarray:
        return self.affine.from_stored(super().quantiles(q))

    def merge(self, other: Float16Histogram) -> None:
        theirs = getattr(other, "affine", Affine.identity(other.units))
        if not self.affine.same_as(theirs):
            raise CnnvisError(
                "shards were stored with different per-unit scales/offsets (extracted by "
                "different code or models?); extract every shard of a model again")
        super().merge(other)

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), **self.affine.state()}

    @classmethod
    def from_state(cls, state, device="cpu") -> StoredHistogram:
        h = super().from_state(state, device)
        h.affine = Affine.from_state(state, h.units)
        return h
