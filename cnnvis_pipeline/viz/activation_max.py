"""Activation maximisation of every unit of a layer (Olah, Mordvintsev & Schubert 2017).

activation_maximization(model, layer, units, ...) -> (images [N, 3, size, size] in [0, 1],
activations [N]). One batch element per unit; all units are optimised together.

A recipe is built from composable parts: an objective (viz.objectives: `channel`, `channel_max`,
... combined with + - * /), a list of transforms (viz.transform: pad, jitter, random_scale,
random_rotate) and a parameterisation (viz.param: fourier, pixel). The presets are such recipes.

Two presets (PRESETS), so that a benchmark can show both side by side:

- "lucid": Lucid/Lucent's channel objective, faithfully. Per step: Fourier-parameterised,
  colour-decorrelated, sigmoid image (param.FourierImage) -> random pad/jitter/scale/rotate
  (transform.STANDARD) -> optional bilinear resize to `input_size` -> optional
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
  maximum over the map of an untransformed image at the dataset's input size. A third shows on
  units whose optimum is known (a 1x1 convolution on the image, ReLU, average pooling: a uniform
  saturated frame): (3) where the unit is silent the image gets no gradient, so a region the
  first steps left on the wrong side stays there, and a saturated colour needs large logits
  that the Fourier coefficients reach slowly. The default therefore (a) optimises mean + max
  over the map (the max is the dataset's statistic), (b)
  keeps the redirected ReLU gradient on throughout (it only acts for a unit whose ordinary
  gradient is zero everywhere, so it cannot disturb an active unit) and, at the layer's own
  nn.ReLU, per position (where the unit's map is silent, the gradient that raises it passes, so
  the whole image is pulled towards the stimulus), (c) spends the last
  `polish_steps` steps on the pixels directly, with the image fed untransformed at
  `input_size`, exactly as it is measured, in two candidates from the first phase's image
  (viz.polish), each over the polish steps: `refine_images` (sigmoid logits, Adam at
  `polish_lr`) and `polish_images` (a low-contrast power iteration in a window opening from the
  centre, then growth to full contrast). The second answers a fourth
  shortfall, shown by oriented-edge units under average pooling (optimum: one grating over the
  whole image): (4) ascent from the first phase's image leaves patches of different phase and
  orientation whose seams are a local optimum (0.73-0.83 of the best grating); the nucleated
  grating is coherent (0.99-1.01), (d) returns, per unit, the best of the first phase's image
  and the candidates by that measurement, and (e) adds to the sigmoid's logits a free per-image
  RGB offset, in the first phase and in both candidates (param.fourier_colour,
  pixel(colour_offset=...)): it moves every pixel, silent ones included, and reaches a
  saturated colour in a few dozen Adam steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import find_module
from cnnvis_pipeline.progress import Progress
from cnnvis_pipeline.viz._common import (
    check_mean_std,
    frozen_eval,
    layer_forward,
    model_device,
    preprocess,
    size_pair,
)
from cnnvis_pipeline.viz.objectives import Objective, channel, channel_max, per_image
from cnnvis_pipeline.viz.param import fourier, fourier_colour
from cnnvis_pipeline.viz.polish import Polish, polish_images, refine_images
from cnnvis_pipeline.viz.relu import relu_backward_override
from cnnvis_pipeline.viz.transform import STANDARD, Transform, apply


def mean_objective(units: Sequence[int]) -> Objective:
    """Lucid's channel objective, image i for unit i: sum_i mean of A[i, unit_i]."""
    return per_image(channel, units)


def mean_max_objective(units: Sequence[int]) -> Objective:
    """The mean and the maximum of each image's unit map (the maximum is the dataset's statistic)."""
    return per_image(channel, units) + per_image(channel_max, units)


OBJECTIVES: dict[str, Callable[[Sequence[int]], Objective]] = {
    "mean": mean_objective, "mean+max": mean_max_objective}
PARAMETERIZATIONS: dict[str, Callable] = {"fourier": fourier, "fourier_colour": fourier_colour}


