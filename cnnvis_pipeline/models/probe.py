"""Every module of a model in one forward pass, and the check of a config's layers.

- probe_layers(model, x, layouts=...): every module's calls, output and verdict in one forward
  (the `layers` command and the zoo benchmark).
- unknown_layers(model, layers): the names that are no module (with the valid names), the others.
- layer_problems(model, layers, x, layouts=...): every problem of the listed layers (one message
  each) and the feature map shapes of the others; check_layers raises them all at once, else
  returns the shapes (the model check). A default-nchw output that is not plausibly [N, C, H, W]
  (layouts.nchw_doubt) is a problem, with the `layouts:` key that fixes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder, layer_names, parse_layer
from cnnvis_pipeline.models.layouts import first_tensor, nchw_doubt, resolve_layout, to_feature_map


def doubt_message(layer: str, doubt: str) -> str:
    return (f"layer {layer!r} {doubt}; give `layouts: {{{layer}: nhwc}}` if it is channels-last "
            f"(or `layouts: {{{layer}: nchw}}` to read it as it is)")


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
            doubt = nchw_doubt(shape, hw, m) if fmap and layout is None else None
            if doubt:
                fmap, problem = None, doubt_message(n, doubt).split(f"layer {n!r} ", 1)[-1]
            if c > 1:
                problem = (f"runs {c} times per forward pass: name the enclosing block or "
                           f"{n}@1..{n}@{c}" + (f"; {problem}" if problem else ""))
        rows.append(ProbedLayer(n, c, shape, layout, fmap, problem))
    return rows


def unknown_layers(model: nn.Module, layers: list[str]) -> tuple[list[str], list[str]]:
    """(problems of the names that are no module of the model, the other layers)."""
    modules = dict(model.named_modules())
    problems, known = [], []
    for name in layers:
        try:
            module_name, _ = parse_layer(str(name))
        except CnnvisError as e:
            problems.append(str(e))
            continue
        if module_name in modules and module_name:
            known.append(name)
        else:
            problems.append(f"no layer named {name!r}")
    if problems:
        valid = layer_names(model)
        if len(valid) > 40:  # the blocks first: a long list's tail is never read
            top = [n for n in valid if n.count(".") <= 1][:40]
            shown = ", ".join(top) + f", ... ({len(valid)} in all: `cnnvis layers` lists them)"
        else:
            shown = ", ".join(valid)
        problems[-1] += f"; valid layer names: {shown}"
    return problems, known


def layer_problems(model: nn.Module, layers: list[str], x: torch.Tensor, *,
                   model_name: str = "model", layouts: dict | None = None,
                   ) -> tuple[list[str], dict[str, list]]:
    """Every problem of the listed layers (messages without the model name) and {layer:
    [C, H, W]} of the others. A forward that fails raises (RuntimeError and the like)."""
    problems, layers = unknown_layers(model, layers)
    shapes: dict[str, list] = {}
    modules = dict(model.named_modules())
    groups = [list(layers)] + [[name] for name in layers]  # one pass for all, else one each
    for k, group in enumerate(groups if layers else []):
        try:
            with LayerRecorder(model, group, model_name=model_name, layouts=layouts) as rec, \
                    torch.no_grad():
                out = rec.run(x)
        except CnnvisError as e:
            if k:  # layer by layer, to name every problem at once
                problems.append(str(e).removeprefix(f"{model_name}: "))
            continue
        for name in group:
            module = modules[parse_layer(name)[0]]
            doubt = None if resolve_layout(model, name, module, layouts) is not None else \
                nchw_doubt(out[name].shape, tuple(x.shape[-2:]), module)
            if doubt:
                problems.append(doubt_message(name, doubt))
                continue
            shapes[name] = list(out[name].shape[1:])
            if math.prod(shapes[name]) == 0:
                problems.append(f"layer {name!r} outputs an empty map {shapes[name]}")
        if k == 0:
            break
    return problems, shapes


def check_layers(model: nn.Module, layers: list[str], x: torch.Tensor, *,
                 model_name: str = "model", layouts: dict | None = None) -> dict[str, list]:
    """Every problem of the listed layers at once (CnnvisError), else {layer: [C, H, W]}."""
    problems, shapes = layer_problems(model, layers, x, model_name=model_name, layouts=layouts)
    if problems:
        raise CnnvisError(f"{model_name}: " + "; ".join(problems))
    return shapes
