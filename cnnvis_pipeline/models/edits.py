"""Hooks that edit a layer's output: interventions (ablating units, fixing their values).

A layer is named as for LayerRecorder (dotted name, `@K` for the K-th call of a re-used module;
a re-used module named without `@K` is refused). An Edit is a function that takes the layer's
output in its canonical view [N, C, H, W] (models.layouts: nchw, nhwc, tokens, tokens:K, with
`layouts=` {layer: layout}) and returns the edited map of the same shape; it is put back in the
module's own layout (leading class/register tokens unchanged) and replaces the module's output,
so everything after the layer runs on it. Edits are out of place: gradients flow through the
units an edit keeps.

An editor's hooks run before any other forward hook of the module, so a LayerRecorder active at
the same time records the edited output, whichever was entered first.

- edit_layers(model, {layer: edit}, layouts=...) -> LayerEditor: a context manager.
- zero_units(units), fix_units(units, values): built-in edits.
- ablate_groups(groups, n_images): for a batch of n_images repeated G = len(groups) times (rows
  g * n_images .. (g + 1) * n_images - 1 are group g), zero group g's units in its rows.
- run_groups(model, x, layer, groups, layouts=..., at_layer=False) -> [G, N, ...]: the model's
  output on `x` with each group's units of `layer` zeroed, all G groups in one forward pass.
  With `at_layer` the N images run once up to `layer`, whose output is repeated G times there
  (an edit with a `repeat` attribute): the part before the layer is not computed G times. It
  is right only for a model that uses nothing computed before `layer` after it (a skip
  connection around the layer breaks it); callers check it against the plain way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerHooks, reuse_message
from cnnvis_pipeline.models.layouts import from_feature_map, to_feature_map

Edit = Callable[[torch.Tensor], torch.Tensor]


class LayerEditor(LayerHooks):
    """Replace the outputs of the layers of `edits` by their edits, in every forward pass of
    `model` while active; after each complete pass the calls are checked as the recorder's."""

    def __init__(self, model: nn.Module, edits: dict[str, Edit], *, model_name: str = "model",
                 layouts: dict | None = None):
        super().__init__(model, list(edits), model_name=model_name, layouts=layouts)
        self.edits = dict(edits)

    def _edit(self, t, out):
        repeat = getattr(self.edits[t.layer], "repeat", 1)
        if repeat > 1:  # the rest of the model runs on `repeat` copies of the batch
            out = _repeat_rows(out, repeat)
        fmap = to_feature_map(t.layer, out, t.layout, self._input_hw,
                              model_name=self.model_name, detach=False)
        try:
            new = self.edits[t.layer](fmap)
        except CnnvisError as e:
            raise CnnvisError(f"{self.model_name}: layer {t.layer!r}: {e}") from None
        return from_feature_map(t.layer, new, out, t.layout, self._input_hw,
                                model_name=self.model_name)

    def _hook(self, key: int):
        def hook(_module, _inputs, out):
            n = self._count(key)
            for t in self._modules[key][1]:
                if t.call is None and n > 1:
                    raise CnnvisError(reuse_message(self.model_name, t.layer, n))
                if (t.call or 1) == n:
                    out = self._edit(t, out)
            return out
        return hook

    def _post(self, _module, _inputs, _out) -> None:
        self._check()

    def _register(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre))
        for key, (module, _t) in self._modules.items():
            # First among the module's hooks: a recorder on the same layer sees the edit.
            self._handles.append(module.register_forward_hook(self._hook(key), prepend=True))
        self._handles.append(self.model.register_forward_hook(self._post))


def _repeat_rows(out, times: int):
    """A module's output (a tensor, or a tuple/list whose tensors are batch-first) repeated
    `times` times along the batch (copy g = rows g * N .. (g + 1) * N - 1)."""
    def rep(t):
        return t.repeat(times, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) else t
    if isinstance(out, (tuple, list)):
        return type(out)(rep(t) for t in out)
    return rep(out)


def edit_layers(model: nn.Module, edits: dict[str, Edit], *, layouts: dict | None = None,
                model_name: str = "model") -> LayerEditor:
    """with edit_layers(model, {"layer3": zero_units([4, 7])}, layouts=spec["layouts"]):
           y = model(x)"""
    return LayerEditor(model, edits, model_name=model_name, layouts=layouts)


