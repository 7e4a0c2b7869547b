"""The DeconvNet view: viz/unit<U>_deconv.png, DeconvNet projections of the strongest
activation in each top image (bottom row) under the image patch cropped to that location's
receptive field (top row). A model whose ReLUs are not nn.ReLU modules is refused by
viz.deconvnet: the message becomes the view's note (and the report's) instead of failing the
rule; `views.deconvnet: false` switches it off.
"""

from __future__ import annotations

import logging

import torch

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import images as im
from cnnvis_pipeline.viz.context import LayerContext, View, ViewResult, unit_file
from cnnvis_pipeline.viz.deconvnet import deconvnet, receptive_field, strongest_locations

log = logging.getLogger(__name__)


def _settings(views: Views) -> dict:
    return {"enabled": views.deconvnet}


def _tiles(ctx: LayerContext, x: torch.Tensor, proj: torch.Tensor, ys, xs, rf_cache: dict):
    hw = tuple(x.shape[-2:])
    patches, projections, boxes = [], [], []
    for j in range(len(x)):
        key = (int(ys[j]), int(xs[j]))
        if key not in rf_cache:
            rf_cache[key] = receptive_field(ctx.model, ctx.layer, hw, *key, model_name=ctx.name,
                                            device=ctx.device, layouts=ctx.layouts)
        t0, l0, b0, r0 = rf_cache[key]
        boxes.append([t0, l0, b0, r0])
        patches.append(im.to_uint8(x[j, :, t0:b0, l0:r0]))
        p = proj[j, :, t0:b0, l0:r0].detach().cpu().numpy().transpose(1, 2, 0)
        projections.append(im.signed_to_image(p))
    th = max(p.shape[0] for p in patches)
    tw = max(p.shape[1] for p in patches)
    tiles = [im.pad_to(p, th, tw) for p in patches] + [im.pad_to(p, th, tw) for p in projections]
    return im.strip(tiles, rows=2), boxes


def _compute(ctx: LayerContext, units: list[int], views: Views) -> ViewResult:
    if not views.deconvnet:
        return ViewResult(note="switched off (views.deconvnet: false)")
    out = ViewResult()
    rf_cache: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for u in units:
        idx = ctx.top_rows(u)["image_index"].tolist()
        if not idx:
            continue
        x = ctx.images(idx)
        try:
            proj = deconvnet(ctx.model, ctx.layer, u, x, **ctx.norm)
        except CnnvisError as e:
            log.warning("%s", e)
            return ViewResult(note=f"{e} (no unit of this layer has a projection)")
        _v, ys, xs = strongest_locations(ctx.model, ctx.layer, u, x, **ctx.norm)
        strip, boxes = _tiles(ctx, x, proj, ys, xs, rf_cache)
        im.save_png(strip, ctx.out / unit_file(u, "deconv"))
        out.cards[u] = {"file": unit_file(u, "deconv"), "receptive_fields": boxes}
    return out


VIEW = View("deconvnet", "DeconvNet", _settings, _compute)
