"""Streaming, mergeable statistics of a dissection (add a batch, merge shards, save, load).

- Float16Histogram: per-unit counts of every float16 bit pattern; gives EXACT quantiles of float16
  activations (numpy's 'linear' method), and merges across shards by addition.

It keeps its state in torch tensors on the device where it is fed, and saves to .npz. The other
statistics object of a dissection, the IoU tally, is tally.ConceptTally (same shape: add, merge,
state, save, load). `unit_state(path, first, stop)` reads the saved state of a range of units
only, a bounded chunk at a time (a layer's units split into parts never hold the whole layer's).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

N_BITS = 1 << 16
# Elements of a saved state's index/count arrays read at once by unit_state.
_STATE_CHUNK = 1 << 20


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


def _read_npy(z: zipfile.ZipFile, name: str, keep) -> np.ndarray:
    """The elements of the 1-D array `name` of an .npz that `keep(chunk, position)` selects,
    read _STATE_CHUNK elements at a time."""
    with z.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = read_header(f)
        total = int(np.prod(shape, dtype=np.int64))
        out = []
        for pos in range(0, total, _STATE_CHUNK):
            n = min(_STATE_CHUNK, total - pos)
            out.append(keep(np.frombuffer(f.read(n * dtype.itemsize), dtype), pos).copy())
        return np.concatenate(out) if out else np.zeros(0, dtype)


def unit_state(path: str | Path, first: int, stop: int) -> dict[str, np.ndarray]:
    """The saved state (`Float16Histogram.state`, with any other small arrays of the file) of
    units first..stop-1 only, as the state of a histogram of stop - first units."""
    with zipfile.ZipFile(path) as z:
        small = {Path(n).stem: np.load(z.open(n)) for n in z.namelist()
                 if n not in ("index.npy", "count.npy")}
        lo, hi = first * N_BITS, stop * N_BITS
        where = []  # positions of the kept entries (the index is sorted)

        def in_range(chunk, pos):
            sel = np.flatnonzero((chunk >= lo) & (chunk < hi))
            where.append(sel + pos)
            return chunk[sel] - lo

        index = _read_npy(z, "index", in_range)
        kept = np.concatenate(where) if where else np.zeros(0, np.int64)
        count = _read_npy(z, "count", lambda chunk, pos: chunk[
            kept[(kept >= pos) & (kept < pos + len(chunk))] - pos])
    for k, v in small.items():  # per-unit arrays of the file (an affine's) sliced alike
        if v.ndim == 1 and len(v) == int(small["units"]):
            small[k] = v[first:stop]
    return {**small, "units": np.array(stop - first), "index": index, "count": count}


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

