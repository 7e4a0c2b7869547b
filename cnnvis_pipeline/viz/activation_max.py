"""Activation maximisation of every unit of a layer (Olah, Mordvintsev & Schubert 2017).

activation_maximization(model, layer, units, ...) -> (images [N, 3, size, size] in [0, 1],
activations [N]). One batch element per unit; all units are optimised together.

Two presets (PRESETS), so that a benchmark can show both side by side:

- "lucid": Lucid/Lucent's channel objective, faithfully. Per step: Fourier-parameterised,
  colour-decorrelated, sigmoid image (param.FourierImage) -> random pad/jitter/scale/rotate
  (transform.random_affine) -> optional bilinear resize to `input_size` -> optional
  (x - mean) / std -> model up to `layer` -> loss = -sum_i mean_hw A[i, unit_i] -> Adam. During
  the first max(16, 10%) steps the nn.ReLU modules use Lucid's redirected gradient
  (relu.relu_backward_override), so units that are silent on a grey image still get a gradient.
- "default": the same first phase, then a polish, so that the image reaches the unit's best
  natural stimulus. Measured on a hand-planted colour detector and the demo's synthnet, the
  Lucid settings fall short for two reasons: (1) Adam takes per-coordinate steps in the
  decorrelated Fourier space, where the chromatic directions are scaled down 3.6x and 7.5x
  relative to luminance (param.COLOR_CORRELATION_SQRT, normalised) and the mean colour is a single
  coefficient among thousands, so the image's colour moves slowly; (2) the mean over the map is
  optimised on jittered, padded, rotated images, while the best natural image is judged by the
  maximum over the map of an untransformed image at the dataset's input size. The default
  therefore (a) optimises mean + max over the map (the max is the dataset's statistic), (b)
  keeps the redirected ReLU gradient on throughout (it only acts for a unit whose ordinary
  gradient is zero everywhere, so it cannot disturb an active unit) and, at the layer's own
  nn.ReLU, per position (where the unit's map is silent, the gradient that raises it passes, so
  the whole image is pulled towards the stimulus), (c) spends the last
  `polish_steps` steps on the pixels directly (sigmoid logits, Adam at `polish_lr`), with the
  image fed untransformed at `input_size`, exactly as it is measured, and (d) returns, per
  unit, the better of the images before and after the polish by that measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import find_module
from cnnvis_pipeline.viz._common import (
    check_mean_std,
    frozen_eval,
    layer_forward,
    model_device,
    preprocess,
    size_pair,
)
from cnnvis_pipeline.viz.param import FourierImage
from cnnvis_pipeline.viz.relu import relu_backward_override
from cnnvis_pipeline.viz.transform import random_affine

PAD = 12
JITTER = 12  # Lucid's jitter(8) followed by jitter(4)

PRESETS: dict[str, dict] = {
    # Lucid/Lucent: channel objective (mean over the map), redirect for max(16, 10%) steps.
    "lucid": {"objective": "mean", "redirect": "lucid", "polish_steps": 0, "polish_lr": 0.2,
              "per_position": False},
    # Mean + max objective, redirect throughout (per position at the layer's own ReLU), pixel
    # polish for the last third (at most 64).
    "default": {"objective": "mean+max", "redirect": "always", "polish_steps": "auto",
                "polish_lr": 0.2, "per_position": True},
}
OBJECTIVES = ("mean", "mean+max")


def default_redirect_steps(steps: int) -> int:
    """Lucid: the redirected ReLU gradient is used for the first 10% of the steps, at least 16."""
    return min(steps, max(16, steps // 10))


def default_polish_steps(steps: int) -> int:
    """The default preset polishes the pixels for the last third of the steps, at most 64."""
    return min(steps // 3, 64)


def _objective(act: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mean":
        return act.mean(dim=(1, 2))
    return act.mean(dim=(1, 2)) + act.amax(dim=(1, 2))


def activation_maximization(
    model: nn.Module,
    layer: str,
    units: Sequence[int] | None = None,
    *,
    steps: int = 512,
    size: int = 128,
    seed: int = 0,
    device=None,
    lr: float = 0.05,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    redirect_steps: int | None = None,
    preset: str = "default",
    objective: str | None = None,
    polish_steps: int | None = None,
    polish_lr: float | None = None,
    model_name: str = "model",
    layouts: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that maximise the activation of each unit (channel) of `layer`.

    preset: "default" or "lucid" (see the module docstring); `objective` ("mean" or
    "mean+max" over the map), `redirect_steps` (how many of the first steps use the redirected
    ReLU gradient), `polish_steps` (how many of the `steps` are pixel polish) and `polish_lr`
    override the preset's values.

    units: channel indices (repeats allowed); None means every channel of the layer.
    Returns (images, activations) on the CPU: images [N, 3, size, size] in [0, 1], meant to be fed
    to `model` as they are (after the same resize/normalisation, if `input_size`/`mean`/`std`
    were given); activations[i] is the mean over the spatial map of unit i on its own final,
    untransformed image (normal ReLU gradients play no role there).
    The model is put in eval mode, its parameters frozen and its nn.ReLU modules hooked only for
    the duration of the call. Deterministic for a given seed on the CPU.
    """
    check_mean_std(mean, std)
    if steps < 0:
        raise CnnvisError(f"steps must be >= 0, not {steps}")
    if preset not in PRESETS:
        raise CnnvisError(f"activation maximisation: unknown preset {preset!r} "
                          f"(one of {', '.join(PRESETS)})")
    cfg = PRESETS[preset]
    objective = cfg["objective"] if objective is None else objective
    if objective not in OBJECTIVES:
        raise CnnvisError(f"activation maximisation: unknown objective {objective!r} "
                          f"(one of {', '.join(OBJECTIVES)})")
    if polish_steps is None:
        polish_steps = (default_polish_steps(steps) if cfg["polish_steps"] == "auto"
                        else cfg["polish_steps"])
    polish_steps = int(polish_steps)
    if not 0 <= polish_steps <= steps:
        raise CnnvisError(f"polish_steps must be in 0..steps ({steps}), not {polish_steps}")
    polish_lr = float(cfg["polish_lr"] if polish_lr is None else polish_lr)
    fourier_steps = steps - polish_steps
    if redirect_steps is None:
        redirect = (default_redirect_steps(steps) if cfg["redirect"] == "lucid" else steps)
    else:
        redirect = int(redirect_steps)
    h, w = size_pair(size, "size")
    in_hw = size_pair(input_size, "input_size") if input_size is not None else None
    dev = model_device(model, device)
    gen = torch.Generator().manual_seed(int(seed))

    def to_model(x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        if hw is not None and tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
        return preprocess(x, mean, std)

    with frozen_eval(model):
        with torch.no_grad():
            grey = torch.full((1, 3, h, w), 0.5, device=dev)
            channels = layer_forward(model, layer, to_model(grey, in_hw),
                                     model_name=model_name, layouts=layouts).shape[1]
        unit_list = list(range(channels)) if units is None else [int(u) for u in units]
        bad = [u for u in unit_list if not 0 <= u < channels]
        if not unit_list or bad:
            raise CnnvisError(
                f"{model_name}: layer {layer!r} has units 0..{channels - 1}; "
                f"cannot visualise {bad if bad else 'an empty list of units'}"
            )
        n = len(unit_list)
        unit_idx = torch.tensor(unit_list, device=dev)
        rows = torch.arange(n, device=dev)

        image = FourierImage(n, (h, w), generator=gen, device=dev)
        opt = torch.optim.Adam(image.parameters(), lr=lr)
        canvas_hw = None
        if in_hw is not None:
            ch, cw = h + 2 * PAD - JITTER, w + 2 * PAD - JITTER
            canvas_hw = (max(1, round(ch * in_hw[0] / h)), max(1, round(cw * in_hw[1] / w)))

        # The layer's own ReLU (when the layer is one) redirects per position in the default
        # preset: the silent parts of the unit's map are pulled up too, so the image fills with
        # the stimulus instead of showing it in a few patches.
        target = find_module(model, layer, model_name=model_name)
        own = ({target: "redirected_per_position"}
               if cfg["per_position"] and isinstance(target, nn.ReLU) else None)

        def override(step: int):
            return (relu_backward_override(model, "redirected", overrides=own) if step < redirect
                    else contextlib.nullcontext())

        def measured(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(max, mean) of each unit's map on its untransformed image at input_size."""
            with torch.no_grad():
                a = layer_forward(model, layer, to_model(img, in_hw),
                                  model_name=model_name, layouts=layouts)[rows, unit_idx]
            return a.amax(dim=(1, 2)), a.mean(dim=(1, 2))

        for step in range(fourier_steps):
            with override(step):
                x = random_affine(image(), gen, pad=PAD, jitter=JITTER)
                act = layer_forward(model, layer, to_model(x, canvas_hw), model_name=model_name,
                                    layouts=layouts)
                loss = -_objective(act[rows, unit_idx], objective).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()

        with torch.no_grad():
            final = image().detach()
        if polish_steps:
            before_max, _ = measured(final)
            # Pixel polish: sigmoid logits of the image, fed as it is measured.
            logits = torch.logit(final.clamp(1e-4, 1 - 1e-4)).requires_grad_(True)
            popt = torch.optim.Adam([logits], lr=polish_lr)
            for k in range(polish_steps):
                with override(fourier_steps + k):
                    act = layer_forward(model, layer, to_model(torch.sigmoid(logits), in_hw),
                                        model_name=model_name, layouts=layouts)
                    loss = -_objective(act[rows, unit_idx], objective).sum()
                    popt.zero_grad(set_to_none=True)
                    loss.backward()
                popt.step()
            with torch.no_grad():
                polished = torch.sigmoid(logits).detach()
            after_max, _ = measured(polished)
            keep = (after_max >= before_max).view(n, 1, 1, 1)
            final = torch.where(keep, polished, final)
        _, activations = measured(final)
    return final.cpu(), activations.cpu()
