"""Reading the prepared dataset and the activation files, without memory maps.

- load_batches(dataset, indices, batch_size, fields, device, store): batches of the named fields
  (images, planes, slots, present; and a store's activations) in order, read ahead by
  background threads into fresh (on CUDA: pinned) buffers.
- load_only(...): the reads alone, as the passes do them (the benchmark's baseline).
- ActivationStore: float16 activations of one layer over one shard in per-unit coordinates
  (affine.Affine), a .npy file written and read with pwrite/pread (its Affine beside it), or a
  tensor in memory; `unit_range(first, stop)`: a store of some of its units (the reads give
  only theirs).
- read_columns(path, first, stop): columns of a 2-D .npy file (a unit range of per-image maxima).
- read_rows(arr, first, stop): rows of a memory-mapped .npy array, read with pread.
- tune_malloc(): glibc's malloc gets a fixed 1 MB mmap threshold, so per-batch buffers go back
  to the system when freed and the peak resident memory does not creep with the images.

Dataset arrays and activation files are read with pread, never through memory maps, so a
process's resident memory does not grow with the dataset; each pass reads only the arrays it
needs.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.affine import Affine
from cnnvis_pipeline.errors import CnnvisError

_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep the process's resident memory flat over long passes (glibc only, once per process).

    glibc raises its mmap threshold as large blocks are freed (up to 32 MB), after which the
    per-batch buffers of a few MB come from heap arenas that fragment and creep upwards over
    thousands of batches. A fixed 1 MB threshold hands such blocks back to the system when freed.
    Skipped when the user set MALLOC_MMAP_THRESHOLD_ or CNNVIS_NO_MALLOC_TUNING.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if (not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or os.environ.get("CNNVIS_NO_MALLOC_TUNING")):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# -- reading ------------------------------------------------------------------------------------

def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise CnnvisError(f"short read at offset {offset} (file truncated?)")
        buf, offset = buf[n:], offset + n


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """(first row, row count, position in idx) of each run of consecutive rows."""
    if len(idx) == 0:
        return []
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(idx)]])
    return [(int(idx[a]), int(b - a), int(a)) for a, b in zip(starts, stops, strict=True)]


class _RowReader:
    """Rows of a C-ordered .npy array read with pread, not through its memory map."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self.fd = None
        filename = getattr(arr, "filename", None)
        if isinstance(arr, np.memmap) and filename and arr.flags.c_contiguous and arr.ndim >= 1:
            self.fd = os.open(filename, os.O_RDONLY)
            self.offset = int(arr.offset)
            self.row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize

    def read(self, idx: np.ndarray, out: np.ndarray) -> None:
        if self.fd is None:
            out[...] = self.arr[idx]
            return
        raw = memoryview(out).cast("B")
        for first, count, pos in _runs(idx):
            _pread_into(self.fd, raw[pos * self.row_bytes : (pos + count) * self.row_bytes],
                        self.offset + first * self.row_bytes)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_columns(path: str | Path, first: int, stop: int, chunk_bytes: int = 1 << 23) -> np.ndarray:
    """Columns first..stop-1 of a C-ordered 2-D .npy file, read with pread a chunk of rows at a
    time (the whole file is never resident)."""
    arr = np.load(path, mmap_mode="r")
    out = np.empty((len(arr), stop - first), arr.dtype)
    rows = max(1, chunk_bytes // max(arr.strides[0], 1))
    reader = _RowReader(arr)
    try:
        for i in range(0, len(arr), rows):
            idx = np.arange(i, min(i + rows, len(arr)))
            buf = np.empty((len(idx), arr.shape[1]), arr.dtype)
            reader.read(idx, buf)
            out[i : i + len(idx)] = buf[:, first:stop]
    finally:
        reader.close()
    return out


_TORCH_DTYPE = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.int16,
                np.dtype(np.int16): torch.int16, np.dtype(np.float16): torch.float16,
                np.dtype(np.float32): torch.float32}


