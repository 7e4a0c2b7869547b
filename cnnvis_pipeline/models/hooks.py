"""Forward hooks on modules named by their full dotted path; what a "layer" of a config means.

A layer is a dotted module name (`layer4`, `features.1.0`), optionally followed by `@K` (`K` >= 1)
to take the K-th call of a module that runs more than once per forward pass (torchvision's
BasicBlock calls its `relu` twice, Bottleneck three times). A re-used module named without
`@K` is refused (the message names the module, how often it ran, and the enclosing block),
so a layer's activations never depend on which other layers are listed. Its output is seen as a
feature map [N, C, H, W] according to its layout (models.layouts; `layouts=` {layer: layout}).

- parse_layer(name) -> (module name, call or None).
- find_module(model, name): the submodule at a dotted path (an `@K` suffix is ignored); the
  error lists the valid names; a container that is never called itself (ModuleList,
  ModuleDict) is refused, naming its members.
- layer_names(model): every hookable dotted module name.
- LayerHooks: what the recorder and the editor (models.edits) share: the layers' modules and
  layouts, the calls of every hooked module counted per forward pass, checked after it.
- LayerRecorder(model, layers, layouts=...): a context manager that keeps the feature maps of
  several layers from one forward pass (detached, or with their graph when `detach=False`); it
  checks the calls on its first pass (which always runs to the end), and stops later passes
  after the last layer when `stop_after_last`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.layouts import resolve_layout, to_feature_map


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


def reuse_message(model_name: str, name: str, calls: int) -> str:
    module, _ = parse_layer(name)
    parent = module.rsplit(".", 1)[0] if "." in module else None
    fix = (f"name the enclosing block ({parent!r}) to get its output, or " if parent else "")
    return (f"{model_name}: layer {name!r} is a module that runs {calls} times in one forward "
            f"pass, so its output is ambiguous; {fix}choose one call with "
            f"'{module}@1' .. '{module}@{calls}'")


@dataclass
class Target:
    layer: str
    call: int | None
    layout: str | None


class LayerHooks:
    """The modules of `layers` (dotted names with `@K`), their layouts, and the calls of each
    module counted per forward pass of `model` (reset by a pre-hook on the model itself).
    Subclasses register their hooks in `_register` and use `_count`, `_input_hw`, `_check`."""

    def __init__(self, model: nn.Module, layers: list[str], *, model_name: str = "model",
                 layouts: dict | None = None):
        self.model = model
        self.layers = list(layers)
        self.model_name = model_name
        self._handles = []
        self._input_hw = None
        self._modules: dict[int, tuple[nn.Module, list[Target]]] = {}
        for name in self.layers:
            m = find_module(model, name, model_name=model_name)
            try:
                layout = resolve_layout(model, name, m, layouts)
            except CnnvisError as e:
                raise CnnvisError(f"{model_name}: {e}") from None
            self._modules.setdefault(id(m), (m, []))[1].append(
                Target(name, parse_layer(name)[1], layout))
        self._calls: dict[int, int] = {}

    def _pre(self, _module, inputs) -> None:
        self._calls = {k: 0 for k in self._modules}
        x = inputs[0] if inputs else None
        self._input_hw = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() >= 2 \
            else None

    def _count(self, key: int) -> int:
        """One more call of the module `key` in this forward pass; returns its number."""
        self._calls[key] = n = self._calls.get(key, 0) + 1
        return n

    def _check(self) -> dict[str, int]:
        """After a complete forward pass: every layer ran, re-used modules were chosen a call.
        Returns {layer: calls of its module}."""
        seen = {}
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
                seen[t.layer] = calls
        return seen

    def _register(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# Per model: {(layer, training): number of calls seen in a complete forward pass}.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LayerRecorder(LayerHooks):
    """Record the feature maps of `layers` during forward passes of `model`.

    with LayerRecorder(model, ["layer3", "layer4"], layouts=spec["layouts"]) as rec:
        a = rec.run(x)["layer4"]           # or: model(x); rec.outputs["layer4"]
    """

    def __init__(self, model: nn.Module, layers: list[str], *, detach: bool = True,
                 model_name: str = "model", stop_after_last: bool = False,
                 layouts: dict | None = None, keep: bool = True):
        super().__init__(model, layers, model_name=model_name, layouts=layouts)
        self.keep = keep  # False: only note that the layer ran (a forward-only baseline)
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self.stop_after_last = stop_after_last
        try:
            self._verified = _VERIFIED.setdefault(model, {})
        except TypeError:
            self._verified = {}

    def _is_verified(self) -> bool:
        return all((n, self.model.training) in self._verified for n in self.layers)

    def _pre(self, module, inputs) -> None:
        self.outputs = {}
        super()._pre(module, inputs)

    def _post(self, _module, _inputs, _out) -> None:
        for layer, calls in self._check().items():
            self._verified[(layer, self.model.training)] = calls

    def _hook(self, key: int):
        def hook(_module, _inputs, out):
            n = self._count(key)
            for t in self._modules[key][1]:
                if (t.call or 1) == n:
                    self.outputs[t.layer] = to_feature_map(
                        t.layer, out, t.layout, self._input_hw, model_name=self.model_name,
                        detach=self.detach) if self.keep else None
            if (self.stop_after_last and len(self.outputs) == len(self.layers)
                    and self._is_verified()):
                raise _StopForward()
        return hook

    def _register(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre))
        for key, (module, _t) in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(key)))
        # Registered last: runs after a hook on the root module itself has recorded.
        self._handles.append(self.model.register_forward_hook(self._post))

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass; returns {layer: feature map}. Stops early after the last layer if
        asked, once a complete pass has checked the call counts. Under a torch function mode
        (DeconvNet's guard, the receptive field's), or with detach=False, that first check is a
        pass of its own (no graph, no modes, nothing kept), so what runs after the layers cannot
        change or refuse the recorded pass; otherwise the first recorded pass runs to the end."""
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
