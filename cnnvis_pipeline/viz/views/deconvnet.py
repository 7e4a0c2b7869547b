"""The DeconvNet view: viz/unit<U>_deconv.png, DeconvNet projections of the strongest
activation in each top image (bottom row) under the image patch cropped to that location's
receptive field (top row). Each projection tile is contrast-normalised on its own
(`contrast_tile`: per-channel median at grey, the 99th percentile of its deviations at black and
white), so that a weak projection is as readable as a strong one; the report shows the tiles at
an integer scale of at least 96 px. A model whose ReLUs are not nn.ReLU modules is refused by
viz.deconvnet: the message becomes the view's note (and the report's) instead of failing the
rule; `views.deconvnet: false` switches it off.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.progress import Progress
from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import images as im
from cnnvis_pipeline.viz.context import LayerContext, View, ViewResult, unit_file
from cnnvis_pipeline.viz.deconvnet import deconvnet, receptive_field, strongest_locations

log = logging.getLogger(__name__)
CONTRAST = 99.0  # percentile of a tile's absolute deviations (from its median) at black/white


def contrast_tile(p: np.ndarray) -> np.ndarray:
    """A projection crop [h, w, 3] (any sign, any scale) as uint8: each channel's median at grey,
    the CONTRAST-th percentile of the absolute deviations at white/black (a few extreme pixels
    are clipped instead of washing the rest out to grey; all beyond it: its maximum); a crop
    without variation is uniform grey."""
    p = np.asarray(p, np.float64)
    centred = p - np.median(p.reshape(-1, p.shape[-1]), axis=0)
    dev = np.abs(centred)
    scale = float(np.percentile(dev, CONTRAST)) if dev.size else 0.0
    if not scale > 0:
        scale = float(dev.max()) if dev.size else 0.0
    if not (np.isfinite(scale) and scale > 0):
        return np.full(p.shape, 128, np.uint8)
    return im.to_uint8(np.clip(0.5 + 0.5 * centred / scale, 0.0, 1.0))


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
        projections.append(contrast_tile(p))
    th = max(p.shape[0] for p in patches)
    tw = max(p.shape[1] for p in patches)
    tiles = [im.pad_to(p, th, tw) for p in patches] + [im.pad_to(p, th, tw) for p in projections]
    return im.strip(tiles, rows=2), boxes


def _compute(ctx: LayerContext, units: list[int], views: Views) -> ViewResult:
    if not views.deconvnet:
        return ViewResult(note="switched off (views.deconvnet: false)")
    out = ViewResult()
    rf_cache: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    lines = Progress(f"{ctx.name} {ctx.layer}: DeconvNet", len(units), "units")
    for u in units:
        lines.update()
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
    lines.close()
    return out


VIEW = View("deconvnet", "DeconvNet", _settings, _compute)
