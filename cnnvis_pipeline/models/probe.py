"""Every module of a model in one forward pass, and the check of a config's layers.

- probe_layers(model, x, layouts=...): every module's calls, output and verdict in one forward
  (the `layers` command and the zoo benchmark).
- check_layers(model, layers, x, layouts=...): every problem of the listed layers at once, else
  their feature map shapes (the model check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder, layer_names, parse_layer
from cnnvis_pipeline.models.layouts import first_tensor, resolve_layout, to_feature_map


@dataclass
class ProbedLayer:
    name: str
    calls: int
    shape: tuple | None  # output of the first call (None: not a tensor)
    layout: str | None
    feature_map: tuple | None  # [C, H, W] after the layout, None when refused
    problem: str | None  # why the layer cannot be dissected as named


def _first_outputs(model: nn.Module, named, x: torch.Tensor) -> tuple[dict, dict]:
    """{name: calls} and {name: first output} of every named module in one forward pass."""
    calls: dict[str, int] = {}
    first: dict[str, object] = {}

    def make(n):
        def hook(_m, _i, out):
            calls[n] = calls.get(n, 0) + 1
            if n not in first:
                t = first_tensor(out)
                first[n] = t.detach() if isinstance(t, torch.Tensor) else t
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in named]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return calls, first


@torch.no_grad()
def probe_layers(model: nn.Module, x: torch.Tensor, *, model_name: str = "model",
                 layouts: dict | None = None) -> list[ProbedLayer]:
    """One complete forward pass with every module hooked: calls, shapes and verdicts, in
    module order."""
    named = [(n, m) for n, m in model.named_modules() if n]
    calls, first = _first_outputs(model, named, x)
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
