"""The dissection passes over a prepared dataset: extraction, thresholds, tally.

- pick_device(name): "auto" -> cuda when available, else cpu.
- prefetch_batches(dataset, indices, batch_size): batches read by a background thread.
- images_to_input(uint8 batch, input_size, mean, std, device): the model's input tensor.
- extract_shard(...): one forward pass per batch over a shard; keeps float16 activations of every
  layer (memory-mapped .npy files, or in memory), a Float16Histogram per layer and each image's
  per-unit maximum (for the reports' top images).
- unit_thresholds(histograms, quantile): T_k, the (1 - q) quantile of each unit.
- tally_batch(...) / tally_shard(...): add one batch / one shard to a ConceptTally.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnvis_pipeline.data.prepared import Batch, PreparedDataset
from cnnvis_pipeline.dissection.stats import ConceptTally, Float16Histogram
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnvisError(f"device {name!r} was asked for, but no CUDA device is available")
    return torch.device(name)


def prefetch_batches(dataset: PreparedDataset, indices: np.ndarray, batch_size: int,
                     depth: int = 2) -> Iterator[Batch]:
    """Yield dataset batches in order, reading ahead in a background thread."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(dataset.batch, c) for c in chunks[:depth]]
        for k in range(len(chunks)):
            batch = pending.pop(0).result()
            if k + depth < len(chunks):
                pending.append(pool.submit(dataset.batch, chunks[k + depth]))
            yield batch


def images_to_input(images: np.ndarray, input_size: Sequence[int] | None, mean, std,
                    device: torch.device, channels_last: bool = False) -> torch.Tensor:
    x = torch.from_numpy(images)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False)
    m = torch.tensor(mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - m) / s
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class ActivationStore:
    """float16 activations of one layer over one shard: a .npy memory map, or a tensor in memory."""

    def __init__(self, n: int, shape: Sequence[int], path: Path | None, device: torch.device):
        self.shape = (n, *shape)
        self.path = path
        if path is None:
            self.data = torch.empty(self.shape, dtype=torch.float16, device=device)
        else:
            self.data = np.lib.format.open_memmap(path, "w+", np.float16, self.shape)

    @classmethod
    def open(cls, path: Path) -> ActivationStore:
        """A store written earlier by extract_shard, memory-mapped read-only."""
        self = cls.__new__(cls)
        self.data = np.load(path, mmap_mode="r")
        self.shape, self.path = self.data.shape, Path(path)
        return self

    def write(self, start: int, acts: torch.Tensor) -> None:
        if isinstance(self.data, torch.Tensor):
            self.data[start : start + len(acts)] = acts
        else:
            self.data[start : start + len(acts)] = acts.cpu().numpy()

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return self.data[start:stop].to(device)
        return torch.from_numpy(np.ascontiguousarray(self.data[start:stop])).to(device)

    def flush(self) -> None:
        if not isinstance(self.data, torch.Tensor):
            self.data.flush()


