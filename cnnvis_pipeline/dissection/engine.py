"""The dissection passes over a prepared dataset: extraction, thresholds, tally.

- pick_device(name): "auto" -> cuda when available, else cpu.
- prefetch_batches(dataset, indices, batch_size): batches read by a background thread.
- images_to_input(uint8 batch, input_size, mean, std, device): the model's input tensor.
- extract_shard(...): one forward pass per batch over a shard; keeps float16 activations of every
  layer (.npy files, or in memory), a Float16Histogram per layer and each image's per-unit
  maximum (for the reports' top images).
- unit_thresholds(histograms, quantile): T_k, the (1 - q) quantile of each unit.
- tally_batch(...) / tally_shard(...): add one batch / one shard to a ConceptTally.
- forward_only(...) / load_only(...): the same input pipeline and forward pass as extract_shard
  with nothing kept, and the reads alone (the benchmark's baselines).

Performance notes (results are exact whatever the path):
- Dataset arrays and activation files are read with pread into fresh (on CUDA: pinned) buffers,
  never through memory maps, so a process's resident memory does not grow with the dataset;
  each pass reads only the arrays it needs, in background threads.
- The tally works on (image, unit) pairs that can have a mask pixel at all: a bilinear upsample
  (weights >= 0, summing to 1) never exceeds the largest of its source pixels, so a map whose
  maximum is <= T_k has an empty mask (a small relative slack keeps float rounding on the safe
  side). Only those maps are upsampled; the mask pixels are gathered and counted per concept
  with a lookup (label, plane) -> concept, so the cost is proportional to the mask pixels and
  the label planes, not to units x pixels x concepts.
- On CUDA nothing waits for the device per batch in extraction (non-finite values are checked
  at the end, maxima are copied back once).
- glibc's malloc gets a fixed 1 MB mmap threshold (see _tune_malloc), so per-batch buffers go
  back to the system when freed and the peak resident memory does not creep with the images.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnvis_pipeline.data.prepared import Batch, PreparedDataset
from cnnvis_pipeline.dissection.stats import ConceptTally, Float16Histogram
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder, find_module

log = logging.getLogger(__name__)

# Upsampled maps handled at once in the tally (bytes of float32), per device type.
_TALLY_CHUNK_BYTES = {"cuda": 1 << 31}
_TALLY_CHUNK_DEFAULT = 1 << 26
# Images per tally step on CUDA, at least (fewer, larger steps: less launch and sync overhead).
_CUDA_TALLY_BATCH = 1024
# A map is skipped when max + slack * max|a| <= T (slack >> float32 rounding of a bilinear mix).
_SKIP_SLACK = 2.0**-16


_MALLOC_TUNED = False


def _tune_malloc() -> None:
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


def pick_device(name: str = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnvisError(f"device {name!r} was asked for, but no CUDA device is available")
    return torch.device(name)


# -- reading -----------------------------------------------------------------------------------

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


def _load_batches(dataset: PreparedDataset, indices: np.ndarray, batch_size: int,
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


def prefetch_batches(dataset: PreparedDataset, indices: np.ndarray, batch_size: int,
                     depth: int = 2) -> Iterator[Batch]:
    """Yield dataset batches (every field, numpy) in order, reading ahead in a background thread."""
    for b in _load_batches(dataset, indices, batch_size,
                           ("images", "planes", "slots", "present")):
        yield Batch(indices=b.indices, images=b.images.numpy(),
                    planes=b.planes.numpy().view(dataset.planes.dtype), slots=b.slots,
                    present=b.present)


def load_only(dataset: PreparedDataset, indices: np.ndarray, *, batch_size: int = 64,
              fields: Sequence[str] = ("images",), device: torch.device | None = None) -> int:
    """Read the named fields of every batch as the passes do (nothing else); returns the bytes."""
    total = 0
    for b in _load_batches(dataset, indices, batch_size, fields, device):
        for f in ("images", "planes"):
            t = getattr(b, f)
            if t is not None:
                total += t.numel() * t.element_size()
    return total


# -- model input and forward ---------------------------------------------------------------------

def images_to_input(images, input_size: Sequence[int] | None, mean, std,
                    device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or CPU tensor) -> normalised float [B, 3, h, w] on `device`."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(images)
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
    # The permuted uint8 tensor is channels-last in memory; .float() keeps that layout.
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def _use_channels_last(device: torch.device) -> bool:
    return device.type == "cuda"


def _prepare_model(model: torch.nn.Module, device: torch.device) -> bool:
    model.eval().to(device)
    channels_last = _use_channels_last(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return channels_last


class _Stop(Exception):
    pass


def forward_only(model: torch.nn.Module, layers: list[str], dataset: PreparedDataset,
                 indices: np.ndarray, *, input_size, mean, std, device: torch.device,
                 batch_size: int = 64, precision: str = "fp32", model_name: str = "model",
                 progress: bool = False) -> None:
    """extract_shard's input pipeline and forward pass (up to the last of `layers`), keeping nothing."""
    _tune_malloc()
    channels_last = _prepare_model(model, device)
    autocast = precision == "bf16" and device.type == "cuda"
    modules = {id(find_module(model, n, model_name=model_name)) for n in layers}
    seen: set[int] = set()

    def hook(module, _inputs, _out):
        seen.add(id(module))
        if seen >= modules:
            raise _Stop

    handles = [find_module(model, n).register_forward_hook(hook) for n in layers]
    try:
        with torch.inference_mode():
            for b in tqdm(_load_batches(dataset, indices, batch_size, ("images",), device),
                          total=-(-len(indices) // batch_size), desc=f"forward {model_name}",
                          disable=not progress, mininterval=2):
                x = images_to_input(b.images, input_size, mean, std, device, channels_last)
                seen.clear()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    try:
                        model(x)
                    except _Stop:
                        pass
    finally:
        for h in handles:
            h.remove()


# -- activation storage --------------------------------------------------------------------------

class ActivationStore:
    """float16 activations of one layer over one shard: a .npy file, or a tensor in memory.

    The file is written and read with pwrite/pread (no memory map), so what was written does not
    stay in the process's resident memory; the page cache keeps it while memory allows.
    """

    def __init__(self, n: int, shape: Sequence[int], path: Path | None, device: torch.device):
        self.shape = (n, *shape)
        self.path = path
        self.fd = None
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
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * 2

    @classmethod
    def open(cls, path: Path) -> ActivationStore:
        """A store written earlier by extract_shard, read-only."""
        self = cls.__new__(cls)
        m = np.load(path, mmap_mode="r")
        if m.dtype != np.float16 or not m.flags.c_contiguous:
            raise CnnvisError(f"{path}: not a C-ordered float16 array")
        self.shape, self.path, self.offset = tuple(m.shape), Path(path), int(m.offset)
        del m
        self.data = None
        self.fd = os.open(path, os.O_RDONLY)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * 2
        return self

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
        _pread_into(self.fd, memoryview(view).cast("B"), self.offset + start * self.row_bytes)
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


# -- extraction ----------------------------------------------------------------------------------

def extract_shard(model: torch.nn.Module, layers: list[str], dataset: PreparedDataset,
                  indices: np.ndarray, *, input_size, mean, std, device: torch.device,
                  batch_size: int = 64, out_dir: Path | None = None, precision: str = "fp32",
                  model_name: str = "model", progress: bool = True):
    """One forward pass per batch over `indices`; returns (stores, histograms, maxima).

    stores[layer]: ActivationStore (float16 [n, U, h, w]); histograms[layer]: Float16Histogram;
    maxima[layer]: float16 numpy [n, U], each image's maximum activation per unit. When
    `out_dir` is given the activations are .npy files `acts_<layer>.npy` there.
    """
    _tune_malloc()
    channels_last = _prepare_model(model, device)
    autocast = precision == "bf16" and device.type == "cuda"
    stores: dict[str, ActivationStore] = {}
    hists: dict[str, Float16Histogram] = {}
    maxima: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    finite: list[tuple[torch.Tensor, str, int, int]] = []  # checked at the end on CUDA
    deferred = device.type == "cuda"

    def check(flags) -> None:
        for ok, name, first, last in flags:
            if not bool(ok):
                raise CnnvisError(
                    f"{model_name}: layer {name!r} produced NaN or infinite activations "
                    f"(or values beyond float16's range) on images {first}..{last}"
                )

    with LayerRecorder(model, layers, model_name=model_name, stop_after_last=True) as rec, \
            torch.inference_mode():
        bar = tqdm(total=len(indices), desc=f"extract {model_name}", unit="img", disable=not progress,
                   mininterval=2)
        for batch in _load_batches(dataset, indices, batch_size, ("images",), device):
            x = images_to_input(batch.images, input_size, mean, std, device, channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                outs = rec.run(x)
            first, last = int(batch.indices[0]), int(batch.indices[-1])
            for name in layers:
                a16 = outs[name].to(torch.float16).contiguous()
                ok = torch.isfinite(a16).all()
                if deferred:
                    finite.append((ok, name, first, last))
                else:
                    check([(ok, name, first, last)])
                if name not in stores:
                    path = None if out_dir is None else Path(out_dir) / f"acts_{name}.npy"
                    stores[name] = ActivationStore(len(indices), a16.shape[1:], path, device)
                    hists[name] = Float16Histogram(a16.shape[1], device)
                stores[name].write(batch.pos, a16)
                hists[name].add(a16)
                maxima[name].append(a16.amax(dim=(2, 3)))
            del outs, x
            bar.update(len(batch.indices))
        bar.close()
    if finite:
        oks = torch.stack([f[0] for f in finite]).cpu().tolist()
        check([(ok, *f[1:]) for ok, f in zip(oks, finite, strict=True)])
    for s in stores.values():
        s.flush()
    out_max = {}
    for k, v in maxima.items():
        out_max[k] = (torch.cat(v).cpu().numpy() if v
                      else np.zeros((0, 0), np.float16))
    return stores, hists, out_max


def unit_thresholds(hist: Float16Histogram, quantile: float) -> np.ndarray:
    """T_k: the (1 - quantile) quantile of each unit's raw activations (float64)."""
    return hist.quantiles(1.0 - quantile)


# -- tally ---------------------------------------------------------------------------------------

class _TallyContext:
    """Per-dataset lookups for the tally, on one device."""

    def __init__(self, dataset: PreparedDataset, device: torch.device):
        self.device = device
        self.C = len(dataset.concepts)
        self.seg = tuple(dataset.seg_size)
        plane_category = np.asarray(dataset.plane_category, np.int64)
        self.P = len(plane_category)
        # (plane p, label) -> concept index, C (the sink) for unlabeled or unknown labels.
        lut = np.full((max(self.P, 1), 1 << 16), self.C, np.int32)
        for j, (lab, cat) in enumerate(zip(dataset.concept_label, dataset.concept_category,
                                           strict=True)):
            for p in np.flatnonzero(plane_category == cat):
                if 0 < lab < (1 << 16):
                    lut[p, lab] = j
        self.lut = torch.from_numpy(lut.reshape(-1)).to(device)
        self.plane_base = (torch.arange(self.P, device=device) << 16).view(1, self.P, 1)
        # Earlier planes of the same category (a concept on several planes is counted once).
        self.earlier = [[q for q in range(p) if plane_category[q] == plane_category[p]]
                        for p in range(self.P)]
        image_kind = np.array([k == "image" for k in dataset.category_kind], bool)
        self.image_level = torch.from_numpy(
            np.append(image_kind[dataset.concept_category], False)).to(device)
        self.chunk_bytes = _TALLY_CHUNK_BYTES.get(device.type, _TALLY_CHUNK_DEFAULT)
        self.one = torch.ones(1, dtype=torch.int64, device=device)
        self.scratch = _Scratch() if device.type == "cpu" else None


class _Scratch:
    """Reused CPU work buffers of the tally (no page faults for fresh memory on every chunk)."""

    def __init__(self):
        self.flat: dict[str, torch.Tensor] = {}
        self.nz = torch.empty(0, 2, dtype=torch.int64)

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.flat.get(name)
        if t is None or t.numel() < numel:
            t = self.flat[name] = torch.empty(numel, dtype=dtype)
        return t[:numel]


def _upsample(x: torch.Tensor, seg, out: torch.Tensor | None) -> torch.Tensor:
    """F.interpolate(x, seg, bilinear, align_corners=False), into `out` when given (same kernel)."""
    if out is not None:
        try:
            return torch.ops.aten.upsample_bilinear2d.out(x, list(seg), False, None, None,
                                                          out=out)
        except (AttributeError, RuntimeError, TypeError):
            pass
    return F.interpolate(x, size=tuple(seg), mode="bilinear", align_corners=False)


def _mask_pixels(maps: torch.Tensor, hw, seg, thresholds: torch.Tensor,
                 scratch: _Scratch | None = None):
    """(map, pixel) index pairs of mask pixels: bilinear upsample of float16 maps [m, h*w] to
    `seg` (centre-aligned), then > the maps' thresholds [m]. Pairs are sorted by map on CPU."""
    m = len(maps)
    S = seg[0] * seg[1]
    if maps.is_cuda:
        # [1, m, h, w] channels-last: PyTorch's NHWC kernel spreads the work over every output
        # element (its NCHW kernel loops over maps inside one thread per output pixel).
        x = maps.float().T.contiguous().view(1, *hw, m).permute(0, 3, 1, 2)
        up = F.interpolate(x, size=tuple(seg), mode="bilinear", align_corners=False)
        up = up.permute(0, 2, 3, 1).reshape(S, m)
        s, r = (up > thresholds.view(1, m)).nonzero(as_tuple=True)
        return r, s
    x = maps.view(m, 1, *hw).float()
    if scratch is None:
        up = F.interpolate(x, size=tuple(seg), mode="bilinear", align_corners=False)
        return (up.view(m, S) > thresholds.view(m, 1)).nonzero(as_tuple=True)
    up = _upsample(x, seg, scratch.get("up", m * S, torch.float32).view(m, 1, *seg))
    mask = scratch.get("mask", m * S, torch.bool).view(m, S)
    torch.gt(up.view(m, S), thresholds.view(m, 1), out=mask)
    scratch.nz.resize_(0, 2)
    nz = torch.nonzero(mask, out=scratch.nz)
    return nz[:, 0], nz[:, 1]


def _tally_loaded(tally: ConceptTally, acts: torch.Tensor, thresholds: torch.Tensor,
                  planes: torch.Tensor, slots: np.ndarray, present: np.ndarray,
                  ctx: _TallyContext) -> None:
    """acts float16 [B, U, h, w] and planes (int16 bits of uint16 [B, P', sh, sw]) on ctx.device."""
    dev, C, P = ctx.device, ctx.C, ctx.P
    sh, sw = ctx.seg
    S = sh * sw
    B, U = acts.shape[:2]
    present_t = torch.from_numpy(np.ascontiguousarray(present)).to(dev)
    tally.category_images += present_t.sum(0).to(torch.int64)

    # Label side: the concept of each pixel of each plane (C where none), and image-level labels.
    conc = None
    if P:
        lab = planes[:, :P].reshape(B, P, S).to(torch.int64) & 0xFFFF
        conc = ctx.lut[lab + ctx.plane_base]  # [B, P, S]
        for p in reversed(range(P)):  # compare with the earlier planes' original values
            for q in ctx.earlier[p]:
                conc[:, p].masked_fill_(conc[:, p] == conc[:, q], C)
        area = torch.bincount(conc.reshape(-1), minlength=C + 1)
        tally.concept_area[:C] += area[:C]
    slots_t = torch.from_numpy(np.ascontiguousarray(slots)).to(dev).long()
    is_image = (slots_t >= 0) & ctx.image_level[torch.where(slots_t >= 0, slots_t, C)]
    img_b, img_j = is_image.nonzero(as_tuple=True)
    img_c = slots_t[img_b, img_j]
    tally.concept_area.index_add_(0, img_c, torch.full_like(img_c, S))

    # Unit side: only maps whose maximum can exceed T_k.
    flat = acts.reshape(B, U, -1)
    lo, hi = torch.aminmax(flat, dim=2)
    lo, hi = lo.float(), hi.float()
    reach = hi + _SKIP_SLACK * torch.maximum(hi.abs(), lo.abs())
    active_b, active_u = (reach > thresholds.view(1, U)).nonzero(as_tuple=True)
    count = torch.zeros(B, U, dtype=torch.int64, device=dev)
    inter = tally.intersection.view(-1)
    step = max(1, ctx.chunk_bytes // (S * 4))
    for i in range(0, len(active_b), step):
        b_i, u_i = active_b[i : i + step], active_u[i : i + step]
        r, s = _mask_pixels(flat[b_i, u_i], acts.shape[2:], (sh, sw), thresholds[u_i],
                            ctx.scratch)
        count[b_i, u_i] = torch.bincount(r, minlength=len(b_i))
        if conc is not None:
            keys = conc[b_i[r], :, s] + (u_i[r] * (C + 1)).unsqueeze(1)  # [K, P]
            keys = keys.reshape(-1)
            inter.index_add_(0, keys, ctx.one.expand(len(keys)))
    if len(img_b):
        tally.intersection.index_add_(1, img_c, count[img_b].T.contiguous())
    tally.intersection[:, C] = 0  # the sink column stays empty
    tally.mask_area += (count.unsqueeze(2) * present_t.unsqueeze(1).to(torch.int64)).sum(0)


def tally_batch(tally: ConceptTally, acts: torch.Tensor, thresholds: torch.Tensor, batch: Batch,
                dataset: PreparedDataset, device: torch.device) -> None:
    """Add one batch: acts float16 [B, U, h, w] (on device), thresholds float32 [U]."""
    ctx = _TallyContext(dataset, device)
    planes = torch.from_numpy(np.ascontiguousarray(batch.planes).view(np.int16)).to(device)
    _tally_loaded(tally, acts.to(device), thresholds.to(device, torch.float32), planes,
                  batch.slots, batch.present, ctx)


def tally_shard(dataset: PreparedDataset, indices: np.ndarray, store: ActivationStore,
                thresholds: np.ndarray, *, device: torch.device, batch_size: int = 64,
                desc: str = "tally", progress: bool = True) -> ConceptTally:
    _tune_malloc()
    units = store.shape[1]
    tally = ConceptTally(units, len(dataset.concepts), len(dataset.categories), device)
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
    ctx = _TallyContext(dataset, device)
    pin = device.type == "cuda"
    if pin:
        batch_size = max(batch_size, _CUDA_TALLY_BATCH)
    with torch.inference_mode():
        bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, mininterval=2)
        for b in _load_batches(dataset, indices, batch_size, ("planes", "slots", "present"),
                               device, store=store):
            n = len(b.indices)
            if b.acts is not None:
                acts = b.acts.to(device, non_blocking=pin)
            else:
                acts = store.read(b.pos, b.pos + n, device)
            planes = b.planes.to(device, non_blocking=pin)
            _tally_loaded(tally, acts, t, planes, b.slots, b.present, ctx)
            bar.update(n)
        bar.close()
    return tally


def shard_indices(n_images: int, shards: int, shard: int) -> np.ndarray:
    """Contiguous, balanced split of range(n_images) into `shards` parts; part `shard`."""
    if not 0 <= shard < shards:
        raise CnnvisError(f"shard {shard} is out of range for {shards} shards")
    bounds = np.linspace(0, n_images, shards + 1).round().astype(np.int64)
    return np.arange(bounds[shard], bounds[shard + 1], dtype=np.int64)
