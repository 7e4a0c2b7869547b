"""Inverting a layer's representation (Mahendran & Vedaldi 2015).

invert(model, layer, images, ...) -> (reconstructions, errors): for each image x0, starting from
noise, minimise by gradient descent with momentum

    E(x) = ||Phi(x) - Phi0||^2 / ||Phi0||^2 + lambda_alpha * R_alpha(x) + lambda_tv * R_tv(x)

    R_alpha(x) = 1 / (H W B^alpha) * sum_uv ||x_uv - c||^alpha        (colour vector per pixel)
    R_tv(x)    = 1 / (H W V^beta)  * sum_uv (sum_k dx_uvk^2 + dy_uvk^2)^(beta / 2)

with the paper's normalisations: the representation loss by ||Phi0||^2, the alpha-norm by the
typical pixel norm B (their B = 80 for mean-subtracted 8-bit images, here 80 / 255 on the [0, 1]
scale, around the centre c = mean or 0.5), the TV term by V = B / 6.5 (their typical gradient of
natural images), so that a natural image scores about 1 on each regulariser and the lambdas are
comparable across image sizes and layers.

Optimisation follows the paper: momentum 0.9 and a learning rate that is held for the first part
and then decreased (here: constant for half of the steps, then geometrically down to lr / 100).
Deviation, for a learning rate that works across networks and image sizes: each image's gradient
is divided by its root-mean-square before the momentum update (the paper tunes the rate per
layer instead). Pixels are kept in [0, 1] (the alpha-norm alone only discourages leaving it).

The weights (`views.inversion`; the defaults are the config schema's): lambda_alpha = 1e-4 at
every depth (with the [0, 1] clamp, the alpha-norm only has to keep colours from saturating; the
paper keeps its alpha weight fixed too) and lambda_tv by the layer's relative depth in the
paper's three bands of AlexNet (layers 1-6 / 7-12 / 13-20 of 20), growing with depth as the
paper's do: 0.001 / 0.005 / 0.025 in this normalised objective (paper_lambda_tv), with the
relative depth = the position of the layer's last module among the modules a forward pass
runs, over their number (relative_depth). These values were calibrated on the normalised
objective so that the reconstruction stays well below the unrelated-image baseline at every
depth (measured on synthnet, trained and random, at 64 px, and on a random VGG-11 at 32 and
64 px: at most 0.2 of the baseline up to mid-depth); with weights ten times larger
(0.012 / 0.12 / 1.2) the mid-depth and deep reconstructions of a random VGG-11 at 32 px are
about as far from their target as an unrelated image.

The unrelated-image baseline (unrelated_baseline): for a target x0, the mean over other dataset
images x_j of ||Phi(x_j) - Phi0||^2 / ||Phi0||^2, the error (in the units of `error`) that an
image with nothing to do with x0 has; BASELINE_FORMULA.

- relative_depth(model, layer, images): in (0, 1], where the layer sits in the forward pass.
- paper_lambda_tv(depth): the TV weight at that relative depth (the paper's bands).
- representation_spread(model, layer, images): the mean over all n^2 ordered pairs (i, j),
  diagonal included, of ||Phi(x_i) - Phi(x_j)||^2, the normaliser of the paper's reference code:
  NORMALIZED_ERROR_FORMULA.
- layer_representation(model, layer, images): the layer's output (detached), in batches.
- unrelated_baseline(phi0, phi_others, exclude): per target, the mean relative error of the
  other images' representations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.progress import Progress
from cnnvis_pipeline.viz._common import (
    check_images,
    check_mean_std,
    frozen_eval,
    layer_forward,
    preprocess,
)

TYPICAL_PIXEL_NORM = 80.0 / 255.0  # the paper's B on the [0, 1] scale
TV_RATIO = 6.5  # V = B / 6.5
# The TV weight by the paper's depth bands of AlexNet (20 layers): (last layer of the band,
# weight) in the normalised objective.
PAPER_TV_BANDS = ((6, 0.001), (12, 0.005), (20, 0.025))
NORMALIZED_ERROR_FORMULA = (
    "||Phi(x*) - Phi(x0)||^2 / ((1/n^2) sum_{i,j=1..n} ||Phi(x_i) - Phi(x_j)||^2), "
    "x_1..x_n = the spread images, all n^2 ordered pairs (diagonal included)"
)


def relative_depth(model: nn.Module, layer: str, images: torch.Tensor, *,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   model_name: str = "model") -> float:
    """Where `layer` sits in a forward pass of `model`, in (0, 1].

    The leaf modules (modules without children) that a full forward pass on the first image runs
    are counted in the order they finish, every call counted; the layer's position is that of
    the last leaf call inside it (the layer's own call for a leaf), over the number of calls.
    """
    from cnnvis_pipeline.models.hooks import find_module

    images = check_images(images)[:1]
    target = find_module(model, layer, model_name=model_name)
    inside = {id(m) for m in target.modules()}
    leaves = [m for m in model.modules() if not list(m.children())]
    order: list[bool] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: order.append(id(mod) in inside))
               for m in leaves]
    try:
        with frozen_eval(model), torch.no_grad():
            model(preprocess(images, mean, std))
    finally:
        for h in handles:
            h.remove()
    hits = [k for k, own in enumerate(order) if own]
    if not hits:
        raise CnnvisError(f"{model_name}: layer {layer!r} was not used in the forward pass")
    return (hits[-1] + 1) / len(order)


def paper_lambda_tv(depth: float) -> float:
    """The TV weight for a layer at relative depth `depth`, by the paper's bands of AlexNet's 20
    layers (PAPER_TV_BANDS)."""
    position = max(1, math.ceil(float(depth) * 20 - 1e-9))
    for last, weight in PAPER_TV_BANDS:
        if position <= last:
            return weight
    return PAPER_TV_BANDS[-1][1]


def layer_representation(model: nn.Module, layer: str, images: torch.Tensor, *,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         batch_size: int | None = None, model_name: str = "model",
                         layouts: dict | None = None) -> torch.Tensor:
    """The (detached) output of `layer` for `images` [N, 3, H, W], computed in batches of
    `batch_size` (None: one batch)."""
    images = check_images(images)
    check_mean_std(mean, std)
    outs = []
    with frozen_eval(model), torch.no_grad():
        step = max(1, batch_size or images.shape[0])
        for start in range(0, images.shape[0], step):
            x = preprocess(images[start:start + step], mean, std)
            outs.append(layer_forward(model, layer, x, model_name=model_name,
                                      layouts=layouts).detach().clone())
    return torch.cat(outs)


def representation_spread(model: nn.Module, layer: str, images: torch.Tensor, *,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          batch_size: int | None = None, model_name: str = "model",
                          layouts: dict | None = None) -> float:
    """(1 / n^2) sum_{i, j} ||Phi(x_i) - Phi(x_j)||^2 over all n^2 ordered pairs of `images`.

    As the paper's reference code computes its normaliser: the mean of the full matrix of
    squared distances, its zero diagonal included. A reconstruction error well below the spread
    means the reconstruction is nearer its own target than other images are
    (NORMALIZED_ERROR_FORMULA).
    """
    phi = layer_representation(model, layer, images, mean=mean, std=std, batch_size=batch_size,
                               model_name=model_name, layouts=layouts).flatten(1).double()
    n = phi.shape[0]
    if n < 2:
        raise CnnvisError("representation_spread needs at least 2 images")
    centred = phi - phi.mean(dim=0, keepdim=True)
    # sum_{i,j} ||p_i - p_j||^2 = 2 n sum_i ||p_i - mean||^2, averaged over the n^2 pairs.
    return float(2.0 * centred.pow(2).sum(dim=1).sum() / n)


BASELINE_FORMULA = (
    "mean over the other images x_j of ||Phi(x_j) - Phi(x0)||^2 / ||Phi(x0)||^2"
)


def unrelated_baseline(phi0: torch.Tensor, phi_others: torch.Tensor,
                       exclude: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Per target k: the mean over the rows j of phi_others (not in exclude[k]) of
    ||phi_others[j] - phi0[k]||^2 / ||phi0[k]||^2 (float64, NaN when no row is left).

    phi0 [N, ...], phi_others [M, ...]: representations (layer outputs); exclude[k]: the rows of
    phi_others that are the target itself (or its duplicates)."""
    a = phi0.flatten(1).double()
    a2 = a.pow(2).sum(1)
    # ||b_j - a_k||^2 = ||a_k||^2 + ||b_j||^2 - 2 a_k . b_j, in float64, 16 rows of b at a time
    d2 = torch.cat([(a2[:, None] + part.pow(2).sum(1)[None] - 2.0 * a @ part.T).clamp(min=0)
                    for part in (c.double() for c in phi_others.flatten(1).split(16))], dim=1)
    keep = torch.ones_like(d2, dtype=torch.bool)
    for k, rows in enumerate(exclude or []):
        keep[k, list(rows)] = False
    mean = (d2 * keep).sum(1) / keep.sum(1)
    return mean / a2.clamp(min=1e-300)


def _relative_error(phi: torch.Tensor, phi0: torch.Tensor) -> torch.Tensor:
    n = phi.shape[0]
    num = (phi - phi0).reshape(n, -1).pow(2).sum(dim=1)
    den = phi0.reshape(n, -1).pow(2).sum(dim=1).clamp(min=1e-12)
    return num / den


def alpha_norm(x: torch.Tensor, centre: torch.Tensor, alpha: float, bound: float) -> torch.Tensor:
    """Per image: mean over pixels of (||x_uv - centre|| / bound)^alpha."""
    norm2 = (x - centre).pow(2).sum(dim=1)  # [N, H, W]
    return (norm2 / bound**2).pow(alpha / 2.0).mean(dim=(1, 2))


def tv_norm(x: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """Per image: mean over pixels of ((|dx|^2 + |dy|^2) / scale^2)^(beta / 2), zero at edges."""
    dx = torch.zeros_like(x)
    dy = torch.zeros_like(x)
    dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    g2 = (dx.pow(2) + dy.pow(2)).sum(dim=1) / scale**2
    if beta == 2:
        return g2.mean(dim=(1, 2))
    # The small offset keeps the gradient finite where the image is flat and beta < 2.
    return (g2 + 1e-8).pow(beta / 2.0).mean(dim=(1, 2))


def _lr_at(step: int, steps: int, lr: float) -> float:
    hold = steps // 2
    if step < hold:
        return lr
    frac = (step - hold) / max(1, steps - 1 - hold)
    return lr * (0.01**frac)


def invert(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    *,
    steps: int,
    seed: int,
    lr: float,
    lambda_alpha: float,
    lambda_tv: float | None,
    momentum: float = 0.9,
    alpha: float = 6.0,
    beta: float = 2.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_name: str = "model",
    layouts: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct each image from the whole representation of `layer`.

    images: [N, 3, H, W] in [0, 1], fed to the model as they are (or normalised with mean/std).
    Returns (reconstructions [N, 3, H, W] in [0, 1], errors [N]) on the images' device, with
    errors[i] = ||Phi(x*_i) - Phi0_i||^2 / ||Phi0_i||^2 for the returned reconstruction.
    All images are optimised together as one batch; their objectives are independent.
    steps, seed, lr, lambda_alpha, lambda_tv: the `views.inversion` settings
    (settings.Inversion). lambda_tv None: the paper's weight for the layer's relative depth
    (paper_lambda_tv(relative_depth(...))).
    """
    images = check_images(images)
    check_mean_std(mean, std)
    if steps < 0:
        raise CnnvisError(f"steps must be >= 0, not {steps}")
    if alpha <= 0 or beta <= 0:
        raise CnnvisError(f"alpha and beta must be positive, not {alpha} and {beta}")
    dev = images.device
    n = images.shape[0]
    if lambda_tv is None:
        lambda_tv = paper_lambda_tv(relative_depth(model, layer, images, mean=mean, std=std,
                                                   model_name=model_name))
    gen = torch.Generator().manual_seed(int(seed))
    centre = (torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).to(dev)
              if mean is not None else torch.full((1, 1, 1, 1), 0.5, device=dev))
    bound, tv_scale = TYPICAL_PIXEL_NORM, TYPICAL_PIXEL_NORM / TV_RATIO

    with frozen_eval(model):
        with torch.no_grad():
            phi0 = layer_forward(model, layer, preprocess(images, mean, std),
                                 model_name=model_name, layouts=layouts).detach().clone()
        if not bool((phi0.reshape(n, -1).abs().amax(dim=1) > 0).all()):
            raise CnnvisError(
                f"{model_name}: layer {layer!r} is all zeros for some image; nothing to invert"
            )
        noise = torch.randn(images.shape, generator=gen).to(dev)
        x = (centre + 0.05 * noise).clamp(0.0, 1.0).requires_grad_(True)
        velocity = torch.zeros_like(x)
        lines = Progress(f"inversion of {n} images", steps, "steps")  # the job's log
        for step in range(steps):
            lines.update()
            phi = layer_forward(model, layer, preprocess(x, mean, std), model_name=model_name,
                                layouts=layouts)
            energy = (_relative_error(phi, phi0)
                      + lambda_alpha * alpha_norm(x, centre, alpha, bound)
                      + lambda_tv * tv_norm(x, beta, tv_scale))
            (grad,) = torch.autograd.grad(energy.sum(), x)
            with torch.no_grad():
                rms = grad.reshape(n, -1).pow(2).mean(dim=1).sqrt().clamp(min=1e-20)
                velocity.mul_(momentum).sub_(_lr_at(step, steps, lr) * grad / rms.view(n, 1, 1, 1))
                x.add_(velocity).clamp_(0.0, 1.0)
        lines.close()

        with torch.no_grad():
            recon = x.detach().clone()
            phi = layer_forward(model, layer, preprocess(recon, mean, std), model_name=model_name,
                                layouts=layouts)
            errors = _relative_error(phi, phi0)
    return recon, errors