def _host_buffer(shape, dtype: np.dtype, pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A CPU tensor and a numpy view of the same memory (uint16 data lives in an int16 tensor)."""
    t = torch.empty(tuple(shape), dtype=_TORCH_DTYPE[np.dtype(dtype)], pin_memory=pin)
    return t, t.numpy().view(dtype)


@dataclass
class _Loaded:
    indices: np.ndarray
    pos: int  # position of the first image in the pass
    images: torch.Tensor | None = None  # uint8 [B, H, W, 3] (CPU; pinned on CUDA)
    planes: torch.Tensor | None = None  # int16 bits of uint16 [B, P, sh, sw]
    slots: np.ndarray | None = None
    present: np.ndarray | None = None
    acts: torch.Tensor | None = None  # float16 [B, U, h, w] read from an activation file


def _loader_settings(device: torch.device | None) -> tuple[bool, int, int]:
    """(pin, reader threads, batches read ahead) for a device."""
    if device is not None and device.type == "cuda":
        return True, max(2, min(8, (os.cpu_count() or 4) // 2)), 8
    return False, 1, 2


def load_batches(dataset: PreparedDataset, indices: np.ndarray, batch_size: int,
                  fields: Sequence[str], device: torch.device | None = None,
                  store: ActivationStore | None = None) -> Iterator[_Loaded]:
    """Batches of the named fields, in order, read ahead by background threads."""
    pin, workers, depth = _loader_settings(device)
    indices = np.asarray(indices, np.int64)
    readers = {f: _RowReader(getattr(dataset, f)) for f in fields if f in ("images", "planes")}
    chunks = [(i, indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]

    def load(item) -> _Loaded:
        pos, idx = item
        out = _Loaded(indices=idx, pos=pos)
        for f, r in readers.items():
            t, view = _host_buffer((len(idx), *r.arr.shape[1:]), r.arr.dtype, pin)
            r.read(idx, view)
            setattr(out, f, t)
        if "slots" in fields:
            out.slots = np.asarray(dataset.slots[idx])
        if "present" in fields:
            out.present = np.asarray(dataset.present[idx])
        if store is not None and store.fd is not None:
            out.acts = store.read_host(pos, pos + len(idx), pin)
        return out

    try:
        with cf.ThreadPoolExecutor(max_workers=workers) as pool:
            pending = collections.deque(pool.submit(load, c) for c in chunks[:depth])
            for k in range(len(chunks)):
                loaded = pending.popleft().result()
                if k + depth < len(chunks):
                    pending.append(pool.submit(load, chunks[k + depth]))
                yield loaded
            for p in pending:
                p.cancel()
    finally:
        for r in readers.values():
            r.close()


def load_only(dataset: PreparedDataset, indices: np.ndarray, *, batch_size: int = 64,
              fields: Sequence[str] = ("images",), device: torch.device | None = None) -> int:
    """Read the named fields of every batch as the passes do (nothing else); returns the bytes."""
    total = 0
    for b in load_batches(dataset, indices, batch_size, fields, device):
        for f in ("images", "planes"):
            t = getattr(b, f)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


# -- activation storage --------------------------------------------------------------------------

class ActivationStore:
    """float16 activations of one layer over one shard: a .npy file, or a tensor in memory.

    Values are stored in per-unit coordinates (`affine`, an Affine; identity unless given):
    write() takes stored float16 values (affine.encode of the layer's output), the tally
    compares them with affine.to_stored(T_k). A file store keeps its affine next to it
    (`<name>.affine.npz`).

    The file is written and read with pwrite/pread (no memory map), so what was written does not
    stay in the process's resident memory; the page cache keeps it while memory allows.
    """

    def __init__(self, n: int, shape: Sequence[int], path: Path | None, device: torch.device,
                 affine: Affine | None = None):
        self.shape = (n, *shape)
        self.path = path
        self.fd = None
        self.affine = affine or Affine.identity(self.shape[1])
        if path is not None:
            np.savez(self.affine_path(path), **self.affine.state())
        if path is None:
            self.data = torch.empty(self.shape, dtype=torch.float16, device=device)
        else:
            self.data = None
            with open(path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                        "fortran_order": False, "shape": self.shape})
                self.offset = f.tell()
                f.truncate(self.offset + int(np.prod(self.shape, dtype=np.int64)) * 2)
            self.fd = os.open(path, os.O_RDWR)
        self.row_bytes = self.file_row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * 2
        self.first_unit = 0

    @classmethod
    def open(cls, path: Path) -> ActivationStore:
        """A store written earlier by extract_shard, read-only."""
        self = cls.__new__(cls)
        m = np.load(path, mmap_mode="r")
        if m.dtype != np.float16 or not m.flags.c_contiguous:
            raise CnnvisError(f"{path}: not a C-ordered float16 array")
        self.shape, self.path, self.offset = tuple(m.shape), Path(path), int(m.offset)
        del m
        side = cls.affine_path(path)
        if side.is_file():
            with np.load(side) as z:
                self.affine = Affine.from_state(dict(z), self.shape[1])
        else:
            self.affine = Affine.identity(self.shape[1])
        self.data = None
        self.fd = os.open(path, os.O_RDONLY)
        self.row_bytes = self.file_row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * 2
        self.first_unit = 0
        return self

    def unit_range(self, first: int, stop: int) -> ActivationStore:
        """A read-only store of units first..stop-1 of this one (a view: no data copied; a file
        store's view reads each image's part of the row, with its own descriptor, closed by
        its own close())."""
        units = self.shape[1]
        if not 0 <= first < stop <= units:
            raise CnnvisError(f"units {first}..{stop - 1} are not among the store's {units}")
        view = ActivationStore.__new__(ActivationStore)
        view.shape = (self.shape[0], stop - first, *self.shape[2:])
        view.path, view.data, view.fd = self.path, None, None
        view.affine = Affine(self.affine.offset[first:stop], self.affine.scale[first:stop])
        view.file_row_bytes = self.file_row_bytes
        view.row_bytes = int(np.prod(view.shape[1:], dtype=np.int64)) * 2
        view.first_unit = self.first_unit + first
        if self.data is not None:
            view.data = self.data[:, first:stop]
        else:
            view.offset, view.fd = self.offset, os.dup(self.fd)
        return view

    @staticmethod
    def affine_path(path: Path) -> Path:
        path = Path(path)
        return path.with_name(f"{path.stem}.affine.npz")

    def write(self, start: int, acts: torch.Tensor) -> None:
        if self.data is not None:
            self.data[start : start + len(acts)] = acts
            return
        a = np.ascontiguousarray(acts.detach().cpu().numpy().astype(np.float16, copy=False))
        buf, offset = memoryview(a).cast("B"), self.offset + start * self.row_bytes
        while len(buf):
            n = os.pwrite(self.fd, buf, offset)
            buf, offset = buf[n:], offset + n

    def read_host(self, start: int, stop: int, pin: bool = False) -> torch.Tensor:
        """Rows start..stop of a file store as a CPU tensor (pinned if asked)."""
        t, view = _host_buffer((stop - start, *self.shape[1:]), np.float16, pin)
        raw = memoryview(view).cast("B")
        if self.row_bytes == self.file_row_bytes:  # every unit: one read
            _pread_into(self.fd, raw, self.offset + start * self.row_bytes)
            return t
        skip = self.first_unit * (self.row_bytes // self.shape[1])  # a unit range: per image
        for i in range(stop - start):
            _pread_into(self.fd, raw[i * self.row_bytes : (i + 1) * self.row_bytes],
                        self.offset + (start + i) * self.file_row_bytes + skip)
        return t

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if self.data is not None:
            return self.data[start:stop].to(device)
        pin = device.type == "cuda"
        return self.read_host(start, stop, pin).to(device, non_blocking=pin)

    def flush(self) -> None:
        """Nothing to do: pwrite has handed every byte to the page cache, where readers see it."""

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def read_rows(arr: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Rows first..stop-1 of a prepared array as a fresh in-memory copy, read with pread when it
    is a memory-mapped .npy file (its pages are then never mapped into this process, so its
    resident memory does not grow with the rows read), else copied."""
    out = np.empty((stop - first, *arr.shape[1:]), arr.dtype)
    reader = _RowReader(arr)
    try:
        reader.read(np.arange(first, stop, dtype=np.int64), out)
    finally:
        reader.close()
    return out
