"""DeconvNet projections (Zeiler & Fergus 2014) and receptive-field boxes.

- deconvnet(model, layer, unit, images) -> [N, 3, H, W]: the strongest activation of `unit` in
  each image, projected back to pixel space.
- strongest_locations(model, layer, unit, images) -> (values, ys, xs): where that activation is.
- receptive_field(model, layer, input_size, y, x) -> (top, left, bottom, right): the input box
  (bottom/right exclusive) that can influence location (y, x) of the layer.

The projection is a backward pass in which every nn.ReLU module's backward is ReLU of the incoming
signal (relu.relu_backward_override "deconv"), max pooling routes the signal to the recorded
maxima (the ordinary MaxPool2d backward = unpooling with switches) and convolutions apply their
transposed filters (the ordinary Conv2d backward). A forward that calls a ReLU outside an nn.ReLU
module, or another rectifier, before the layer is refused (relu.ActivationCallGuard), as its
backward could not be replaced.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.viz._common import (
    check_images,
    check_mean_std,
    frozen_eval,
    layer_forward,
    model_device,
    preprocess,
    size_pair,
)
from cnnvis_pipeline.viz.relu import (
    _CLAMP_FUNCS,
    _OTHER_RECTIFIERS,
    _RELU_FUNCS,
    ActivationCallGuard,
    relu_backward_override,
)


def _check_unit(unit, channels: int, layer: str, model_name: str) -> int:
    if isinstance(unit, bool) or not isinstance(unit, int) or not 0 <= unit < channels:
        raise CnnvisError(
            f"{model_name}: layer {layer!r} has units 0..{channels - 1}; no unit {unit!r}"
        )
    return unit


def _argmax(act: torch.Tensor, unit: int):
    n, _c, _h, w = act.shape
    values, pos = act[:, unit].reshape(n, -1).max(dim=1)
    return values, pos, pos // w, pos % w


def strongest_locations(model: nn.Module, layer: str, unit: int, images: torch.Tensor, *,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        model_name: str = "model", layouts: dict | None = None):
    """(values [N], ys [N], xs [N]): the strongest activation of `unit` in each image and its
    location on the layer's spatial map (ties: the first in row-major order)."""
    images = check_images(images)
    check_mean_std(mean, std)
    with frozen_eval(model), torch.no_grad():
        act = layer_forward(model, layer, preprocess(images, mean, std), model_name=model_name,
                            layouts=layouts)
    unit = _check_unit(unit, act.shape[1], layer, model_name)
    values, _pos, ys, xs = _argmax(act, unit)
    return values, ys, xs


def deconvnet(model: nn.Module, layer: str, unit: int, images: torch.Tensor, *,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              model_name: str = "model", layouts: dict | None = None) -> torch.Tensor:
    """DeconvNet projection of the strongest activation of `unit` (channel) of `layer`.

    For each image: forward to `layer`, keep only the largest activation of `unit` over the
    spatial map (its value; everything else zero) and project it to pixel space. Returns a tensor
    [N, 3, H, W] shaped like `images`, in the model's input units (with `mean`/`std`, the images
    are normalised before the model and the projection includes that linear step's backward).
    If `layer` is a ReLU output and the unit is 0 everywhere, the projection is zero. Raises CnnvisError when a ReLU before the
    layer is not an nn.ReLU module (torch.relu / F.relu in forward) or another rectifier is used.
    The model's hooks, `inplace` flags, training mode and requires_grad flags are restored.
    """
    images = check_images(images)
    check_mean_std(mean, std)
    guard = ActivationCallGuard(model_name, layer)
    with frozen_eval(model), relu_backward_override(model, "deconv"), guard.track(model):
        x = images.detach().clone().requires_grad_(True)
        with guard:
            act = layer_forward(model, layer, preprocess(x, mean, std), model_name=model_name,
                                layouts=layouts)
        unit = _check_unit(unit, act.shape[1], layer, model_name)
        values, pos, _ys, _xs = _argmax(act.detach(), unit)
        n, c = act.shape[:2]
        seed = torch.zeros_like(act)
        seed.view(n, c, -1)[torch.arange(n, device=act.device), unit, pos] = values
        if not act.requires_grad:
            return torch.zeros_like(images)
        act.backward(seed)
    return x.grad.detach() if x.grad is not None else torch.zeros_like(images)


