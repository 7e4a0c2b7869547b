"""The extraction pass: one forward pass per batch over a shard, and the thresholds.

- extract_shard(...): keeps float16 activations of every layer in per-unit coordinates
  (affine.Affine, calibrated on a sample of the dataset; ActivationStore files, or in memory), a
  StoredHistogram per layer and each image's per-unit maximum (float32, for the top images).
- set_precision(precision, device): TF32 off unless "tf32"; the precision actually used.
- unit_thresholds(histogram, quantile): T_k, the (1 - q) quantile of each unit.
- forward_only(...): the same input pipeline and forward pass with nothing kept (the benchmark's
  baseline).
- shard_indices(n_images, shards, shard): the contiguous images of one shard.

On CUDA nothing waits for the device per batch (non-finite values are checked at the end,
maxima are copied back once).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.affine import Affine, StoredHistogram, calibration_indices
from cnnvis_pipeline.dissection.stats import Float16Histogram
from cnnvis_pipeline.dissection.stores import ActivationStore, load_batches, tune_malloc
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.input import images_to_input, prepare_model
from cnnvis_pipeline.progress import Progress


def forward_only(model: torch.nn.Module, layers: list[str], dataset: PreparedDataset,
                 indices: np.ndarray, *, input_size, mean, std, device: torch.device,
                 batch_size: int = 64, precision: str = "fp32", model_name: str = "model",
                 progress: bool = False, layouts: dict | None = None) -> None:
    """extract_shard's input pipeline and forward pass (up to the last of `layers`), keeping nothing."""
    tune_malloc()
    autocast = set_precision(precision, device) == "bf16"
    channels_last = prepare_model(model, device)
    # The recorder's semantics (calls of re-used modules, where to stop), keeping nothing.
    with LayerRecorder(model, layers, model_name=model_name, stop_after_last=True,
                       keep=False, layouts=layouts) as rec, torch.inference_mode():
        for b in tqdm(load_batches(dataset, indices, batch_size, ("images",), device),
                      total=-(-len(indices) // batch_size), desc=f"forward {model_name}",
                      disable=not progress, mininterval=2):
            x = images_to_input(b.images, input_size, mean, std, device, channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                rec.run(x)


def set_precision(precision: str, device: torch.device) -> str:
    """Configure the process for `precision` (fp32 | tf32 | bf16) on `device`; returns the
    precision actually used: "fp32" means IEEE float32 matmuls and convolutions on every device
    (TF32 off; PyTorch leaves cuDNN convolutions on TF32 by default), "tf32" only when asked for
    and on CUDA, "bf16" = autocast on CUDA (on the CPU: fp32)."""
    if precision not in ("fp32", "tf32", "bf16"):
        raise CnnvisError(f"config: dissection.precision: {precision!r} is not one of fp32, "
                          "tf32, bf16")
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if device.type != "cuda":
        return "fp32"
    return precision


def extract_shard(model: torch.nn.Module, layers: list[str], dataset: PreparedDataset,
                  indices: np.ndarray, *, input_size, mean, std, device: torch.device,
                  batch_size: int = 64, out_dir: Path | None = None, precision: str = "fp32",
                  model_name: str = "model", progress: bool = True, quantile: float = 0.005,
                  calibrate: bool = True, layouts: dict | None = None):
    """One forward pass per batch over `indices`; returns (stores, histograms, maxima).

    stores[layer]: ActivationStore (float16 [n, U, h, w] in per-unit coordinates, see Affine);
    histograms[layer]: StoredHistogram (quantiles in the layer's units); maxima[layer]: float32
    numpy [n, U], each image's maximum activation per unit (from the float32 output). When
    `out_dir` is given the activations are .npy files `acts_<layer>.npy` there.

    With `calibrate` (the default) each unit's Affine comes from a forward pass over the
    calibration sample (calibration_indices of the whole dataset, so every shard stores in the
    same coordinates, and `quantile` is the dissection's); without it, plain float16.
    The precision used is set by set_precision (TF32 off unless asked for). `layouts`: the
    model spec's {layer: layout} (models.layouts).
    """
    tune_malloc()
    used = set_precision(precision, device)
    channels_last = prepare_model(model, device)
    autocast = used == "bf16"
    stores: dict[str, ActivationStore] = {}
    hists: dict[str, StoredHistogram] = {}
    maxima: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    finite: list[tuple[torch.Tensor, str, int, int]] = []  # checked at the end on CUDA
    deferred = device.type == "cuda"
    affines: dict[str, Affine] = {}

    def check(flags) -> None:
        for ok, name, first, last in flags:
            if not bool(ok):
                raise CnnvisError(
                    f"{model_name}: layer {name!r} produced NaN or infinite activations "
                    f"(or values beyond float16's range times the unit's storage scale, "
                    f"65504 x its calibration sample's spread) on images {first}..{last}"
                )

    with LayerRecorder(model, layers, model_name=model_name, stop_after_last=True,
                       layouts=layouts) as rec, torch.inference_mode():
        if calibrate and len(indices):
            idx = calibration_indices(len(dataset))
            x = images_to_input(np.ascontiguousarray(dataset.images[idx]), input_size, mean, std,
                                device, channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                outs = rec.run(x)
            for name in layers:
                try:
                    affines[name] = Affine.calibrate(outs[name], quantile)
                except CnnvisError as e:
                    raise CnnvisError(f"{model_name}: layer {name!r}: {e}") from None
            del outs, x
        bar = tqdm(total=len(indices), desc=f"extract {model_name}", unit="img", disable=not progress,
                   mininterval=2)
        lines = Progress(f"extract {model_name}", len(indices), enabled=progress)
        for batch in load_batches(dataset, indices, batch_size, ("images",), device):
            x = images_to_input(batch.images, input_size, mean, std, device, channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                outs = rec.run(x)
            first, last = int(batch.indices[0]), int(batch.indices[-1])
            for name in layers:
                out = outs[name]
                if name not in stores:
                    path = None if out_dir is None else Path(out_dir) / f"acts_{name}.npy"
                    affine = affines.get(name) or Affine.identity(out.shape[1])
                    stores[name] = ActivationStore(len(indices), out.shape[1:], path, device,
                                                   affine)
                    hists[name] = StoredHistogram(out.shape[1], device, affine)
                a16 = stores[name].affine.encode(out)
                ok = torch.isfinite(a16).all()
                if deferred:
                    finite.append((ok, name, first, last))
                else:
                    check([(ok, name, first, last)])
                stores[name].write(batch.pos, a16)
                hists[name].add(a16)
                maxima[name].append(out.float().amax(dim=(2, 3)))
            del outs, x
            bar.update(len(batch.indices))
            lines.update(len(batch.indices))
        bar.close()
        lines.close()
    if finite:
        oks = torch.stack([f[0] for f in finite]).cpu().tolist()
        check([(ok, *f[1:]) for ok, f in zip(oks, finite, strict=True)])
    for s in stores.values():
        s.flush()
    out_max = {}
    for k, v in maxima.items():
        out_max[k] = (torch.cat(v).cpu().numpy() if v
                      else np.zeros((0, 0), np.float32))
    return stores, hists, out_max


def unit_thresholds(hist: Float16Histogram, quantile: float) -> np.ndarray:
    """T_k: the (1 - quantile) quantile of each unit's raw activations (float64, in the layer's
    units: a StoredHistogram maps the stored values' exact quantile back)."""
    return hist.quantiles(1.0 - quantile)


def shard_indices(n_images: int, shards: int, shard: int) -> np.ndarray:
    """Contiguous, balanced split of range(n_images) into `shards` parts; part `shard`."""
    if not 0 <= shard < shards:
        raise CnnvisError(f"shard {shard} is out of range for {shards} shards")
    bounds = np.linspace(0, n_images, shards + 1).round().astype(np.int64)
    return np.arange(bounds[shard], bounds[shard + 1], dtype=np.int64)
