"""Forward hooks on modules named by their full dotted path.

- find_module(model, name): the submodule at a dotted path; the error lists the valid names.
- layer_names(model): every hookable dotted module name.
- LayerRecorder(model, layers): a context manager that keeps the outputs of several layers from one
  forward pass (detached, or with their graph when `detach=False`); hooks are removed on exit.
- feature_map_check(name, out): refuses a layer output that is not a 4-D [N, C, H, W] feature map.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def find_module(model: nn.Module, name: str, *, model_name: str = "model") -> nn.Module:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        valid = layer_names(model)
        shown = ", ".join(valid[:60]) + (f", ... ({len(valid)} in all)" if len(valid) > 60 else "")
        raise CnnvisError(f"{model_name}: no layer named {name!r}; valid layer names: {shown}")
    return modules[name]


def feature_map_check(name: str, out, *, model_name: str = "model") -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CnnvisError(
            f"{model_name}: layer {name!r} outputs {shape}, not a 4-D feature map [N, C, H, W]; "
            "choose a convolutional layer"
        )
    return out


class LayerRecorder:
    """Record the outputs of `layers` during forward passes of `model`.

    with LayerRecorder(model, ["layer3", "layer4"]) as rec:
        model(x)
        a = rec.outputs["layer4"]
    """

    def __init__(self, model: nn.Module, layers: list[str], *, detach: bool = True,
                 model_name: str = "model", stop_after_last: bool = False):
        self.model = model
        self.layers = list(layers)
        self.detach = detach
        self.model_name = model_name
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        self._modules = [find_module(model, n, model_name=model_name) for n in self.layers]
        self.stop_after_last = stop_after_last

    def _hook(self, name: str):
        def hook(_module, _inputs, out):
            out = feature_map_check(name, out, model_name=self.model_name)
            # Clone so that a following in-place op (ReLU(inplace=True)) cannot change what we keep.
            self.outputs[name] = out.detach().clone() if self.detach else out
            if self.stop_after_last and len(self.outputs) == len(self.layers):
                raise _StopForward()
        return hook

    def __enter__(self) -> LayerRecorder:
        try:
            for name, module in zip(self.layers, self._modules, strict=True):
                self._handles.append(module.register_forward_hook(self._hook(name)))
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
        """One forward pass; returns {layer: output}. Stops early after the last layer if asked."""
        self.outputs = {}
        try:
            self.model(x)
        except _StopForward:
            pass
        return dict(self.outputs)


class _StopForward(Exception):
    """Raised inside a hook to skip the rest of the network once every layer is recorded."""