# --- receptive fields ------------------------------------------------------------------------


# F.max_pool2d is a dispatcher (on return_indices) with a (*args, **kwargs) signature; it is what
# a TorchFunctionMode sees for nn.MaxPool2d and F.max_pool2d calls. Its arguments are those of
# F._max_pool2d, in the same order as F.max_pool2d_with_indices.
_MAX_POOL_2D = (F.max_pool2d, F._max_pool2d, F.max_pool2d_with_indices)


def _pool_args(args, kwargs):
    bound = inspect.signature(F._max_pool2d).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


class _SupportMode(TorchFunctionMode):
    """Make every pixel that can influence an output get a non-zero gradient: ReLUs pass the
    gradient everywhere (straight-through), max pooling spreads it over its whole window."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS or func in _OTHER_RECTIFIERS or func in _CLAMP_FUNCS:
            x = args[0] if args else kwargs.pop("input")
            if not isinstance(x, torch.Tensor) or not x.requires_grad:
                return func(x, *args[1:], **kwargs)
            # On a copy, so that in-place variants leave x (and its graph) alone.
            out = func(x.detach().clone(), *args[1:], **kwargs)
            return x + (out - x).detach() if out.shape == x.shape else out
        if any(func is f for f in _MAX_POOL_2D):
            out = func(*args, **kwargs)
            a = _pool_args(args, kwargs)
            dilation = a["dilation"]
            if dilation not in (1, (1, 1), [1, 1]) or not a["input"].requires_grad:
                return out
            stride = a["stride"] if a["stride"] not in (None, [], ()) else None
            avg = F.avg_pool2d(a["input"], a["kernel_size"], stride, a["padding"],
                               ceil_mode=a["ceil_mode"], count_include_pad=True)
            values = out[0] if isinstance(out, tuple) else out
            if avg.shape != values.shape:
                return out
            spread = values + (avg - avg.detach())
            return (spread, out[1]) if isinstance(out, tuple) else spread
        return func(*args, **kwargs)


def receptive_field(model: nn.Module, layer: str, input_size: int | tuple[int, int], y: int,
                    x: int, *, model_name: str = "model", device=None,
                    layouts: dict | None = None) -> tuple[int, int, int, int]:
    """The box (top, left, bottom, right) of input pixels that influence `layer` at (y, x).

    bottom and right are exclusive, so `image[:, top:bottom, left:right]` is the patch; the box is
    clipped to the image. Computed empirically from the support of the gradient of that location
    (all channels, random weights) on random inputs, with ReLUs made straight-through and max
    pooling spreading its gradient over the whole window, so data-dependent zeros do not shrink
    it; this works for any architecture (padding, strides, dilation, branches).
    """
    hw = size_pair(input_size, "input_size")
    dev = model_device(model, device)
    gen = torch.Generator().manual_seed(0)
    with frozen_eval(model):
        inp = torch.randn((2, 3, *hw), generator=gen).to(dev).requires_grad_(True)
        with _SupportMode():
            act = layer_forward(model, layer, inp, model_name=model_name, layouts=layouts)
        _n, c, lh, lw = act.shape
        if isinstance(y, bool) or isinstance(x, bool) or not (0 <= int(y) < lh and 0 <= int(x) < lw):
            raise CnnvisError(
                f"{model_name}: layer {layer!r} has a {lh}x{lw} map for input {hw[0]}x{hw[1]}; "
                f"no location (y={y}, x={x})"
            )
        weights = torch.randn(c, generator=gen).to(dev) + 3.0
        if not act.requires_grad:
            raise CnnvisError(f"{model_name}: layer {layer!r} does not depend on the input")
        target = (act[:, :, int(y), int(x)] * weights).sum()
        (grad,) = torch.autograd.grad(target, inp, allow_unused=True)
    if grad is None:
        raise CnnvisError(f"{model_name}: layer {layer!r} does not depend on the input")
    support = grad.abs().amax(dim=(0, 1)) > 0
    rows = torch.nonzero(support.any(dim=1)).flatten()
    cols = torch.nonzero(support.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise CnnvisError(
            f"{model_name}: no input pixel influences layer {layer!r} at (y={y}, x={x})"
        )
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
