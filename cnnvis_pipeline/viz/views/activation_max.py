"""The activation-maximisation view: viz/unit<U>_am.png (viz.activation_max, all selected units
in one batch, `views.activation_max`) with the model's mean/std, fed at the dataset's input size
as the dataset top was measured. Table activation_max.parquet, per unit: achieved_activation =
the maximum of the unit's map on its final image, dataset_top_activation = the highest maximum
activation among the unit's top images (the same statistic over dataset images),
activation_ratio = achieved / dataset top (NaN when the dataset top is not positive). The card
also shows the final value of the optimised objective.
"""

from __future__ import annotations

import dataclasses

import torch

from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.input import normalize, resize
from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import images as im
from cnnvis_pipeline.viz.activation_max import activation_maximization
from cnnvis_pipeline.viz.context import LayerContext, View, ViewResult, append, columns, unit_file


def _settings(views: Views) -> dict:
    return dataclasses.asdict(views.activation_max)


@torch.no_grad()
def _map_maxima(ctx: LayerContext, images: torch.Tensor, units: list[int]) -> torch.Tensor:
    """Each unit's maximum over its map on its own image (as top_images' maxima)."""
    x = normalize(resize(images.to(ctx.device), ctx.input_size), ctx.spec["mean"],
                  ctx.spec["std"])
    with LayerRecorder(ctx.model, [ctx.layer], model_name=ctx.name, stop_after_last=True,
                       layouts=ctx.layouts) as rec:
        a = rec.run(x)[ctx.layer]
    return a[torch.arange(len(units)), torch.tensor(units)].amax(dim=(1, 2)).cpu()


def _compute(ctx: LayerContext, units: list[int], views: Views) -> ViewResult:
    am = views.activation_max
    rows = columns("model", "layer", "unit", "achieved_activation", "dataset_top_activation",
                   "activation_ratio")
    out = ViewResult(tables={"activation_max": rows})
    if not units:
        return out
    images, objective = activation_maximization(
        ctx.model, ctx.layer, units, steps=am.steps, size=am.size, lr=am.lr, seed=am.seed,
        device=ctx.device, input_size=ctx.input_size, preset=am.preset, **ctx.norm)
    achieved = _map_maxima(ctx, images, units)
    for i, u in enumerate(units):
        im.save_png(images[i], ctx.out / unit_file(u, "am"))
        top = ctx.dataset_top(u)
        value = float(achieved[i])
        ratio = value / top if top is not None and top > 0 else None
        out.cards[u] = {"file": unit_file(u, "am"), "objective": float(objective[i]),
                        "achieved": value, "dataset_top": top, "ratio": ratio}
        append(rows, model=ctx.name, layer=ctx.layer, unit=u, achieved_activation=value,
               dataset_top_activation=float("nan") if top is None else top,
               activation_ratio=float("nan") if ratio is None else ratio)
    return out


VIEW = View("activation_max", "activation maximisation", _settings, _compute)
