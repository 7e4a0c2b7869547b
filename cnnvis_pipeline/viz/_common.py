"""Helpers shared by the visualisation algorithms (not part of the public API).

- frozen_eval(model): eval mode and parameters without gradients for the duration; restored after.
- model_device(model, device): the device to work on.
- preprocess(x, mean, std, input_size): resize and normalise a [0, 1] batch before the model
  (models.input.resize and normalize: the one input normalisation).
- layer_forward(model, layer, x, model_name, layouts): the layer's output (with its graph),
  stopping the forward pass right after the layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.input import normalize, resize


@contextlib.contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode (BatchNorm statistics fixed, no dropout) and no parameter gradients."""
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in params:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def model_device(model: nn.Module, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def size_pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2:
        pair = (int(size[0]), int(size[1]))
    else:
        raise CnnvisError(f"{what} must be an int or a pair (height, width), not {size!r}")
    if min(pair) < 1:
        raise CnnvisError(f"{what} must be positive, not {size!r}")
    return pair


def check_mean_std(mean, std) -> None:
    if (mean is None) != (std is None):
        raise CnnvisError("give both mean and std for input normalisation, or neither")
    if std is not None and any(float(s) <= 0 for s in torch.as_tensor(std).reshape(-1)):
        raise CnnvisError(f"std values must be positive, not {list(std)!r}")


def preprocess(x: torch.Tensor, mean=None, std=None, input_size=None) -> torch.Tensor:
    """Bilinear resize to `input_size` (if given), then (x - mean) / std (if given)."""
    if input_size is not None:
        x = resize(x, size_pair(input_size, "input_size"))
    if mean is not None:
        x = normalize(x, mean, std)
    return x


def layer_forward(model: nn.Module, layer: str, x: torch.Tensor, *,
                  model_name: str = "model", layouts: dict | None = None) -> torch.Tensor:
    """Run `model` on `x` up to `layer` and return the layer's [N, C, H, W] output, graph kept
    (`layouts`: the model's {layer: layout}, models.hooks)."""
    with LayerRecorder(model, [layer], detach=False, model_name=model_name,
                       stop_after_last=True, layouts=layouts) as rec:
        outputs = rec.run(x)
    if layer not in outputs:
        raise CnnvisError(f"{model_name}: layer {layer!r} was not used in the forward pass")
    return outputs[layer]


def check_images(images, what: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CnnvisError(f"{what} must be a float tensor [N, 3, H, W], not {shape}")
    if images.shape[0] == 0:
        raise CnnvisError(f"{what} is empty")
    return images.float()
