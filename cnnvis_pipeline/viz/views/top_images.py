"""The top-images view (for the selected units and every other detector of the layer: each
detector's card shows at least these): each unit's top-activating dataset images (top_images.parquet, highest
maximum activation first), everything outside its thresholded mask darkened and the mask
outlined, one PNG per image (viz/unit<U>_top<R>.png; for a detector beyond the selected units,
scaled down to fit THUMB_PX, so that a page with every detector stays small). The maps come from one new forward pass
over the images needed: float32 (the layer's own values), bilinear (align_corners=False) to the
image size, > the unit's threshold. The layer entry records the largest difference between the
recomputed and the tabled maxima (0 when the pass reproduces the dissection's).
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F

from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import images as im
from cnnvis_pipeline.viz.context import LayerContext, View, ViewResult

THUMB_PX = 96  # the other detectors' top images: at most this side (a page of every detector)


def _settings(_views: Views) -> dict:
    return {}  # every top image of the dissection (its top_k); the report shows report.top_images


def _compute(ctx: LayerContext, units: list[int], _views: Views) -> ViewResult:
    tops = {u: ctx.top_rows(u) for u in units}
    needed = np.unique(np.concatenate([t["image_index"].to_numpy(np.int64) for t in tops.values()]
                                      + [np.zeros(0, np.int64)]))
    pos = {int(i): k for k, i in enumerate(needed)}
    acts = ctx.activations(needed) if len(needed) else None
    ih, iw = ctx.ds.images.shape[1:3]
    selected = set(ctx.selected)
    out = ViewResult(layer={"max_abs_diff": 0.0})
    for u in units:
        t = tops[u]
        if not len(t):
            continue
        a = acts[[pos[int(i)] for i in t["image_index"]], u : u + 1].float()
        recomputed = a.amax(dim=(1, 2, 3)).cpu().numpy().astype(np.float64)
        diff = float(np.abs(recomputed - t["max_activation"].to_numpy()).max())
        out.layer["max_abs_diff"] = max(out.layer["max_abs_diff"], diff)
        up = F.interpolate(a, size=(ih, iw), mode="bilinear", align_corners=False)
        masks = (up[:, 0] > float(ctx.thresholds[u])).cpu().numpy()
        files = []
        for r, (i, m) in enumerate(zip(t["image_index"], masks, strict=True)):
            files.append(f"unit{u:04d}_top{r}.png")
            tile = im.mask_overlay(np.asarray(ctx.ds.images[i]), m)
            im.save_png(tile if u in selected else im.fit(tile, THUMB_PX), ctx.out / files[-1])
        out.cards[u] = {"files": files, "images": [str(s) for s in t["image"]],
                        "image_index": [int(i) for i in t["image_index"]],
                        "max_activation": [float(v) for v in t["max_activation"]],
                        "mask_fraction": [float(m.mean()) for m in masks]}
    return out


VIEW = View("top_images", "top images", _settings, _compute, every_detector=True)
