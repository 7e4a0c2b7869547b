"""Random geometric transforms applied at every optimisation step (transformation robustness).

Lucid's standard set is pad(12, grey), jitter(8), scale(0.9..1.1), rotate(-10..10 deg), jitter(4).
Here they are composed into one affine map per image and applied with a single bilinear
`grid_sample` on a canvas of `size + pad` pixels: the grey padding is implicit (the image is
sampled with zeros outside after subtracting 0.5), and the two jitters become one random integer
translation with the same total range. Every image in the batch gets its own draw.

- random_affine(images, generator, ...): the transformed batch [N, 3, S + pad, S + pad].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALES = tuple(1.0 + (i - 5) / 50.0 for i in range(11))  # 0.90, 0.92, ..., 1.10
ANGLES = tuple(range(-10, 11))  # degrees


def random_affine(images: torch.Tensor, generator: torch.Generator, *, pad: int = 12,
                  jitter: int = 12, scales=SCALES, angles=ANGLES, fill: float = 0.5) -> torch.Tensor:
    """Pad by `pad` pixels of `fill`, then randomly scale, rotate and translate each image.

    The output canvas is `size + 2 * pad - jitter` pixels wide (Lucid: 128 -> 152 -> 144 -> 140
    for pad 12, jitters 8 and 4). Random numbers come from `generator` (on the CPU), so the
    result is reproducible for a given seed.
    """
    n, _c, h, w = images.shape
    out_h, out_w = h + 2 * pad - jitter, w + 2 * pad - jitter
    scale_idx = torch.randint(len(scales), (n,), generator=generator)
    angle_idx = torch.randint(len(angles), (n,), generator=generator)
    half = jitter // 2
    shift = torch.randint(-half, jitter - half + 1, (n, 2), generator=generator).float()

    s = torch.tensor(scales, dtype=torch.float32)[scale_idx]
    a = torch.tensor(angles, dtype=torch.float32)[angle_idx] * (math.pi / 180.0)
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
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, 3, out_h, out_w], align_corners=False)
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + fill
