"""The default preset's polish: the last steps of activation maximisation, on the pixels of the
untransformed image (sigmoid logits, plus a per-image RGB offset), as two candidates from the
first phase's image; activation_max keeps, per unit, the best by measurement.

refine_images(start, backward, steps, policy): Adam at `refine_lr` on the logits and the offset.
It keeps what the first phase found and sharpens it (what wins on trained models' units).

polish_images(start, backward, steps, policy), in three phases:

1. Nucleation (the first `nucleate` share of the steps): the logits are held at a low contrast
   (per-image RMS `contrast`) and replaced at every step by the loss's gradient with respect to
   them, normalised to that RMS (a power iteration). During the first `window` share of the
   steps the model sees the image only inside a centred disk (outside it, grey) whose radius
   opens from `start_radius` of the half-diagonal to the corners: the pattern forms in a small
   region, where one orientation and phase fit, and each step extends it by the reach of the
   unit's gradient. A unit whose optimum is a pattern over the whole map (an oriented filter
   under average pooling: a grating) thus gets one coherent pattern instead of the patches of
   different phase and orientation that ascent from a random or first-phase image leaves (their
   seams are stable: a local optimum).
2. Growth: the contrast is raised geometrically (each step adds `growth` x the current RMS along
   the normalised gradient) until the RMS reaches `saturation`.
3. Ascent: steps of `lr` along the per-image normalised gradient.

From the growth on, the offset moves too (Adam at `lr`, gain `colour_offset`): a unit without
spatial reach (a colour detector) would otherwise stay confined to the small disk it was born in.

`backward(images, step)` computes the loss (minus the objective, a scalar summed over the
images: each image's gradient is its own unit's) under the step's ReLU backward and
back-propagates it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cnnvis_pipeline.progress import Progress
from cnnvis_pipeline.viz.param import pixel


@dataclass(frozen=True)
class Polish:
    """How the polish runs (shares are of the polish's steps; see the module docstring)."""

    nucleate: float = 0.75
    window: float = 0.6
    start_radius: float = 0.05
    contrast: float = 0.1
    growth: float = 2.0
    saturation: float = 4.0
    lr: float = 0.3
    colour_offset: float = 1.0
    refine_lr: float = 0.2


def rms(t: torch.Tensor) -> torch.Tensor:
    """Per-image root mean square, shaped to broadcast against t [N, ...]."""
    return t.flatten(1).pow(2).mean(dim=1).sqrt().view(-1, *([1] * (t.dim() - 1)))


def _normalised(t: torch.Tensor) -> torch.Tensor:
    return t / rms(t).clamp_min(1e-30)


def disk(h: int, w: int, radius: float, *, device=None, soft: float = 1.0) -> torch.Tensor:
    """[h, w]: 1 inside a centred disk of `radius` pixels, exactly 0 outside, a linear edge `soft`
    pixels wide. Exactly 0: a pixel outside keeps logit 0 (grey), not a tiny value whose sign
    the ReLUs would amplify into a pattern of its own once the window reaches it."""
    yy = torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2
    xx = torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2
    r = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return ((radius - r) / soft + 0.5).clamp(0.0, 1.0)


def _windowed(policy: Polish, n: int, h: int, w: int, device) -> Callable[[int], torch.Tensor | None]:
    """i -> the window of polish step i (None once it is open)."""
    opening = int(policy.window * n)
    corner = math.hypot(h, w) / 2

    def window(i: int) -> torch.Tensor | None:
        if i >= opening:
            return None
        share = policy.start_radius + (1.0 - policy.start_radius) * i / opening
        return disk(h, w, share * corner, device=device)
    return window


def polish_images(start: torch.Tensor, backward: Callable[[torch.Tensor, int], None],
                  steps: range, policy: Polish) -> torch.Tensor:
    """The polished images (in [0, 1]) from `start` [N, 3, H, W] in [0, 1]."""
    n = len(steps)
    nucleate = int(policy.nucleate * n)
    window = _windowed(policy, n, start.shape[-2], start.shape[-1], start.device)
    logits = torch.logit(start.detach().clamp(1e-4, 1 - 1e-4))
    if nucleate:
        logits = _normalised(logits) * policy.contrast
    logits.requires_grad_(True)
    offset = torch.zeros(start.shape[0], start.shape[1], 1, 1, device=start.device,
                         requires_grad=True)
    colour = torch.optim.Adam([offset], lr=policy.lr)
    lines = Progress("activation maximisation (polish)", n, "steps")  # the job's log
    for i, step in enumerate(steps):
        image = torch.sigmoid(logits + policy.colour_offset * offset)
        mask = window(i)
        if mask is not None:
            image = 0.5 + (image - 0.5) * mask
        logits.grad = None
        offset.grad = None
        backward(image, step)
        with torch.no_grad():
            ascent = -_normalised(logits.grad)
            if i < nucleate:
                logits.copy_(ascent * policy.contrast)
            else:
                size = rms(logits)
                grow = (size < policy.saturation).to(size.dtype)
                logits.add_((grow * policy.growth * size + (1 - grow) * policy.lr) * ascent)
        if i >= nucleate and policy.colour_offset:
            colour.step()
        lines.update()
    lines.close()
    return torch.sigmoid(logits + policy.colour_offset * offset).detach()


def refine_images(start: torch.Tensor, backward: Callable[[torch.Tensor, int], None],
                  steps: range, policy: Polish) -> torch.Tensor:
    """Adam at `refine_lr` on the pixels' logits from `start` and a per-image colour offset
    (param.pixel, gain `colour_offset`): the refined images in [0, 1]."""
    params, image_f = pixel(start, colour_offset=policy.colour_offset)
    opt = torch.optim.Adam(params, lr=policy.refine_lr)
    lines = Progress("activation maximisation (refine)", len(steps), "steps")
    for step in steps:
        opt.zero_grad(set_to_none=True)
        backward(image_f(), step)
        opt.step()
        lines.update()
    lines.close()
    with torch.no_grad():
        return image_f().detach()
