"""Image parameterisation for feature visualisation (Olah et al. 2017).

The optimised variable is a Fourier spectrum per image. Its inverse real FFT, scaled so that every
spatial frequency starts with roughly equal energy (1/f weighting), lives in a decorrelated colour
space; a fixed 3x3 matrix (the square root of ImageNet's colour covariance, as published with
Lucid) maps it to RGB, and a sigmoid maps it into [0, 1].

- FourierImage(n, size, generator=..., device=...): module; calling it returns [n, 3, size, size].
- COLOR_CORRELATION_SQRT: the 3x3 colour matrix (rows: R, G, B).
- fourier(n, size, ...), fourier_colour(n, size, ...) and pixel(start, colour_offset=...):
  parameterisations as functions, each returning (the parameters to optimise, a function that
  returns the images [n, 3, h, w] in [0, 1]). fourier_colour and a non-zero colour_offset add a
  per-image RGB offset (a parameter times a gain) to the sigmoid's logits: one parameter moves
  the colour of the whole image, which the Fourier spectrum (the mean colour one coefficient
  among thousands, the chromatic directions scaled down by the colour matrix) and the separate
  pixel logits do slowly.
"""

from __future__ import annotations

import torch
from torch import nn

# Square root of the colour covariance of natural (ImageNet) images, as published with Lucid.
COLOR_CORRELATION_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02],
     [0.27, 0.00, -0.05],
     [0.27, -0.09, 0.03]],
    dtype=torch.float32,
)


# The colour offset's parameter is multiplied by this: one Adam step of the offset moves every
# pixel's logit by about lr x gain, so a uniform saturated colour is reached in a few dozen steps.
COLOUR_OFFSET_GAIN = 2.0


def _normalised_color_matrix() -> torch.Tensor:
    # Scale so that the largest column has unit norm: a unit step in the decorrelated space
    # moves RGB by at most one unit.
    col_norms = COLOR_CORRELATION_SQRT.norm(dim=0)
    return COLOR_CORRELATION_SQRT / col_norms.max()


def _frequency_scale(h: int, w: int, decay_power: float) -> torch.Tensor:
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    freq = torch.sqrt(fx * fx + fy * fy)
    # Clamp the DC term to the lowest representable frequency so that it is not infinite.
    return 1.0 / torch.clamp(freq, min=1.0 / max(h, w)) ** decay_power


class FourierImage(nn.Module):
    """`n` images of `size` x `size` pixels, parameterised by a scaled Fourier spectrum.

    The spectrum (real and imaginary parts) is the only trainable parameter; it starts as small
    Gaussian noise drawn from `generator`, so the initial images are close to uniform grey.
    colour_offset: when non-zero, a second parameter `offset` [n, 3, 1, 1] (zero at the start),
    times this gain, is added to the logits before the sigmoid.
    """

    def __init__(self, n: int, size: int | tuple[int, int], *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, init_std: float = 0.01,
                 decay_power: float = 1.0, colour_offset: float = 0.0):
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else size
        self.h, self.w = int(h), int(w)
        spec_shape = (n, 3, self.h, self.w // 2 + 1, 2)
        init = torch.randn(spec_shape, generator=generator) * init_std
        self.spectrum = nn.Parameter(init.to(device))
        self.register_buffer("scale", _frequency_scale(self.h, self.w, decay_power).to(device))
        self.register_buffer("color", _normalised_color_matrix().to(device))
        self.offset_gain = float(colour_offset)
        if self.offset_gain:
            self.offset = nn.Parameter(torch.zeros(n, 3, 1, 1, device=device))

    def decorrelated(self) -> torch.Tensor:
        """The image in the decorrelated colour space, before the colour matrix and sigmoid."""
        spec = torch.view_as_complex(self.spectrum) * self.scale
        # "ortho" keeps the pixel scale independent of the image size. Lucid divides by 4.
        return torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho") / 4.0

    def forward(self) -> torch.Tensor:
        x = self.decorrelated()
        rgb = torch.einsum("ij,njhw->nihw", self.color, x)
        if self.offset_gain:
            rgb = rgb + self.offset_gain * self.offset
        return torch.sigmoid(rgb)


# -- parameterisations as functions: (parameters to optimise, a function returning the images) --

def fourier(n: int, size: int | tuple[int, int], *, generator: torch.Generator | None = None,
            device=None):
    """Fourier, colour-decorrelated, sigmoid images (FourierImage): (parameters, image_f)."""
    image = FourierImage(n, size, generator=generator, device=device)
    return list(image.parameters()), image


def fourier_colour(n: int, size: int | tuple[int, int], *,
                   generator: torch.Generator | None = None, device=None):
    """FourierImage with a free per-image colour offset (gain COLOUR_OFFSET_GAIN) added to the
    sigmoid's logits: (parameters, image_f)."""
    image = FourierImage(n, size, generator=generator, device=device,
                         colour_offset=COLOUR_OFFSET_GAIN)
    return list(image.parameters()), image


def pixel(start: torch.Tensor, eps: float = 1e-4, colour_offset: float = 0.0):
    """Images as sigmoid logits of their pixels, starting at `start` (in [0, 1], clamped to
    [eps, 1 - eps]), plus, when colour_offset is non-zero, a per-image RGB offset parameter
    (zero at the start) times that gain: (parameters, image_f)."""
    logits = torch.logit(start.detach().clamp(eps, 1 - eps)).requires_grad_(True)
    if not colour_offset:
        return [logits], lambda: torch.sigmoid(logits)
    offset = torch.zeros(start.shape[0], start.shape[1], 1, 1, device=start.device,
                         requires_grad=True)
    return [logits, offset], lambda: torch.sigmoid(logits + colour_offset * offset)
