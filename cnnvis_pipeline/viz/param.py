"""Image parameterisation for feature visualisation (Olah et al. 2017).

The optimised variable is a Fourier spectrum per image. Its inverse real FFT, scaled so that every
spatial frequency starts with roughly equal energy (1/f weighting), lives in a decorrelated colour
space; a fixed 3x3 matrix (the square root of ImageNet's colour covariance, as published with
Lucid) maps it to RGB, and a sigmoid maps it into [0, 1].

- FourierImage(n, size, generator=..., device=...): module; calling it returns [n, 3, size, size].
- COLOR_CORRELATION_SQRT: the 3x3 colour matrix (rows: R, G, B).
- fourier(n, size, ...) and pixel(start): parameterisations as functions, each returning
  (the parameters to optimise, a function that returns the images [n, 3, h, w] in [0, 1]).
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
    """

    def __init__(self, n: int, size: int | tuple[int, int], *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, init_std: float = 0.01,
                 decay_power: float = 1.0):
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else size
        self.h, self.w = int(h), int(w)
        spec_shape = (n, 3, self.h, self.w // 2 + 1, 2)
        init = torch.randn(spec_shape, generator=generator) * init_std
        self.spectrum = nn.Parameter(init.to(device))
        self.register_buffer("scale", _frequency_scale(self.h, self.w, decay_power).to(device))
        self.register_buffer("color", _normalised_color_matrix().to(device))

    def decorrelated(self) -> torch.Tensor:
        """The image in the decorrelated colour space, before the colour matrix and sigmoid."""
        spec = torch.view_as_complex(self.spectrum) * self.scale
        # "ortho" keeps the pixel scale independent of the image size. Lucid divides by 4.
        return torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho") / 4.0

    def forward(self) -> torch.Tensor:
        x = self.decorrelated()
        rgb = torch.einsum("ij,njhw->nihw", self.color, x)
        return torch.sigmoid(rgb)


# -- parameterisations as functions: (parameters to optimise, a function returning the images) --

def fourier(n: int, size: int | tuple[int, int], *, generator: torch.Generator | None = None,
            device=None):
    """Fourier, colour-decorrelated, sigmoid images (FourierImage): (parameters, image_f)."""
    image = FourierImage(n, size, generator=generator, device=device)
    return list(image.parameters()), image


def pixel(start: torch.Tensor, eps: float = 1e-4):
    """Images as sigmoid logits of their pixels, starting at `start` (in [0, 1], clamped to
    [eps, 1 - eps]): (parameters, image_f)."""
    logits = torch.logit(start.detach().clamp(eps, 1 - eps)).requires_grad_(True)
    return [logits], lambda: torch.sigmoid(logits)
