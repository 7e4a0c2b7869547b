"""The model's input: one way from dataset images to the tensor a model sees.

- pick_device(name): "auto" -> cuda when available, else cpu; a clear error for missing CUDA.
- to_unit_float(images, input_size, device): uint8 [B, H, W, 3] (numpy or CPU tensor) -> float
  [B, 3, h, w] in [0, 1] on `device`, bilinearly resized (align_corners=False) to input_size.
- resize(x, input_size): that resize alone, for float batches already in [0, 1].
- normalize(x, mean, std): (x - mean) / std per RGB channel (one value is broadcast to three).
- images_to_input(images, input_size, mean, std, device, channels_last): both, as the dissection,
  the training and the visualisations feed a model.
- prepare_model(model, device): eval mode on the device; channels-last memory on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cnnvis_pipeline.errors import CnnvisError


def pick_device(name: str | None = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnvisError(f"device {name!r} was asked for, but no CUDA device is available")
    return torch.device(name)


def resize(x: torch.Tensor, input_size: Sequence[int] | None) -> torch.Tensor:
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False)
    return x


def _channel_stats(values, what: str, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3:
        raise CnnvisError(f"{what} must have 3 values (one per RGB channel), not {list(values)!r}")
    return t.reshape(1, 3, 1, 1)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of a float [B, 3, H, W] batch."""
    return (x - _channel_stats(mean, "mean", x)) / _channel_stats(std, "std", x)


def to_unit_float(images, input_size: Sequence[int] | None,
                  device: torch.device) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(images)
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
    # The permuted uint8 tensor is channels-last in memory; .float() keeps that layout.
    return resize(x.permute(0, 3, 1, 2).float().div_(255.0), input_size)


def images_to_input(images, input_size: Sequence[int] | None, mean, std,
                    device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] (numpy or CPU tensor) -> normalised float [B, 3, h, w] on `device`."""
    x = normalize(to_unit_float(images, input_size, device), mean, std)
    return x.contiguous(memory_format=torch.channels_last if channels_last
                        else torch.contiguous_format)


def prepare_model(model: torch.nn.Module, device: torch.device) -> bool:
    """Eval mode on `device`; channels-last memory on CUDA. Returns whether it is channels-last."""
    model.eval().to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return channels_last
