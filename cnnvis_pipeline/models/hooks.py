"""Forward hooks on modules named by their full dotted path; what a "layer" of a config means.

A layer is a dotted module name (`layer4`, `features.1.0`), optionally followed by `@K` (`K` >= 1)
to take the K-th call of a module that runs more than once per forward pass (torchvision's
BasicBlock calls its `relu` twice, Bottleneck three times). A re-used module named without
`@K` is refused (the message names the module, how often it ran, and the enclosing block),
so a layer's activations never depend on which other layers are listed.

Its output is turned into a feature map [N, C, H, W] according to the layer's layout:
  nchw       a 4-D [N, C, H, W] tensor (the default for 4-D outputs)
  nhwc       a 4-D channels-last [N, H, W, C] tensor (swin, the inside of a ConvNeXt block)
  tokens     a token sequence [N, L, C]: the first K tokens (class/register tokens) are dropped
  tokens:K   and the other L - K are the patch grid in row-major order, restored to [N, C, h, w].
             With `tokens` K is the smallest K in 0..8 for which L - K tokens form a grid
             h x w of the input's proportions (an integer stride s with H // s == h and
             W // s == w, or ceil division); `tokens:K` gives it.
Layouts come from a model's `layouts:` config ({layer: layout}); otherwise from the defaults of
the torchvision families that need one (default_layout): swin (nhwc under `features` and at
`norm`), ConvNeXt (nhwc at `block.1`..`block.5` of a CNBlock), ViT (`tokens:1` under
`encoder`); the window-partitioned tensors inside a MaxViT PartitionAttentionLayer are refused.
Anything else that is not a 4-D tensor is refused.

- parse_layer(name) -> (module name, call or None).
- find_module(model, name): the submodule at a dotted path (an `@K` suffix is ignored); the
  error lists the valid names; a container that is never called itself (ModuleList,
  ModuleDict) is refused, naming its members.
- layer_names(model): every hookable dotted module name.
- set_layouts(model, layouts) / model_layouts(model): the layouts a model carries (build_model
  sets them from the config, so every stage that builds the model sees the same ones).
- default_layout(model, module_name, module), resolve_layout(...).
- to_feature_map(name, out, layout, input_hw): the [N, C, H, W] view (a copy when detached).
- LayerRecorder(model, layers): a context manager that keeps the feature maps of several layers
  from one forward pass (detached, or with their graph when `detach=False`); it counts the calls
  of every hooked module per forward, checks them on its first pass (which always runs to the
  end), and stops later passes after the last layer when `stop_after_last`.
- probe_layers(model, x): every module's calls and output in one forward (the `layers` command
  and the model check).
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError

LAYOUT_RE = re.compile(r"^(nchw|nhwc|tokens(:[0-9]+)?)$")
MAX_PREFIX_TOKENS = 8


def parse_layer(name: str) -> tuple[str, int | None]:
    """`layer3.1.relu@2` -> ("layer3.1.relu", 2); `layer3` -> ("layer3", None)."""
    module, sep, call = str(name).partition("@")
    if not sep:
        return module, None
    if not call.isdigit() or int(call) < 1:
        raise CnnvisError(f"layer {name!r}: the call after '@' must be a number >= 1")
    return module, int(call)


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def find_module(model: nn.Module, name: str, *, model_name: str = "model") -> nn.Module:
    module_name, _ = parse_layer(name)
    modules = dict(model.named_modules())
    if not module_name or module_name not in modules:
        valid = layer_names(model)
        shown = ", ".join(valid[:60]) + (f", ... ({len(valid)} in all)" if len(valid) > 60 else "")
        raise CnnvisError(f"{model_name}: no layer named {name!r}; valid layer names: {shown}")
    module = modules[module_name]
    if type(module).forward is nn.Module.forward:  # ModuleList, ModuleDict: never called
        members = [f"{module_name}.{child}" for child, _ in module.named_children()]
        shown = ", ".join(members[:20]) + (", ..." if len(members) > 20 else "")
        raise CnnvisError(
            f"{model_name}: layer {name!r} is a {type(module).__name__}, a container that is "
            f"never called itself; choose one of its members ({shown or 'it has none'})"
        )
    return module


# -- layouts ---------------------------------------------------------------------------------

def set_layouts(model: nn.Module, layouts: dict | None) -> nn.Module:
    for layer, layout in (layouts or {}).items():
        if not isinstance(layout, str) or not LAYOUT_RE.match(layout):
            raise CnnvisError(f"layouts.{layer}: {layout!r} is not one of nchw, nhwc, tokens, "
                              "tokens:K")
    model._cnnvis_layouts = dict(layouts or {})
    return model


def model_layouts(model: nn.Module) -> dict:
    return dict(getattr(model, "_cnnvis_layouts", None) or {})


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
                   layouts: dict | None = None) -> str | None:
    layouts = model_layouts(model) if layouts is None else layouts
    if layer in layouts:
        return layouts[layer]
    return default_layout(model, parse_layer(layer)[0], module)


def _first_tensor(out):
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


def to_feature_map(name: str, out, layout: str | None, input_hw, *, model_name: str = "model",
                   detach: bool = True) -> torch.Tensor:
    """The layer's output as [N, C, H, W] (contiguous; a copy when `detach`)."""
    out = _first_tensor(out)
    if layout and layout.startswith("refuse:"):
        raise _refusal(model_name, name, f"cannot be dissected: {layout[7:]}")
    if not isinstance(out, torch.Tensor):
        raise _refusal(model_name, name, f"outputs {type(out).__name__}, not a tensor; choose "
                       "a layer that outputs a feature map")
    shape = tuple(out.shape)
    kind = (layout or ("nchw" if out.dim() == 4 else "")).split(":")[0]
    if kind in ("nchw", "nhwc") and out.dim() != 4:
        raise _refusal(model_name, name, f"outputs {shape}, not a 4-D feature map (layout "
                       f"{kind})")
    if kind == "nchw":
        fmap = out
    elif kind == "nhwc":
        fmap = out.permute(0, 3, 1, 2)
    elif kind == "tokens":
        if out.dim() != 3:
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
        k, h, w = grid
        fmap = out[:, k:].transpose(1, 2).unflatten(2, (h, w))
    else:
        raise _refusal(model_name, name, f"outputs {shape}, not a 4-D feature map [N, C, H, W]; "
                       "choose a convolutional layer, or give the layer a layout "
                       "(`layouts: {<layer>: nhwc | tokens | tokens:K}`)")
    if detach:
        # A copy, so that a following in-place op (ReLU(inplace=True)) cannot change what we keep.
        return fmap.detach().clone(memory_format=torch.contiguous_format)
    return fmap


