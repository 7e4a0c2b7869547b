"""Image tiles of the visualisations: PNG writing, mask overlays, strips, crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnnvis_pipeline.fileio import atomic_file

GAP = 2  # pixels of white between the tiles of a strip


def to_uint8(x) -> np.ndarray:
    """[3, H, W] or [H, W, 3] float in [0, 1] (tensor or array) -> uint8 [H, W, 3]."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float64)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def save_png(a: np.ndarray, path: str | Path) -> Path:
    with atomic_file(path) as tmp:
        Image.fromarray(to_uint8(a)).save(tmp, format="PNG", optimize=True)
    return Path(path)


def mask_overlay(image: np.ndarray, mask: np.ndarray, dim: float = 0.3) -> np.ndarray:
    """The image with everything outside `mask` darkened and the mask's outline drawn dashed
    black and white (2-pixel dashes), a pattern no concept colour can be mistaken for."""
    img = image.astype(np.float32)
    out = np.where(mask[..., None], img, img * dim)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    yy, xx = np.indices(mask.shape)
    white = ((yy + xx) // 2) % 2 == 0
    edge = mask & ~inner
    out[edge & white] = 255
    out[edge & ~white] = 0
    return out.astype(np.uint8)


def strip(tiles: list[np.ndarray], rows: int = 1, fill: int = 255) -> np.ndarray:
    """Tiles (uint8 [h, w, 3], any sizes) in a grid of `rows` rows, GAP pixels apart."""
    if not tiles:
        return np.full((1, 1, 3), fill, np.uint8)
    cols = -(-len(tiles) // rows)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    out = np.full((rows * th + (rows - 1) * GAP, cols * tw + (cols - 1) * GAP, 3), fill, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = r * (th + GAP), c * (tw + GAP)
        out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out


def pad_to(tile: np.ndarray, h: int, w: int, fill: int = 128) -> np.ndarray:
    """Centre `tile` on an h x w canvas (crops of clipped receptive fields are smaller)."""
    out = np.full((h, w, 3), fill, np.uint8)
    th, tw = min(h, tile.shape[0]), min(w, tile.shape[1])
    y, x = (h - th) // 2, (w - tw) // 2
    out[y : y + th, x : x + tw] = tile[:th, :tw]
    return out



def fit(a: np.ndarray, side: int) -> np.ndarray:
    """uint8 [H, W, 3] scaled down (area average) to fit within side x side; unchanged when it
    already fits."""
    h, w = a.shape[:2]
    if max(h, w) <= side:
        return a
    k = side / max(h, w)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return np.asarray(Image.fromarray(to_uint8(a)).resize(size, Image.Resampling.BOX))
