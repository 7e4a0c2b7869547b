"""Replacing the backward pass of a model's nn.ReLU modules, and checking that it is complete.

- relu_backward_override(model, kind): context manager; inside it every nn.ReLU module's output
  carries a different backward: "redirected" (Lucid's redirected ReLU gradient, for activation
  maximisation) or "deconv" (DeconvNet: the backward signal is itself rectified, the forward mask
  is ignored). In-place ReLUs are switched to out-of-place for the duration. Hooks and `inplace`
  flags are restored on exit, also on errors.
- ActivationCallGuard: a TorchFunctionMode that refuses (CnnvisError) any ReLU called outside an
  nn.ReLU module (torch.relu / F.relu / x.relu() inside a forward, or a clamp used as one:
  x.clamp(min=0), torch.clamp_min, x.clip(0, ...)) and any other rectifying activation, since their backward could not be replaced and the result would silently be a
  plain gradient.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnvis_pipeline.errors import CnnvisError


class _SavingReLU(torch.autograd.Function):
    """ReLU forward that keeps its input for a custom backward (the subclasses')."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)


class _RedirectedReLU(_SavingReLU):
    """ReLU whose backward lets gradient through where the input is negative, if that gradient
    would push the input up, for the batch elements that get no gradient at all through the
    ordinary ReLU backward (so silent units can be woken up)."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        negative = x < 0
        relu_grad = grad.masked_fill(negative, 0.0)
        # The loss is minimised: a negative gradient means gradient descent raises the input.
        redirected = grad.masked_fill(negative & (grad > 0), 0.0)
        if grad.dim() == 0:
            return relu_grad if bool(relu_grad != 0) else redirected
        passes = relu_grad.reshape(grad.shape[0], -1).abs().amax(dim=1) > 0
        passes = passes.reshape((-1,) + (1,) * (grad.dim() - 1))
        return torch.where(passes, relu_grad, redirected)


class _RedirectedPerPositionReLU(_SavingReLU):
    """ReLU whose backward also lets through, at every position where the input is negative, the
    gradient that would push the input up (not only for batch elements with no gradient at all):
    a silent part of the map is pulled towards activity instead of being ignored."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.masked_fill((x < 0) & (grad > 0), 0.0)


class _DeconvReLU(torch.autograd.Function):
    """ReLU whose backward is ReLU of the incoming signal (Zeiler & Fergus 2014)."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


_KINDS = {"redirected": _RedirectedReLU, "deconv": _DeconvReLU,
          "redirected_per_position": _RedirectedPerPositionReLU}


@contextlib.contextmanager
def relu_backward_override(model: nn.Module, kind: str, *, overrides: dict | None = None):
    """Inside the block, the backward of every nn.ReLU module of `model` is replaced.

    The forward value is unchanged. Implemented with forward hooks (prepended, so later hooks such
    as a LayerRecorder see the replaced output) that recompute the ReLU through an autograd
    function with the new backward; this works when one module is called several times.
    overrides: {module: kind} for nn.ReLU modules that get another kind than `kind`.
    """
    fns = {id(m): _KINDS[k] for m, k in (overrides or {}).items()}
    default_fn = _KINDS[kind]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    saved_inplace = [m.inplace for m in relus]
    handles = []

    def hook(module, inputs, _out):
        return fns.get(id(module), default_fn).apply(inputs[0])

    try:
        for m in relus:
            # In place, the module's input would already be overwritten when the hook runs.
            m.inplace = False
            handles.append(m.register_forward_hook(hook, prepend=True))
        yield relus
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(relus, saved_inplace, strict=True):
            m.inplace = flag


_RELU_FUNCS = {
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
    F.threshold, F.threshold_, torch.threshold, torch.threshold_,
}
# Clamping with a lower bound is a ReLU in disguise (x.clamp(min=0), torch.clamp_min(x, 0)); one
# with only an upper bound rectifies too. Either way the backward is the plain gradient mask.
_CLAMP_FUNCS = {
    torch.clamp, torch.clamp_, torch.clip, torch.clip_, torch.clamp_min, torch.clamp_min_,
    torch.clamp_max, torch.clamp_max_,
    torch.Tensor.clamp, torch.Tensor.clamp_, torch.Tensor.clip, torch.Tensor.clip_,
    torch.Tensor.clamp_min, torch.Tensor.clamp_min_, torch.Tensor.clamp_max,
    torch.Tensor.clamp_max_,
}
_OTHER_RECTIFIERS = {
    F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.rrelu_,
    F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.softplus,
}


def _clamps(func, args, kwargs) -> bool:
    """Whether a clamp-family call has a bound (a clamp without bounds is the identity)."""
    name = getattr(func, "__name__", "")
    if name.startswith(("clamp_min", "clamp_max")):
        return True
    bounds = list(args[1:3]) + [kwargs.get("min"), kwargs.get("max")]
    return any(b is not None for b in bounds)


def _describe(func) -> str:
    mod = getattr(func, "__module__", None) or "torch.Tensor"
    return f"{mod}.{getattr(func, '__name__', repr(func))}"


class ActivationCallGuard(TorchFunctionMode):
    """Refuse ReLUs that do not run inside an nn.ReLU module, and other rectifiers.

    Use together with `track(model)`, which marks the time windows in which an nn.ReLU module is
    running. F.relu called by nn.ReLU.forward falls inside such a window; anything else does not.
    """

    def __init__(self, model_name: str, layer: str):
        super().__init__()
        self.model_name = model_name
        self.layer = layer
        self.depth = 0

    @contextlib.contextmanager
    def track(self, model: nn.Module):
        handles = []

        def enter(_m, _inputs):
            self.depth += 1

        def leave(_m, _inputs, _out):
            self.depth -= 1

        try:
            for m in model.modules():
                if isinstance(m, nn.ReLU):
                    handles.append(m.register_forward_pre_hook(enter))
                    handles.append(m.register_forward_hook(leave))
            self.depth = 0
            yield self
        finally:
            for h in handles:
                h.remove()
            self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS and self.depth == 0:
            raise CnnvisError(
                f"{self.model_name}: DeconvNet of layer {self.layer!r} is not possible: the forward "
                f"pass calls {_describe(func)} directly (a functional ReLU, not an nn.ReLU module), "
                "so its backward cannot be replaced; rewrite the model with nn.ReLU modules or "
                "pick an earlier layer"
            )
        if func in _CLAMP_FUNCS and self.depth == 0 and _clamps(func, args, kwargs):
            raise CnnvisError(
                f"{self.model_name}: DeconvNet of layer {self.layer!r} is not possible: the forward "
                f"pass calls {_describe(func)} (a clamp used as a rectifier, e.g. "
                "x.clamp(min=0) for a ReLU), whose backward cannot be replaced; rewrite the model "
                "with nn.ReLU modules or pick an earlier layer"
            )
        if func in _OTHER_RECTIFIERS:
            raise CnnvisError(
                f"{self.model_name}: DeconvNet of layer {self.layer!r} is not possible: the forward "
                f"pass uses {_describe(func)}; DeconvNet is defined only for nets whose "
                "non-linearities before the layer are nn.ReLU modules (and max pooling)"
            )
        return func(*args, **kwargs)
