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

Default weights: lambda_alpha = 1e-4 (with the [0, 1] clamp, the alpha-norm only has to keep
colours from saturating), lambda_tv = 1e-2 (the data term dominates at early and middle layers);
raise lambda_tv (0.1 .. 1) for deep layers, whose representation constrains the image less.

- representation_spread(model, layer, images): mean pairwise squared distance of the images'
  representations, for reporting the error normalised the way the paper does.
- layer_representation(model, layer, images): the layer's output (detached), in batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.viz._common import (
    check_images,
    check_mean_std,
    frozen_eval,
    layer_forward,
    preprocess,
)

TYPICAL_PIXEL_NORM = 80.0 / 255.0  # the paper's B on the [0, 1] scale
TV_RATIO = 6.5  # V = B / 6.5


def layer_representation(model: nn.Module, layer: str, images: torch.Tensor, *,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         batch_size: int = 64, model_name: str = "model") -> torch.Tensor:
    """The (detached) output of `layer` for `images` [N, 3, H, W], computed in batches."""
    images = check_images(images)
    check_mean_std(mean, std)
    outs = []
    with frozen_eval(model), torch.no_grad():
        for start in range(0, images.shape[0], max(1, batch_size)):
            x = preprocess(images[start:start + batch_size], mean, std)
            outs.append(layer_forward(model, layer, x, model_name=model_name).detach().clone())
    return torch.cat(outs)


def representation_spread(model: nn.Module, layer: str, images: torch.Tensor, *,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          batch_size: int = 64, model_name: str = "model") -> float:
    """Mean squared distance ||Phi(x_i) - Phi(x_j)||^2 over all pairs i != j of `images`.

    The paper reports ||Phi(x*) - Phi0|| normalised by this kind of typical distance between the
    representations of different images: a reconstruction error well below the spread means the
    reconstruction is nearer its own target than other images are.
    """
    phi = layer_representation(model, layer, images, mean=mean, std=std, batch_size=batch_size,
                               model_name=model_name).flatten(1).double()
    n = phi.shape[0]
    if n < 2:
        raise CnnvisError("representation_spread needs at least 2 images")
    centred = phi - phi.mean(dim=0, keepdim=True)
    # sum_{i,j} ||p_i - p_j||^2 = 2 n sum_i ||p_i - mean||^2, averaged over the n (n - 1) pairs.
    return float(2.0 * centred.pow(2).sum(dim=1).sum() / (n - 1))


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
    steps: int = 300,
    seed: int = 0,
    lr: float = 0.01,
    momentum: float = 0.9,
    alpha: float = 6.0,
    beta: float = 2.0,
    lambda_alpha: float = 1e-4,
    lambda_tv: float = 1e-2,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_name: str = "model",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct each image from the whole representation of `layer`.

    images: [N, 3, H, W] in [0, 1], fed to the model as they are (or normalised with mean/std).
    Returns (reconstructions [N, 3, H, W] in [0, 1], errors [N]) on the images' device, with
    errors[i] = ||Phi(x*_i) - Phi0_i||^2 / ||Phi0_i||^2 for the returned reconstruction.
    All images are optimised together as one batch; their objectives are independent.
    """
    images = check_images(images)
    check_mean_std(mean, std)
    if steps < 0:
        raise CnnvisError(f"steps must be >= 0, not {steps}")
    if alpha <= 0 or beta <= 0:
        raise CnnvisError(f"alpha and beta must be positive, not {alpha} and {beta}")
    dev = images.device
    n = images.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    centre = (torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1).to(dev)
              if mean is not None else torch.full((1, 1, 1, 1), 0.5, device=dev))
    bound, tv_scale = TYPICAL_PIXEL_NORM, TYPICAL_PIXEL_NORM / TV_RATIO

    with frozen_eval(model):
        with torch.no_grad():
            phi0 = layer_forward(model, layer, preprocess(images, mean, std),
                                 model_name=model_name).detach().clone()
        if not bool((phi0.reshape(n, -1).abs().amax(dim=1) > 0).all()):
            raise CnnvisError(
                f"{model_name}: layer {layer!r} is all zeros for some image; nothing to invert"
            )
        noise = torch.randn(images.shape, generator=gen).to(dev)
        x = (centre + 0.05 * noise).clamp(0.0, 1.0).requires_grad_(True)
        velocity = torch.zeros_like(x)
        for step in range(steps):
            phi = layer_forward(model, layer, preprocess(x, mean, std), model_name=model_name)
            energy = (_relative_error(phi, phi0)
                      + lambda_alpha * alpha_norm(x, centre, alpha, bound)
                      + lambda_tv * tv_norm(x, beta, tv_scale))
            (grad,) = torch.autograd.grad(energy.sum(), x)
            with torch.no_grad():
                rms = grad.reshape(n, -1).pow(2).mean(dim=1).sqrt().clamp(min=1e-20)
                velocity.mul_(momentum).sub_(_lr_at(step, steps, lr) * grad / rms.view(n, 1, 1, 1))
                x.add_(velocity).clamp_(0.0, 1.0)

        with torch.no_grad():
            recon = x.detach().clone()
            phi = layer_forward(model, layer, preprocess(recon, mean, std), model_name=model_name)
            errors = _relative_error(phi, phi0)
    return recon, errors