def _unit_index(units: Sequence[int], fmap: torch.Tensor) -> torch.Tensor:
    idx = [int(u) for u in units]
    channels = fmap.shape[1]
    bad = [u for u in idx if not 0 <= u < channels]
    if bad:
        raise CnnvisError(f"units {bad} out of range (the layer has units 0..{channels - 1})")
    return torch.tensor(idx, dtype=torch.long, device=fmap.device)


def zero_units(units: Sequence[int]) -> Edit:
    """Set the maps of `units` to 0."""
    units = list(units)

    def edit(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.index_fill(1, _unit_index(units, fmap), 0)
    return edit


def fix_units(units: Sequence[int], values) -> Edit:
    """Set the maps of `units` to `values`: a number, one number per unit, or a tensor that
    broadcasts to [N, len(units), H, W] (a per-unit map [len(units), H, W], ...)."""
    units = list(units)
    if len(set(int(u) for u in units)) != len(units):
        raise CnnvisError(f"fix_units: a unit is listed twice in {units}")

    def edit(fmap: torch.Tensor) -> torch.Tensor:
        idx = _unit_index(units, fmap)
        v = torch.as_tensor(values, dtype=fmap.dtype, device=fmap.device)
        if v.dim() == 1:
            v = v.view(1, -1, 1, 1)  # one value per unit
        n, _, h, w = fmap.shape
        try:
            src = v.expand(n, len(units), h, w)
        except RuntimeError:
            raise CnnvisError(f"fix_units: values of shape {tuple(v.shape)} do not broadcast to "
                              f"[{n}, {len(units)}, {h}, {w}] (N, units, H, W)") from None
        return fmap.index_copy(1, idx, src)
    return edit


def ablate_groups(groups: Sequence[Sequence[int]], n_images: int) -> Edit:
    """For a batch of G * n_images rows (group g: rows g * n_images .. (g + 1) * n_images - 1),
    zero the units of groups[g] in group g's rows."""
    groups = [list(g) for g in groups]

    def edit(fmap: torch.Tensor) -> torch.Tensor:
        if fmap.shape[0] != len(groups) * n_images:
            raise CnnvisError(f"ablate_groups: a batch of {fmap.shape[0]}, not {len(groups)} "
                              f"groups x {n_images} images")
        drop = torch.zeros(len(groups), fmap.shape[1], dtype=torch.bool, device=fmap.device)
        for g, units in enumerate(groups):
            drop[g, _unit_index(units, fmap)] = True
        drop = drop.repeat_interleave(n_images, 0)[:, :, None, None]
        return fmap.masked_fill(drop, 0)
    return edit


def run_groups(model: nn.Module, x: torch.Tensor, layer: str, groups: Sequence[Sequence[int]],
               *, layouts: dict | None = None, model_name: str = "model",
               at_layer: bool = False) -> torch.Tensor:
    """model(x) ([N, ...] -> [N, ...]) with the units of groups[g] of `layer` zeroed, for every
    group g in one forward pass of G * N rows; returns [G, N, ...]. Rows must not interact
    (a model in eval mode). `at_layer`: repeat at the layer instead of at the input (the
    module docstring says when that is right)."""
    if not groups:
        raise CnnvisError(f"{model_name}: run_groups needs at least one group of units")
    n = x.shape[0]
    edit = ablate_groups(groups, n)
    if at_layer:
        edit.repeat = len(groups)
        batch = x
    else:
        batch = x.repeat(len(groups), *([1] * (x.dim() - 1)))
    with edit_layers(model, {layer: edit}, layouts=layouts, model_name=model_name):
        out = model(batch)
    if not isinstance(out, torch.Tensor):
        raise CnnvisError(f"{model_name}: run_groups needs a model that outputs a tensor, not "
                          f"{type(out).__name__}")
    if out.shape[0] != len(groups) * n:
        raise CnnvisError(f"{model_name}: run_groups: the model's output has {out.shape[0]} "
                          f"rows, not {len(groups)} groups x {n} images")
    return out.unflatten(0, (len(groups), n))
