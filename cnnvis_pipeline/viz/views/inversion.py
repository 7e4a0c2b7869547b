"""The inversion view: viz/inversion_<k>_{original,reconstruction}.png, network inversion
(viz.inversion) of the first `views.inversion.images` images of the val split (then the other
splits) whose representation at the layer is not all zeros. Table inversion.parquet, per image:
error = ||Phi(x*) - Phi0||^2 / ||Phi0||^2 (invert's), normalized_error = ||Phi(x*) - Phi0||^2 /
spread, the spread being the mean over all n^2 ordered pairs (diagonal included) of the squared
distances between the representations of the first SPREAD_IMAGES candidates
(viz.representation_spread; the formula, viz.NORMALIZED_ERROR_FORMULA, is in the layer entry
with the weights used), baseline = the unrelated-image baseline of `error`: the mean over the
same SPREAD_IMAGES candidates, the image itself left out, of ||Phi(x_j) - Phi0||^2 / ||Phi0||^2
(inversion.unrelated_baseline; BASELINE_FORMULA in the layer entry). lambda_tv is the paper's for the layer's relative depth unless the
settings give one (views.inversion.lambda_tv, .layers.<layer>.lambda_tv).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import images as im
from cnnvis_pipeline.viz import inversion
from cnnvis_pipeline.viz.context import LayerContext, View, ViewResult, append, columns

SPREAD_IMAGES = 64  # the images whose representations give the spread of normalized_error


def _settings(views: Views) -> dict:
    return dataclasses.asdict(views.inversion)


def candidates(ds) -> np.ndarray:
    """Image indices: the val split first, then the others."""
    splits = np.asarray(ds.meta["splits"])
    return np.concatenate([np.flatnonzero(splits == "val"),
                           np.flatnonzero(splits != "val")]).astype(np.int64)


def _nonzero_images(ctx: LayerContext, cand: np.ndarray, n: int) -> list[int]:
    """The first n candidates whose representation at the layer is not all zeros."""
    chosen: list[int] = []
    for start in range(0, len(cand), 64):
        part = cand[start : start + 64]
        phi = inversion.layer_representation(ctx.model, ctx.layer, ctx.images(part),
                                             batch_size=ctx.job.resources.batch_size, **ctx.norm)
        nonzero = phi.flatten(1).abs().amax(dim=1) > 0
        chosen += [int(i) for i, ok in zip(part, nonzero.tolist(), strict=True) if ok]
        if len(chosen) >= n:
            break
    return chosen[:n]


def _weights(ctx: LayerContext, views: Views, x0: torch.Tensor) -> dict:
    """The settings' weights for this layer, else the paper's TV weight for its relative depth."""
    lambda_tv, lambda_alpha = views.inversion.weights(ctx.layer)
    depth = inversion.relative_depth(ctx.model, ctx.layer, x0, mean=ctx.spec["mean"],
                                     std=ctx.spec["std"], model_name=ctx.name)
    if lambda_tv is None:
        lambda_tv = inversion.paper_lambda_tv(depth)
    return {"relative_depth": depth, "lambda_tv": lambda_tv, "lambda_alpha": lambda_alpha}


def _spread(ctx: LayerContext, cand: np.ndarray) -> float:
    idx = cand[:SPREAD_IMAGES]
    if len(idx) < 2:
        return float("nan")
    return inversion.representation_spread(ctx.model, ctx.layer, ctx.images(idx),
                                           batch_size=ctx.job.resources.batch_size, **ctx.norm)


def _baselines(ctx: LayerContext, cand: np.ndarray, chosen: list[int],
               phi0: torch.Tensor) -> np.ndarray:
    """Per chosen image, the mean relative error of the other SPREAD_IMAGES candidates."""
    idx = cand[:SPREAD_IMAGES]
    phi = inversion.layer_representation(ctx.model, ctx.layer, ctx.images(idx),
                                         batch_size=ctx.job.resources.batch_size, **ctx.norm)
    exclude = [np.flatnonzero(idx == i).tolist() for i in chosen]
    return inversion.unrelated_baseline(phi0, phi, exclude).cpu().numpy()


def _compute(ctx: LayerContext, _units: list[int], views: Views) -> ViewResult:
    inv = views.inversion
    rows = columns("model", "layer", "image_index", "image", "error", "normalized_error",
                   "baseline")
    entry = {"images": [], "normalized_error_formula": inversion.NORMALIZED_ERROR_FORMULA,
             "baseline_formula": inversion.BASELINE_FORMULA}
    out = ViewResult(layer=entry, tables={"inversion": rows})
    if inv.images <= 0:
        out.note = "no images inverted (views.inversion.images: 0)"
        return out
    cand = candidates(ctx.ds)
    chosen = _nonzero_images(ctx, cand, inv.images)
    if not chosen:
        out.note = f"{ctx.name}: layer {ctx.layer!r} is all zeros for every image"
        return out
    x0 = ctx.images(chosen)
    entry["weights"] = w = _weights(ctx, views, x0)
    recon, errors = inversion.invert(ctx.model, ctx.layer, x0, steps=inv.steps, lr=inv.lr,
                                     lambda_tv=w["lambda_tv"], lambda_alpha=w["lambda_alpha"],
                                     seed=inv.seed, **ctx.norm)
    phi0 = inversion.layer_representation(ctx.model, ctx.layer, x0,
                                          batch_size=ctx.job.resources.batch_size,
                                          **ctx.norm).flatten(1)
    norm2 = phi0.double().pow(2).sum(dim=1).cpu().numpy()
    spread = _spread(ctx, cand)
    baselines = _baselines(ctx, cand, chosen, phi0)
    names = ctx.ds.meta["images"]
    for k, i in enumerate(chosen):
        err, base = float(errors[k]), float(baselines[k])
        nerr = err * float(norm2[k]) / spread if spread > 0 else float("nan")
        orig, rec_f = f"inversion_{k}_original.png", f"inversion_{k}_reconstruction.png"
        im.save_png(x0[k], ctx.out / orig)
        im.save_png(recon[k], ctx.out / rec_f)
        entry["images"].append({"image_index": i, "image": names[i], "error": err,
                                "normalized_error": nerr if nerr == nerr else None,
                                "baseline": base if base == base else None,
                                "original_file": orig, "reconstruction_file": rec_f})
        append(rows, model=ctx.name, layer=ctx.layer, image_index=i, image=names[i], error=err,
               normalized_error=nerr, baseline=base)
    return out


VIEW = View("inversion", "network inversion", _settings, _compute)