def feature_map_check(name: str, out, *, model_name: str = "model") -> torch.Tensor:
    """The output as a plain nchw feature map, or CnnvisError (kept for callers of old)."""
    return to_feature_map(name, out, None, None, model_name=model_name, detach=False)


# -- recording -------------------------------------------------------------------------------

def reuse_message(model_name: str, name: str, calls: int) -> str:
    module, _ = parse_layer(name)
    parent = module.rsplit(".", 1)[0] if "." in module else None
    fix = (f"name the enclosing block ({parent!r}) to get its output, or " if parent else "")
    return (f"{model_name}: layer {name!r} is a module that runs {calls} times in one forward "
            f"pass, so its output is ambiguous; {fix}choose one call with "
            f"'{module}@1' .. '{module}@{calls}'")


# Per model: {(layer, training): number of calls seen in a complete forward pass}.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Target:
    layer: str
    call: int | None
    layout: str | None


class LayerRecorder:
    """Record the feature maps of `layers` during forward passes of `model`.

    with LayerRecorder(model, ["layer3", "layer4"]) as rec:
        a = rec.run(x)["layer4"]           # or: model(x); rec.outputs["layer4"]
    """

    def __init__(self, model: nn.Module, layers: list[str], *, detach: bool = True,
                 model_name: str = "model", stop_after_last: bool = False,
                 layouts: dict | None = None, keep: bool = True):
        self.model = model
        self.keep = keep  # False: only note that the layer ran (a forward-only baseline)
        self.layers = list(layers)
        self.detach = detach
        self.model_name = model_name
        self.outputs: dict[str, torch.Tensor] = {}
        self.stop_after_last = stop_after_last
        self._handles = []
        self._input_hw = None
        self._modules: dict[int, tuple[nn.Module, list[_Target]]] = {}
        for name in self.layers:
            m = find_module(model, name, model_name=model_name)
            target = _Target(name, parse_layer(name)[1], resolve_layout(model, name, m, layouts))
            self._modules.setdefault(id(m), (m, []))[1].append(target)
        self._calls: dict[int, int] = {}
        try:
            self._verified = _VERIFIED.setdefault(model, {})
        except TypeError:
            self._verified = {}

    def _is_verified(self) -> bool:
        return all((n, self.model.training) in self._verified for n in self.layers)

    def _pre(self, _module, inputs):
        self.outputs = {}
        self._calls = {k: 0 for k in self._modules}
        x = inputs[0] if inputs else None
        self._input_hw = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() >= 2 \
            else None

    def _post(self, _module, _inputs, _out):
        """After a complete forward pass: every layer ran, re-used modules were chosen a call."""
        for key, (_m, targets) in self._modules.items():
            calls = self._calls.get(key, 0)
            for t in targets:
                if calls == 0:
                    raise CnnvisError(f"{self.model_name}: layer {t.layer!r} was not used in the "
                                      "forward pass")
                if t.call is None and calls > 1:
                    raise CnnvisError(reuse_message(self.model_name, t.layer, calls))
                if t.call is not None and t.call > calls:
                    raise CnnvisError(f"{self.model_name}: layer {t.layer!r}: the module runs "
                                      f"{calls} time(s) in one forward pass, no call {t.call}")
                self._verified[(t.layer, self.model.training)] = calls

    def _hook(self, key: int):
        def hook(_module, _inputs, out):
            self._calls[key] = n = self._calls.get(key, 0) + 1
            for t in self._modules[key][1]:
                if (t.call or 1) == n:
                    self.outputs[t.layer] = to_feature_map(
                        t.layer, out, t.layout, self._input_hw, model_name=self.model_name,
                        detach=self.detach) if self.keep else None
            if (self.stop_after_last and len(self.outputs) == len(self.layers)
                    and self._is_verified()):
                raise _StopForward()
        return hook

    def __enter__(self) -> LayerRecorder:
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._pre))
            for key, (module, _t) in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(key)))
            # Registered last: runs after a hook on the root module itself has recorded.
            self._handles.append(self.model.register_forward_hook(self._post))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass; returns {layer: feature map}. Stops early after the last layer if
        asked, once a complete pass has checked the call counts. Under a torch function mode
        (DeconvNet's guard, the receptive field's), or with detach=False, that first check is a
        pass of its own (no
        graph, no modes, nothing kept), so what runs after the layers cannot change or refuse
        the recorded pass; otherwise the first recorded pass runs to the end."""
        # With the graph kept (detach=False) the recorded output is the module's own tensor: an
        # in-place op after the layer (ReLU(inplace=True)) in a pass that runs to the end would
        # change it, so that first check is a pass of its own too.
        if (self.stop_after_last and not self._is_verified()
                and (torch._C._is_torch_function_mode_enabled() or not self.detach)):
            keep, self.keep = self.keep, False
            try:
                with torch.no_grad(), torch._C.DisableTorchFunction():
                    self.model(x)
            finally:
                self.keep = keep
        self.outputs = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        return dict(self.outputs)


class _StopForward(Exception):
    """Raised inside a hook to skip the rest of the network once every layer is recorded."""


@dataclass
class ProbedLayer:
    name: str
    calls: int
    shape: tuple | None  # output of the first call (None: not a tensor)
    layout: str | None
    feature_map: tuple | None  # [C, H, W] after the layout, None when refused
    problem: str | None  # why the layer cannot be dissected as named


@torch.no_grad()
def probe_layers(model: nn.Module, x: torch.Tensor, *, model_name: str = "model",
                 layouts: dict | None = None) -> list[ProbedLayer]:
    """One complete forward pass with every module hooked: calls, shapes and verdicts, in
    module order."""
    named = [(n, m) for n, m in model.named_modules() if n]
    calls: dict[str, int] = {}
    first: dict[str, object] = {}

    def make(n):
        def hook(_m, _i, out):
            calls[n] = calls.get(n, 0) + 1
            if n not in first:
                t = _first_tensor(out)
                first[n] = t.detach() if isinstance(t, torch.Tensor) else t
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in named]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    rows = []
    hw = tuple(x.shape[-2:])
    for n, m in named:
        c = calls.get(n, 0)
        out = first.get(n)
        layout = resolve_layout(model, n, m, layouts)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        fmap, problem = None, None
        if c == 0:
            problem = "not used in the forward pass"
        else:
            try:
                fmap = tuple(to_feature_map(n, out, layout, hw, model_name=model_name,
                                            detach=False).shape[1:])
            except CnnvisError as e:
                problem = str(e).split(f"layer {n!r} ", 1)[-1]
            if c > 1:
                problem = (f"runs {c} times per forward pass: name the enclosing block or "
                           f"{n}@1..{n}@{c}" + (f"; {problem}" if problem else ""))
        rows.append(ProbedLayer(n, c, shape, layout, fmap, problem))
    return rows


def check_layers(model: nn.Module, layers: list[str], x: torch.Tensor, *,
                 model_name: str = "model", layouts: dict | None = None) -> dict[str, list]:
    """Every problem of the listed layers at once (CnnvisError), else {layer: [C, H, W]}."""
    problems, shapes = [], {}
    modules = dict(model.named_modules())
    for name in layers:
        module_name, _ = parse_layer(str(name))
        if module_name not in modules or not module_name:
            problems.append(f"no layer named {name!r}")
    if problems:
        valid = layer_names(model)
        shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all)" if len(valid) > 40 else "")
        raise CnnvisError(f"{model_name}: " + "; ".join(problems) + f"; valid layer names: {shown}")
    groups = [list(layers)] + [[name] for name in layers]  # one pass for all, else one each
    for k, group in enumerate(groups):
        try:
            with LayerRecorder(model, group, model_name=model_name, layouts=layouts) as rec, \
                    torch.no_grad():
                out = rec.run(x)
        except CnnvisError as e:
            if k:  # layer by layer, to name every problem at once
                problems.append(str(e).removeprefix(f"{model_name}: "))
            continue
        for name in group:
            shapes[name] = list(out[name].shape[1:])
            if math.prod(shapes[name]) == 0:
                problems.append(f"layer {name!r} outputs an empty map {shapes[name]}")
        if k == 0:
            break
    if problems:
        raise CnnvisError(f"{model_name}: " + "; ".join(problems))
    return shapes
