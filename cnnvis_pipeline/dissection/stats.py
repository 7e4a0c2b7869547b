"""Streaming, mergeable statistics of a dissection (add a batch, merge shards, save, load).

- Float16Histogram: per-unit counts of every float16 bit pattern; gives EXACT quantiles of float16
  activations (numpy's 'linear' method), and merges across shards by addition.
- ConceptTally: per (unit, concept) intersections, per (unit, category) mask areas, per concept
  label areas: everything IoU needs, as int64 sums (so any sharding gives identical results).

Both keep their state in torch tensors on the device where they are fed, and save to .npz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

N_BITS = 1 << 16


def _float16_keys(x: torch.Tensor) -> torch.Tensor:
    """Map float16 values to int64 keys in 0..65535 whose order is the values' order."""
    bits = x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    negative = bits >= 0x8000
    return torch.where(negative, 0xFFFF - bits, bits | 0x8000)


def _keys_to_float(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.int64)
    bits = np.where(keys >= 0x8000, keys ^ 0x8000, 0xFFFF - keys).astype(np.uint16)
    return bits.view(np.float16).astype(np.float64)


class Float16Histogram:
    """Exact per-unit distribution of float16 activations."""

    def __init__(self, units: int, device: torch.device | str = "cpu"):
        self.units = units
        self.counts = torch.zeros(units * N_BITS, dtype=torch.int64, device=device)

    def add(self, acts: torch.Tensor) -> None:
        """acts: [B, U, ...] float16 (any spatial shape)."""
        if acts.dtype != torch.float16:
            raise TypeError("Float16Histogram.add expects float16 activations")
        b, u = acts.shape[:2]
        keys = _float16_keys(acts.reshape(b, u, -1).transpose(0, 1).reshape(u, -1))
        keys += torch.arange(u, device=keys.device)[:, None] * N_BITS
        if keys.is_cuda:
            self.counts += torch.bincount(keys.reshape(-1), minlength=self.units * N_BITS)
        else:
            self.counts.index_add_(0, keys.reshape(-1), torch.ones(1, dtype=torch.int64).expand(keys.numel()))

    def merge(self, other: Float16Histogram) -> None:
        self.counts += other.counts.to(self.counts.device)

    def quantiles(self, q: float) -> np.ndarray:
        """The q-quantile of each unit, as numpy.quantile(values, q) (method 'linear') would give."""
        counts = self.counts.view(self.units, N_BITS).cpu().numpy()
        cum = np.cumsum(counts, axis=1)
        n = cum[:, -1]
        if (n == 0).any():
            raise ValueError("a unit has no activations")
        virtual = (n - 1) * q
        lo = np.floor(virtual).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        t = virtual - lo
        # Order statistic r is the first key whose cumulative count exceeds r.
        key_lo = np.array([np.searchsorted(cum[u], lo[u], side="right") for u in range(self.units)])
        key_hi = np.array([np.searchsorted(cum[u], hi[u], side="right") for u in range(self.units)])
        a, b = _keys_to_float(key_lo), _keys_to_float(key_hi)
        # numpy's _lerp: a + (b - a) * t, computed from the other end when t >= 0.5.
        diff = b - a
        out = a + diff * t
        return np.where(t >= 0.5, b - diff * (1 - t), out)

    def state(self) -> dict[str, np.ndarray]:
        counts = self.counts.cpu().numpy()
        nz = np.flatnonzero(counts)
        return {"units": np.array(self.units), "index": nz.astype(np.int64), "count": counts[nz]}

    @classmethod
    def from_state(cls, state, device="cpu") -> Float16Histogram:
        h = cls(int(state["units"]), device)
        idx = torch.as_tensor(np.asarray(state["index"]), device=device)
        h.counts[idx] = torch.as_tensor(np.asarray(state["count"]), device=device)
        return h

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.state())

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> Float16Histogram:
        with np.load(path) as z:
            return cls.from_state(dict(z), device)


class ConceptTally:
    """Sums of |M ∩ L_c|, |M| per annotated category and |L_c| over images, for every unit."""

    FIELDS = ("intersection", "mask_area", "concept_area", "category_images")

    def __init__(self, units: int, concepts: int, categories: int, device="cpu"):
        self.units, self.concepts, self.categories = units, concepts, categories
        kw = {"dtype": torch.int64, "device": device}
        self.intersection = torch.zeros(units, concepts + 1, **kw)  # last column: padding sink
        self.mask_area = torch.zeros(units, categories, **kw)  # Σ |M_k| over images with category
        self.concept_area = torch.zeros(concepts + 1, **kw)  # Σ |L_c| (over images having c)
        self.category_images = torch.zeros(categories, **kw)  # images annotated per category

    def merge(self, other: ConceptTally) -> None:
        for f in self.FIELDS:
            getattr(self, f).add_(getattr(other, f).to(getattr(self, f).device))

    def iou(self, concept_category: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(iou, intersection, union), each [units, concepts] (float64, int64, int64)."""
        inter = self.intersection[:, : self.concepts].cpu().numpy()
        mask = self.mask_area.cpu().numpy()[:, concept_category]
        union = mask + self.concept_area[: self.concepts].cpu().numpy()[None, :] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        return iou, inter, union

    def state(self) -> dict[str, np.ndarray]:
        out = {f: getattr(self, f).cpu().numpy() for f in self.FIELDS}
        out["shape"] = np.array([self.units, self.concepts, self.categories])
        return out

    @classmethod
    def from_state(cls, state, device="cpu") -> ConceptTally:
        u, c, k = (int(v) for v in state["shape"])
        t = cls(u, c, k, device)
        for f in cls.FIELDS:
            getattr(t, f).copy_(torch.as_tensor(np.asarray(state[f])))
        return t

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.state())

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> ConceptTally:
        with np.load(path) as z:
            return cls.from_state(dict(z), device)
