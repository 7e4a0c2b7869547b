"""Activation maximisation of every unit of a layer (Olah, Mordvintsev & Schubert 2017).

activation_maximization(model, layer, units, ...) -> (images [N, 3, size, size] in [0, 1],
activations [N]). One batch element per unit; all units are optimised together.

Per step: Fourier-parameterised, colour-decorrelated, sigmoid image (param.FourierImage) ->
random pad/jitter/scale/rotate (transform.random_affine) -> optional bilinear resize to
`input_size` -> optional (x - mean) / std -> model up to `layer` -> loss = -sum_i mean_hw
A[i, unit_i] -> Adam. During the first `redirect_steps` steps the nn.ReLU modules use Lucid's
redirected gradient (relu.relu_backward_override), so units that are silent on a grey image still
get a gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
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


def default_redirect_steps(steps: int) -> int:
    """The redirected ReLU gradient is used for the first 10% of the steps, at least 16."""
    return min(steps, max(16, steps // 10))


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
    model_name: str = "model",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that maximise the mean activation of each unit (channel) of `layer`.

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
    h, w = size_pair(size, "size")
    in_hw = size_pair(input_size, "input_size") if input_size is not None else None
    dev = model_device(model, device)
    redirect = default_redirect_steps(steps) if redirect_steps is None else int(redirect_steps)
    gen = torch.Generator().manual_seed(int(seed))

    def to_model(x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        if hw is not None and tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
        return preprocess(x, mean, std)

    with frozen_eval(model):
        with torch.no_grad():
            grey = torch.full((1, 3, h, w), 0.5, device=dev)
            channels = layer_forward(model, layer, to_model(grey, in_hw),
                                     model_name=model_name).shape[1]
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

        for step in range(steps):
            override = (relu_backward_override(model, "redirected") if step < redirect
                        else contextlib.nullcontext())
            with override:
                x = random_affine(image(), gen, pad=PAD, jitter=JITTER)
                act = layer_forward(model, layer, to_model(x, canvas_hw), model_name=model_name)
                objective = act[rows, unit_idx].mean(dim=(1, 2))
                opt.zero_grad(set_to_none=True)
                (-objective.sum()).backward()
            opt.step()

        with torch.no_grad():
            final = image()
            act = layer_forward(model, layer, to_model(final, in_hw), model_name=model_name)
            activations = act[rows, unit_idx].mean(dim=(1, 2))
    return final.detach().cpu(), activations.detach().cpu()
