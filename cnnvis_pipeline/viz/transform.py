"""Random geometric transforms applied at every optimisation step (transformation robustness).

Lucid's standard set is pad(12, grey), jitter(8), scale(0.9..1.1), rotate(-10..10 deg), jitter(4).
A transform here is a function of a `Geometry` (the output canvas and, per image, a scale, an
angle and a translation) and a random generator, returning the new Geometry: `pad(p)`,
`jitter(j)`, `random_scale(scales)`, `random_rotate(angles)`. `apply(transforms, images,
generator)` runs them in the list's order (the order of their random draws) and samples every
image once, with one bilinear `grid_sample` of the composed affine map: the grey padding is
implicit (the image is sampled with zeros outside after subtracting the fill), and two jitters
are one random integer translation with the same total range. Every image gets its own draw.

- STANDARD: pad(12), random_scale(SCALES), random_rotate(ANGLES), jitter(12) (Lucid's set with
  its two jitters merged).
- lucid_set(pad_px, jitter_px, scales, angles): that set with other sizes (the canvas is
  `size + 2 * pad_px - jitter_px` pixels wide; Lucid: 128 -> 152 -> 144 -> 140).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

SCALES = tuple(1.0 + (i - 5) / 50.0 for i in range(11))  # 0.90, 0.92, ..., 1.10
ANGLES = tuple(range(-10, 11))  # degrees


@dataclass(frozen=True)
class Geometry:
    """The affine sampling of a batch: output canvas (h, w); per image a scale, an angle in
    radians and a shift in input pixels (None: 1, 0, 0)."""

    out_h: int
    out_w: int
    scale: torch.Tensor | None = None
    angle: torch.Tensor | None = None
    shift: torch.Tensor | None = None


Transform = Callable[[Geometry, int, torch.Generator], Geometry]


def pad(pixels: int) -> Transform:
    """Grow the canvas by `pixels` of grey on every side."""
    def t(g: Geometry, _n: int, _gen: torch.Generator) -> Geometry:
        return replace(g, out_h=g.out_h + 2 * pixels, out_w=g.out_w + 2 * pixels)
    return t


def jitter(pixels: int) -> Transform:
    """A random integer translation in [-pixels // 2, pixels - pixels // 2], the canvas cropped
    by `pixels`."""
    def t(g: Geometry, n: int, gen: torch.Generator) -> Geometry:
        half = pixels // 2
        shift = torch.randint(-half, pixels - half + 1, (n, 2), generator=gen).float()
        if g.shift is not None:
            shift = g.shift + shift
        return replace(g, out_h=g.out_h - pixels, out_w=g.out_w - pixels, shift=shift)
    return t


def random_scale(scales: Sequence[float] = SCALES) -> Transform:
    def t(g: Geometry, n: int, gen: torch.Generator) -> Geometry:
        s = torch.tensor(scales, dtype=torch.float32)[torch.randint(len(scales), (n,),
                                                                    generator=gen)]
        return replace(g, scale=s if g.scale is None else g.scale * s)
    return t


def random_rotate(angles: Sequence[float] = ANGLES) -> Transform:
    """A random rotation, `angles` in degrees."""
    def t(g: Geometry, n: int, gen: torch.Generator) -> Geometry:
        idx = torch.randint(len(angles), (n,), generator=gen)
        a = torch.tensor(angles, dtype=torch.float32)[idx] * (math.pi / 180.0)
        return replace(g, angle=a if g.angle is None else g.angle + a)
    return t


def _theta(g: Geometry, n: int, h: int, w: int) -> torch.Tensor:
    s = g.scale if g.scale is not None else torch.ones(n)
    a = g.angle if g.angle is not None else torch.zeros(n)
    shift = g.shift if g.shift is not None else torch.zeros(n, 2)
    out_h, out_w = g.out_h, g.out_w
    cos, sin = torch.cos(a), torch.sin(a)
    # Output pixel p_out (centred, in pixels) samples the input at p_in = R(-a) p_out / s + shift.
    # affine_grid works in normalised coordinates: output spans [-1, 1] over out_w pixels and the
    # input spans [-1, 1] over w pixels, hence the out/in size ratios.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos / s * (out_w / w)
    theta[:, 0, 1] = sin / s * (out_h / w)
    theta[:, 1, 0] = -sin / s * (out_w / h)
    theta[:, 1, 1] = cos / s * (out_h / h)
    theta[:, 0, 2] = shift[:, 0] * 2.0 / w
    theta[:, 1, 2] = shift[:, 1] * 2.0 / h
    return theta


def apply(transforms: Sequence[Transform], images: torch.Tensor, generator: torch.Generator,
          *, fill: float = 0.5) -> torch.Tensor:
    """The transformed batch: every transform's draw composed into one bilinear sampling.
    Random numbers come from `generator` (on the CPU): reproducible for a given seed."""
    n, _c, h, w = images.shape
    g = Geometry(h, w)
    for t in transforms:
        g = t(g, n, generator)
    theta = _theta(g, n, h, w).to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, 3, g.out_h, g.out_w], align_corners=False)
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + fill


def lucid_set(pad_px: int = 12, jitter_px: int = 12, scales=SCALES,
              angles=ANGLES) -> tuple[Transform, ...]:
    """Lucid's set with other sizes: pad, scale, rotate, jitter (STANDARD with the defaults)."""
    return (pad(pad_px), random_scale(scales), random_rotate(angles), jitter(jitter_px))


STANDARD: tuple[Transform, ...] = lucid_set()
