"""Streaming, mergeable statistics of a dissection (add a batch, merge shards, save, load).

- Float16Histogram: per-unit counts of every float16 bit pattern; gives EXACT quantiles of float16
  activations (numpy's 'linear' method), and merges across shards by addition.

It keeps its state in torch tensors on the device where it is fed, and saves to .npz. The other
statistics object of a dissection, the IoU tally, is tally.ConceptTally (same shape: add, merge,
state, save, load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

N_BITS = 1 << 16


def _float16_keys(x: torch.Tensor) -> torch.Tensor:
    """Map float16 values to int32 keys in 0..65535 whose order is the values' order.

    With s the bits as a signed int16: negative values (s < 0) map to ~s = -1 - s, the others to
    s | 0x8000; i.e. s ^ ((s >> 15) | 0x8000) on the sign-extended int32.
    """
    s = x.contiguous().view(torch.int16).to(torch.int32)
    return s ^ ((s >> 15) | 0x8000)


def _keys_to_float(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.int64)
    bits = np.where(keys >= 0x8000, keys ^ 0x8000, 0xFFFF - keys).astype(np.uint16)
    return bits.view(np.float16).astype(np.float64)


class SavedState:
    """save/load through state()/from_state(): one .npz of numpy arrays."""

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.state())

    @classmethod
    def load(cls, path: str | Path, device="cpu"):
        with np.load(path) as z:
            return cls.from_state(dict(z), device)


class Float16Histogram(SavedState):
    """Exact per-unit distribution of float16 activations."""

    def __init__(self, units: int, device: torch.device | str = "cpu"):
        self.units = units
        self.counts = torch.zeros(units * N_BITS, dtype=torch.int64, device=device)
        self._one = torch.ones(1, dtype=torch.int64, device=device)

    def add(self, acts: torch.Tensor) -> None:
        """acts: [B, U, ...] float16 (any spatial shape)."""
        if acts.dtype != torch.float16:
            raise TypeError("Float16Histogram.add expects float16 activations")
        b, u = acts.shape[:2]
        if u != self.units:
            raise ValueError(f"Float16Histogram of {self.units} units got {u}")
        keys = _float16_keys(acts.reshape(b, u, -1))
        offset = torch.arange(u, device=keys.device, dtype=torch.int64) * N_BITS
        if u * N_BITS <= torch.iinfo(torch.int32).max:
            keys += offset.to(torch.int32).view(1, u, 1)
        else:
            keys = keys.to(torch.int64) + offset.view(1, u, 1)
        keys = keys.reshape(-1)
        # Atomic adds straight into the counts (no bins-sized temporary, no device sync).
        self.counts.index_add_(0, keys, self._one.expand(keys.numel()))

    def merge(self, other: Float16Histogram) -> None:
        self.counts += other.counts.to(self.counts.device)

    def quantiles(self, q: float) -> np.ndarray:
        """The q-quantile of each unit, as numpy.quantile(values, q) (method 'linear') would give."""
        counts = self.counts.view(self.units, N_BITS)
        n = counts.sum(1).cpu().numpy()
        if (n == 0).any():
            raise ValueError("a unit has no activations")
        virtual = (n - 1) * q
        lo = np.floor(virtual).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        # Order statistic r is the first key whose cumulative count exceeds r (integer cumulative
        # sums and searches, on the counts' device, a block of units at a time).
        step = 64 if counts.device.type == "cpu" else 1024
        keys = []
        for u0 in range(0, self.units, step):
            cum = torch.cumsum(counts[u0 : u0 + step], dim=1)
            ranks = torch.from_numpy(np.stack([lo[u0 : u0 + step], hi[u0 : u0 + step]], 1))
            keys.append(torch.searchsorted(cum, ranks.to(cum.device), right=True).cpu().numpy())
        key_lo, key_hi = np.concatenate(keys).T
        t = virtual - lo
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