def default_redirect_steps(steps: int) -> int:
    """Lucid: the redirected ReLU gradient is used for the first 10% of the steps, at least 16."""
    return min(steps, max(16, steps // 10))


def default_polish_steps(steps: int) -> int:
    """The default preset polishes the pixels for the last third of the steps, at most 64."""
    return min(steps // 3, 64)


def _all_steps(steps: int) -> int:
    return steps


def _no_steps(_steps: int) -> int:
    return 0


@dataclass(frozen=True)
class Recipe:
    """How activation maximisation runs: objective(units) -> Objective, the transforms of each
    step, the parameterisation (fourier-like: (n, size, generator=, device=) -> (params,
    image_f)), how many first steps use the redirected ReLU gradient and how many last steps
    polish the pixels (functions of `steps`), and how the polish runs (viz.polish.Polish)."""

    objective: Callable[[Sequence[int]], Objective]
    transforms: tuple[Transform, ...]
    parameterization: Callable
    redirect_steps: Callable[[int], int]
    polish_steps: Callable[[int], int]
    per_position: bool  # the layer's own nn.ReLU redirects per position
    polish: Polish = Polish()


PRESETS: dict[str, Recipe] = {
    # Lucid/Lucent: channel objective (mean over the map), redirect for max(16, 10%) steps.
    "lucid": Recipe(mean_objective, STANDARD, fourier, default_redirect_steps, _no_steps,
                    per_position=False),
    # Mean + max objective, a colour offset on the Fourier image, redirect throughout (per
    # position at the layer's own ReLU), pixel polish (viz.polish) for the last third (at most
    # 64).
    "default": Recipe(mean_max_objective, STANDARD, fourier_colour, _all_steps,
                      default_polish_steps, per_position=True),
}


def _named(kind: str, table: dict, value):
    """value, or table[value] when it is a name (CnnvisError for an unknown name)."""
    if not isinstance(value, str):
        return value
    if value not in table:
        raise CnnvisError(f"activation maximisation: unknown {kind} {value!r} "
                          f"(one of {', '.join(table)})")
    return table[value]


def _recipe(preset: str, objective, polish_steps, polish_lr, redirect_steps,
            parameterization=None) -> Recipe:
    """The preset with the caller's overrides."""
    r = _named("preset", PRESETS, preset)
    objective = _named("objective", OBJECTIVES, objective)
    parameterization = _named("parameterization", PARAMETERIZATIONS, parameterization)
    return Recipe(objective or r.objective, r.transforms,
                  parameterization or r.parameterization,
                  r.redirect_steps if redirect_steps is None else (lambda _s: int(redirect_steps)),
                  r.polish_steps if polish_steps is None else (lambda _s: int(polish_steps)),
                  r.per_position,
                  r.polish if polish_lr is None else replace(r.polish, refine_lr=float(polish_lr)))


class _Layer:
    """The model up to `layer`, fed [0, 1] images resized to a size and normalised."""

    def __init__(self, model, layer, model_name, layouts, mean, std, input_hw):
        self.model, self.layer, self.model_name, self.layouts = model, layer, model_name, layouts
        self.mean, self.std, self.input_hw = mean, std, input_hw

    def __call__(self, x: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
        if hw is not None and tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
        return layer_forward(self.model, self.layer, preprocess(x, self.mean, self.std),
                             model_name=self.model_name, layouts=self.layouts)

    def canvas(self, x: torch.Tensor, h: int, w: int) -> tuple[int, int] | None:
        """A transformed canvas at the scale of the input size (None: fed as it is)."""
        if self.input_hw is None:
            return None
        ch, cw = x.shape[-2:]
        return (max(1, round(ch * self.input_hw[0] / h)), max(1, round(cw * self.input_hw[1] / w)))

    @torch.no_grad()
    def measured(self, img: torch.Tensor, units: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(max, mean) of each unit's map on its untransformed image at input_size."""
        rows = torch.arange(len(units), device=img.device)
        a = self(img, self.input_hw)[rows, torch.tensor(units, device=img.device)]
        return a.amax(dim=(1, 2)), a.mean(dim=(1, 2))

    @torch.no_grad()
    def check_units(self, units, h: int, w: int, dev) -> list[int]:
        channels = self(torch.full((1, 3, h, w), 0.5, device=dev), self.input_hw).shape[1]
        unit_list = list(range(channels)) if units is None else [int(u) for u in units]
        bad = [u for u in unit_list if not 0 <= u < channels]
        if not unit_list or bad:
            raise CnnvisError(
                f"{self.model_name}: layer {self.layer!r} has units 0..{channels - 1}; "
                f"cannot visualise {bad if bad else 'an empty list of units'}"
            )
        return unit_list


def _redirect(model: nn.Module, layer_fn: _Layer, recipe: Recipe, redirect: int):
    """step -> the ReLU backward override of that step."""
    # The layer's own ReLU (when the layer is one) redirects per position in the default
    # preset: the silent parts of the unit's map are pulled up too, so the image fills with
    # the stimulus instead of showing it in a few patches.
    target = find_module(model, layer_fn.layer, model_name=layer_fn.model_name)
    own = ({target: "redirected_per_position"}
           if recipe.per_position and isinstance(target, nn.ReLU) else None)

    def override(step: int):
        return (relu_backward_override(model, "redirected", overrides=own) if step < redirect
                else contextlib.nullcontext())
    return override


def _ascend(params, image_f, objective: Objective, lr: float, steps: range, override,
            forward) -> None:
    """Adam on `params` for `steps`, maximising objective(forward(image_f()))."""
    opt = torch.optim.Adam(params, lr=lr)
    lines = Progress("activation maximisation", len(steps), "steps")  # the job's log
    for step in steps:
        with override(step):
            loss = -objective(forward(image_f()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        lines.update()
    lines.close()


def activation_maximization(
    model: nn.Module,
    layer: str,
    units: Sequence[int] | None = None,
    *,
    steps: int,
    size: int,
    seed: int,
    lr: float,
    preset: str,
    device=None,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    redirect_steps: int | None = None,
    objective: str | Callable[[Sequence[int]], Objective] | None = None,
    polish_steps: int | None = None,
    polish_lr: float | None = None,
    parameterization: str | Callable | None = None,
    model_name: str = "model",
    layouts: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images that maximise the activation of each unit (channel) of `layer`.

    steps, size, seed, lr, preset: the `views.activation_max` settings (settings.ActivationMax;
    defaults in the config schema). preset: "default" or "lucid" (see the module docstring);
    `objective` (a name of OBJECTIVES,
    or units -> Objective), `redirect_steps` (how many of the first steps use the redirected
    ReLU gradient), `polish_steps` (how many of the `steps` are pixel polish), `polish_lr` and
    `parameterization` (a name of PARAMETERIZATIONS, or a function like them) override the
    preset's values. `layouts`: the model's {layer: layout} (models.hooks).

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
    recipe = _recipe(preset, objective, polish_steps, polish_lr, redirect_steps,
                     parameterization)
    n_polish = recipe.polish_steps(steps)
    if not 0 <= n_polish <= steps:
        raise CnnvisError(f"polish_steps must be in 0..steps ({steps}), not {n_polish}")
    h, w = size_pair(size, "size")
    in_hw = size_pair(input_size, "input_size") if input_size is not None else None
    dev = model_device(model, device)
    gen = torch.Generator().manual_seed(int(seed))
    fwd = _Layer(model, layer, model_name, layouts, mean, std, in_hw)

    with frozen_eval(model):
        unit_list = fwd.check_units(units, h, w, dev)
        obj = recipe.objective(unit_list)
        override = _redirect(model, fwd, recipe, recipe.redirect_steps(steps))
        params, image_f = recipe.parameterization(len(unit_list), (h, w), generator=gen,
                                                  device=dev)

        def transformed(img: torch.Tensor) -> torch.Tensor:
            x = apply(recipe.transforms, img, gen)
            return fwd(x, fwd.canvas(x, h, w))

        _ascend(params, image_f, obj, lr, range(steps - n_polish), override, transformed)
        with torch.no_grad():
            final = image_f().detach()
        if n_polish:
            final = _polish(fwd, final, unit_list, obj, recipe,
                            range(steps - n_polish, steps), override)
        _, activations = fwd.measured(final, unit_list)
    return final.cpu(), activations.cpu()


def _polish(fwd: _Layer, start: torch.Tensor, units: list[int], objective: Objective,
            recipe: Recipe, steps: range, override) -> torch.Tensor:
    """The polish (viz.polish: two candidates on the pixels, each fed untransformed as
    measured); per unit the best image of the start and the candidates by that measurement: a
    candidate replaces the best so far when its max + mean is not lower and its max is not lower
    beyond float rounding (1e-4 relative)."""

    def backward(images: torch.Tensor, step: int) -> None:
        with override(step):
            (-objective(fwd(images, fwd.input_hw))).backward()

    best = start
    best_max, best_mean = fwd.measured(start, units)
    for candidate in (refine_images, polish_images):
        images = candidate(start, backward, steps, recipe.polish)
        new_max, new_mean = fwd.measured(images, units)
        keep = ((new_max + new_mean >= best_max + best_mean)
                & (new_max >= best_max - 1e-4 * best_max.abs()))
        best = torch.where(keep.view(len(units), 1, 1, 1), images, best)
        best_max = torch.where(keep, new_max, best_max)
        best_mean = torch.where(keep, new_mean, best_mean)
    return best