def extract_shard(model: torch.nn.Module, layers: list[str], dataset: PreparedDataset,
                  indices: np.ndarray, *, input_size, mean, std, device: torch.device,
                  batch_size: int = 64, out_dir: Path | None = None, precision: str = "fp32",
                  model_name: str = "model", progress: bool = True):
    """One forward pass per batch over `indices`; returns (stores, histograms, maxima).

    stores[layer]: ActivationStore (float16 [n, U, h, w]); histograms[layer]: Float16Histogram;
    maxima[layer]: float16 numpy [n, U], each image's maximum activation per unit. When
    `out_dir` is given the activations are memory-mapped files `acts_<layer>.npy` there.
    """
    model.eval().to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    autocast = precision == "bf16" and device.type == "cuda"
    stores: dict[str, ActivationStore] = {}
    hists: dict[str, Float16Histogram] = {}
    maxima: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    pos = 0
    with LayerRecorder(model, layers, model_name=model_name, stop_after_last=True) as rec, \
            torch.inference_mode():
        bar = tqdm(total=len(indices), desc=f"extract {model_name}", unit="img", disable=not progress,
                   mininterval=2)
        for batch in prefetch_batches(dataset, indices, batch_size):
            x = images_to_input(batch.images, input_size, mean, std, device, channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                outs = rec.run(x)
            for name in layers:
                a = outs[name]
                a16 = a.to(torch.float16).contiguous()
                if not torch.isfinite(a16).all():
                    raise CnnvisError(
                        f"{model_name}: layer {name!r} produced NaN or infinite activations "
                        "(or values beyond float16's range) on images "
                        f"{int(batch.indices[0])}..{int(batch.indices[-1])}"
                    )
                if name not in stores:
                    path = None if out_dir is None else Path(out_dir) / f"acts_{name}.npy"
                    stores[name] = ActivationStore(len(indices), a16.shape[1:], path, device)
                    hists[name] = Float16Histogram(a16.shape[1], device)
                stores[name].write(pos, a16)
                hists[name].add(a16)
                maxima[name].append(a16.amax(dim=(2, 3)).cpu().numpy())
            pos += len(batch.indices)
            bar.update(len(batch.indices))
        bar.close()
    for s in stores.values():
        s.flush()
    return stores, hists, {k: np.concatenate(v) for k, v in maxima.items()}


def unit_thresholds(hist: Float16Histogram, quantile: float) -> np.ndarray:
    """T_k: the (1 - quantile) quantile of each unit's raw activations (float64)."""
    return hist.quantiles(1.0 - quantile)


def tally_batch(tally: ConceptTally, acts: torch.Tensor, thresholds: torch.Tensor, batch: Batch,
                dataset: PreparedDataset, device: torch.device) -> None:
    """Add one batch: acts float16 [B, U, h, w] (on device), thresholds float32 [U]."""
    sh, sw = dataset.seg_size
    b, u = acts.shape[:2]
    # Bilinear, centre-aligned upsampling to the segmentation size, then > T_k.
    up = F.interpolate(acts.float(), size=(sh, sw), mode="bilinear", align_corners=False)
    mask = (up > thresholds.view(1, -1, 1, 1)).view(b, u, sh * sw)
    mask_f = mask.float()
    mask_count = mask_f.sum(2)  # [B, U], exact in float32 (<= sh*sw)

    present = torch.from_numpy(batch.present).to(device)
    tally.mask_area += (mask_count.T @ present.float()).round().to(torch.int64)
    tally.category_images += present.sum(0).to(torch.int64)

    slots = torch.from_numpy(batch.slots).to(device).long()  # [B, J], -1 = none
    valid = slots >= 0
    slot_concept = torch.where(valid, slots, torch.zeros_like(slots))
    label = torch.from_numpy(dataset.concept_label).to(device)[slot_concept]  # [B, J]
    category = torch.from_numpy(dataset.concept_category).to(device)[slot_concept]
    image_level = torch.tensor(
        [k == "image" for k in dataset.category_kind], device=device
    )[category]  # [B, J]
    planes = torch.from_numpy(batch.planes.astype(np.int64)).to(device).view(b, -1, sh * sw)
    onehot = image_level[:, None, :].expand(b, sh * sw, -1).clone()  # [B, P, J]
    for p, pc in enumerate(dataset.plane_category.tolist()):
        same_cat = category == pc  # [B, J]
        onehot |= (planes[:, p, :, None] == label[:, None, :]) & same_cat[:, None, :]
    onehot &= valid[:, None, :]
    onehot_f = onehot.float()
    inter = torch.bmm(mask_f, onehot_f)  # [B, U, J], exact in float32 (<= sh*sw per image)
    area = onehot_f.sum(1)  # [B, J]
    sink = tally.concepts
    target = torch.where(valid, slots, torch.full_like(slots, sink)).reshape(-1)
    tally.intersection.index_add_(
        1, target, inter.permute(1, 0, 2).reshape(u, -1).round().to(torch.int64)
    )
    tally.concept_area.index_add_(0, target, area.reshape(-1).round().to(torch.int64))


def tally_shard(dataset: PreparedDataset, indices: np.ndarray, store: ActivationStore,
                thresholds: np.ndarray, *, device: torch.device, batch_size: int = 64,
                desc: str = "tally", progress: bool = True) -> ConceptTally:
    units = store.shape[1]
    tally = ConceptTally(units, len(dataset.concepts), len(dataset.categories), device)
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
    pos = 0
    with torch.inference_mode():
        bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, mininterval=2)
        for batch in prefetch_batches(dataset, indices, batch_size):
            n = len(batch.indices)
            acts = store.read(pos, pos + n, device)
            tally_batch(tally, acts, t, batch, dataset, device)
            pos += n
            bar.update(n)
        bar.close()
    return tally


def shard_indices(n_images: int, shards: int, shard: int) -> np.ndarray:
    """Contiguous, balanced split of range(n_images) into `shards` parts; part `shard`."""
    if not 0 <= shard < shards:
        raise CnnvisError(f"shard {shard} is out of range for {shards} shards")
    bounds = np.linspace(0, n_images, shards + 1).round().astype(np.int64)
    return np.arange(bounds[shard], bounds[shard + 1], dtype=np.int64)
