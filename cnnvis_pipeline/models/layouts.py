"""Layouts: how a layer's output is a feature map, its canonical unit-first view [N, C, H, W].

  nchw       a 4-D [N, C, H, W] tensor (the default for 4-D outputs)
  nhwc       a 4-D channels-last [N, H, W, C] tensor (swin, the inside of a ConvNeXt block)
  tokens     a token sequence [N, L, C]: the first K tokens (class/register tokens) are dropped
  tokens:K   and the other L - K are the patch grid in row-major order, restored to [N, C, h, w].
             With `tokens` K is the smallest K in 0..8 for which L - K tokens form a grid
             h x w of the input's proportions (an integer stride s with H // s == h and
             W // s == w, or ceil division); `tokens:K` gives it.
A layer's layout is the one given in `layouts` ({layer: layout}, a model spec's `layouts:`, passed
by every caller); otherwise the default of the torchvision families that need one
(default_layout): swin (nhwc under `features` and at `norm`), ConvNeXt (nhwc at
`block.1`..`block.5` of a CNBlock), ViT (`tokens:1` under `encoder`); the window-partitioned
tensors inside a MaxViT PartitionAttentionLayer are refused. Anything else that is not a 4-D
tensor is refused.

A 4-D output read as nchw by default (no `layouts` entry, no family default) must be plausibly
[N, C, H, W] (nchw_doubt): its grid H x W follows from the input by a stride (the token rule, with
a margin for the borders that unpadded convolutions drop), unless the module's weights say dim 1
holds its channels; and a module whose own weight gives its channel count must not have that
count in the last dimension only (an nn.Linear or LayerNorm applied channels-last).

- default_layout(model, module_name, module), resolve_layout(model, layer, module, layouts).
- weight_channels(module, own_only), nchw_doubt(shape, input_hw, module): why a default-nchw
  output is not plausibly nchw, or None.
- token_grid(tokens, input_hw, prefix): (K, h, w) of a token sequence.
- to_feature_map(name, out, layout, input_hw): the canonical view (a copy when detached).
- from_feature_map(name, fmap, out, layout, input_hw): the module's own output with its map
  replaced by `fmap` (the inverse of to_feature_map; leading tokens and a tuple's other items
  kept as they are).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError

LAYOUT_RE = re.compile(r"^(nchw|nhwc|tokens(:[0-9]+)?)$")
MAX_PREFIX_TOKENS = 8


def _family(model: nn.Module) -> str:
    mod = type(model).__module__
    return mod.rsplit(".", 1)[-1] if mod.startswith("torchvision.models.") else ""


def _ancestors(model: nn.Module, module_name: str) -> list[nn.Module]:
    parts = module_name.split(".")
    modules = dict(model.named_modules())
    return [modules[".".join(parts[:k])] for k in range(1, len(parts))
            if ".".join(parts[:k]) in modules]


def default_layout(model: nn.Module, module_name: str, module: nn.Module) -> str | None:
    """The layout of a torchvision module that needs one; "refuse:<why>" when its output is not
    a spatial map at all; None when the plain rule applies (4-D: nchw)."""
    family = _family(model)
    if family == "swin_transformer":
        if (module_name in ("features", "norm") or module_name.startswith("features.")) \
                and not isinstance(module, nn.Conv2d):
            return "nhwc"
    elif family == "convnext":
        if re.search(r"(^|\.)block\.[1-5](\.|$)", module_name):
            return "nhwc"
    elif family == "vision_transformer":
        if module_name == "encoder" or module_name.startswith("encoder."):
            return "tokens:1"
    elif family == "maxvit":
        for i, anc in enumerate(_ancestors(model, module_name)):
            if type(anc).__name__ == "PartitionAttentionLayer":
                enclosing = ".".join(module_name.split(".")[: i + 1])
                return (f"refuse:it works on window-partitioned tensors inside {enclosing!r}, "
                        f"not on a spatial map; name {enclosing!r} instead")
    return None


def resolve_layout(model: nn.Module, layer: str, module: nn.Module,
                   layouts: dict | None) -> str | None:
    """The layout `layouts` gives `layer` (checked), else its family default."""
    given = (layouts or {}).get(layer)
    if given is not None:
        if not isinstance(given, str) or not LAYOUT_RE.match(given):
            raise CnnvisError(f"layouts.{layer}: {given!r} is not one of nchw, nhwc, tokens, "
                              "tokens:K")
        return given
    return default_layout(model, layer.partition("@")[0], module)


def weight_channels(module: nn.Module, *, own_only: bool = False) -> int | None:
    """The output channel count a module's weight gives: a convolution's out_channels, a linear
    layer's out_features, a norm's features; with own_only False, for a module without a weight
    of its own, that of its last registered submodule with one."""
    for m in ([module] if own_only else reversed(list(module.modules()))):
        if not isinstance(m._parameters.get("weight"), torch.Tensor):
            continue
        for attr in ("out_channels", "out_features", "num_features", "num_channels"):
            if isinstance(getattr(m, attr, None), int):
                return getattr(m, attr)
        shape = getattr(m, "normalized_shape", None)
        if shape:
            return int(shape[-1])
        return int(m.weight.shape[0]) if m.weight.dim() == 1 else None
    return None


def grid_fits(grid, input_hw) -> bool:
    """Whether a grid h x w follows from an input H x W by one stride s (or an upsampling by an
    integer k), each side within a margin of 1 + 15% for the borders that unpadded
    convolutions drop."""
    (h, w), (H, W) = (int(v) for v in grid), (int(v) for v in input_hw)
    scales = [1 / s for s in range(1, max(H, W) + 1)] + list(range(2, 9))
    return any(abs(h - H * f) <= 1 + 0.15 * h and abs(w - W * f) <= 1 + 0.15 * w
               for f in scales)


def nchw_doubt(shape, input_hw, module: nn.Module) -> str | None:
    """Why a 4-D output read as [N, C, H, W] by default is not plausibly one, else None."""
    n, c, h, w = (int(v) for v in shape)
    own = weight_channels(module, own_only=True)
    if own is not None and w == own != c:
        return (f"outputs {tuple(shape)}: its last dimension is the {own} output channels of its "
                f"weight, so it is channels-last [N, H, W, C], not [N, C, H, W]")
    if (own if own is not None else weight_channels(module)) == c or input_hw is None:
        return None
    if not grid_fits((h, w), input_hw):
        return (f"outputs {tuple(shape)}: read as [N, C, H, W] its grid {h}x{w} does not follow "
                f"from the {input_hw[0]}x{input_hw[1]} input by a stride, so it is not plausibly "
                "a [N, C, H, W] feature map")
    return None


def first_tensor(out):
    """A module's output tensor: the output itself, or the first item of a tuple/list."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def token_grid(tokens: int, input_hw, prefix: int | None) -> tuple[int, int, int] | None:
    """(prefix, h, w) for a sequence of `tokens` from an input of size input_hw, or None."""
    H, W = (int(v) for v in input_hw)
    for k in ([prefix] if prefix is not None else range(MAX_PREFIX_TOKENS + 1)):
        p = tokens - k
        if p < 1:
            continue
        for h in range(1, p + 1):
            if p % h:
                continue
            w = p // h
            # A stride s (the patch size) that maps the input onto h x w, by floor or ceil.
            for s in range(1, max(H, W) + 1):
                if (H // s, W // s) == (h, w) or (-(-H // s), -(-W // s)) == (h, w):
                    return k, h, w
    return None


def _refusal(model_name: str, name: str, why: str) -> CnnvisError:
    return CnnvisError(f"{model_name}: layer {name!r} {why}")


def _tokens_grid(name: str, shape: tuple, layout: str, input_hw,
                 model_name: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise _refusal(model_name, name, f"outputs {shape}, not a token sequence [N, L, C] "
                       "(layout tokens)")
    prefix = int(layout.split(":")[1]) if ":" in layout else None
    if input_hw is None:
        raise _refusal(model_name, name, "has layout tokens but the input size is unknown")
    grid = token_grid(shape[1], input_hw, prefix)
    if grid is None:
        given = f"{prefix} leading token(s)" if prefix is not None else \
            f"0..{MAX_PREFIX_TOKENS} leading tokens"
        raise _refusal(model_name, name, f"outputs {shape[1]} tokens, which with {given} "
                       f"dropped form no patch grid of the {input_hw[0]}x{input_hw[1]} input; "
                       "give `layouts: {<layer>: tokens:K}` with the number K of class/"
                       "register tokens")
    return grid


def _kind(name: str, out, layout: str | None, model_name: str) -> str:
    """nchw, nhwc or tokens for a tensor output, else the refusal."""
    if layout and layout.startswith("refuse:"):
        raise _refusal(model_name, name, f"cannot be dissected: {layout[7:]}")
    if not isinstance(out, torch.Tensor):
        raise _refusal(model_name, name, f"outputs {type(out).__name__}, not a tensor; choose "
                       "a layer that outputs a feature map")
    kind = (layout or ("nchw" if out.dim() == 4 else "")).split(":")[0]
    if kind in ("nchw", "nhwc") and out.dim() != 4:
        raise _refusal(model_name, name, f"outputs {tuple(out.shape)}, not a 4-D feature map "
                       f"(layout {kind})")
    if kind not in ("nchw", "nhwc", "tokens"):
        raise _refusal(model_name, name, f"outputs {tuple(out.shape)}, not a 4-D feature map "
                       "[N, C, H, W]; choose a convolutional layer, or give the layer a layout "
                       "(`layouts: {<layer>: nhwc | tokens | tokens:K}`)")
    return kind


def to_feature_map(name: str, out, layout: str | None, input_hw, *, model_name: str = "model",
                   detach: bool = True) -> torch.Tensor:
    """The layer's output as [N, C, H, W] (contiguous; a copy when `detach`)."""
    out = first_tensor(out)
    kind = _kind(name, out, layout, model_name)
    if kind == "nchw":
        fmap = out
    elif kind == "nhwc":
        fmap = out.permute(0, 3, 1, 2)
    else:
        k, h, w = _tokens_grid(name, tuple(out.shape), layout, input_hw, model_name)
        fmap = out[:, k:].transpose(1, 2).unflatten(2, (h, w))
    if detach:
        # A copy, so that a following in-place op (ReLU(inplace=True)) cannot change what we keep.
        return fmap.detach().clone(memory_format=torch.contiguous_format)
    return fmap


def from_feature_map(name: str, fmap: torch.Tensor, out, layout: str | None, input_hw, *,
                     model_name: str = "model"):
    """`out` (a module's output) with its feature map replaced by `fmap` [N, C, H, W], in the
    module's own layout; leading tokens and the other items of a tuple/list are kept."""
    tensor = first_tensor(out)
    kind = _kind(name, tensor, layout, model_name)
    if not isinstance(fmap, torch.Tensor) or fmap.dim() != 4:
        raise _refusal(model_name, name, "was edited to something that is not a feature map "
                       "[N, C, H, W]")
    if kind == "nchw":
        new = fmap
    elif kind == "nhwc":
        new = fmap.permute(0, 2, 3, 1).contiguous()
    else:
        k = _tokens_grid(name, tuple(tensor.shape), layout, input_hw, model_name)[0]
        new = torch.cat([tensor[:, :k], fmap.flatten(2).transpose(1, 2)], 1)
    if tuple(new.shape) != tuple(tensor.shape):
        raise _refusal(model_name, name, f"was edited to shape {tuple(new.shape)} in its own "
                       f"layout, not its output's {tuple(tensor.shape)}")
    if tensor is out:
        return new
    return [new, *out[1:]] if isinstance(out, list) else (new, *out[1:])
