"""Decoding the files a Broden dataset names (docs/DATA_SOURCES.md), with errors naming the file.

- read_rgb(path, expect): an image as uint8 RGB [H, W, 3].
- decode_label_png(path, expect): a segmentation PNG to global label numbers (R + 256 * G).
- known_label_table(numbers): the lookup table that finds label numbers label.csv lacks.

Both readers check the header's size against index.csv's (`expect`) before decoding anything.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnvis_pipeline.errors import CnnvisError

SEGMENTATION_MODES = {2: "RGB", 6: "RGBA"}  # PNG colour types a segmentation may have


def _size_problem(path: Path, size: tuple[int, int], expect, what: str) -> str | None:
    if expect is None or (size[1], size[0]) == tuple(expect):
        return None
    names = "iw x ih" if what == "image" else "sw x sh"
    return (f"{path}: {what} is {size[0]}x{size[1]}, index.csv says {names} = "
            f"{expect[1]}x{expect[0]}")


@contextmanager
def _open_checked(path: Path, what: str, expect):
    """Image.open (which reads only the header), the header's size checked against `expect`
    (height, width) from index.csv before anything is decoded; errors name the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except FileNotFoundError:
        raise CnnvisError(f"{path}: {'image' if what == 'image' else 'segmentation PNG'} is "
                          "missing") from None
    except Image.DecompressionBombError as e:
        raise CnnvisError(f"{path}: refused before decoding: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        kind = "image" if what == "image" else "segmentation PNG"
        raise CnnvisError(f"{path}: cannot decode {kind} ({e})") from None
    with im:
        problem = _size_problem(path, im.size, expect, what)
        if problem:
            raise CnnvisError(problem)
        yield im


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def known_label_table(numbers) -> np.ndarray:
    """bool [65536], True for 0 (unlabeled) and each of `numbers` (label.csv's): `~table[plane]`
    marks the pixels of a decoded segmentation whose label is unknown, without sorting it."""
    known = np.zeros(65536, bool)
    known[[n for n in numbers if 0 <= n < 65536]] = True
    known[0] = True
    return known


def decode_label_png(path: Path, expect: tuple[int, int] | None = None) -> np.ndarray:
    """Global label numbers of a segmentation PNG: R + 256 * G, as int32 (B is unused).

    The PNG must be 8-bit RGB or RGBA (what the label encoding means); `expect` = (sh, sw) from
    index.csv is checked from the header before decoding."""
    with _open_checked(path, "segmentation", expect) as im:
        try:
            header = _png_header(path)
        except OSError as e:
            raise CnnvisError(f"{path}: cannot read segmentation PNG ({e.strerror})") from None
        if header is None:
            raise CnnvisError(f"{path}: segmentation is not a PNG file ({im.format})")
        depth, colour = header
        if colour not in SEGMENTATION_MODES or depth != 8:
            kind = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha",
                    6: "RGBA"}.get(colour, f"colour type {colour}")
            raise CnnvisError(
                f"{path}: segmentation PNG is {depth}-bit {kind} (mode {im.mode}); it must be "
                "8-bit RGB or RGBA (label = R + 256 * G)"
            )
        try:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise CnnvisError(f"{path}: cannot decode segmentation PNG ({e})") from None
    # Decode in int32: uint8 * 256 would overflow.
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


def read_rgb(path: Path, expect: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as uint8 RGB [H, W, 3]; a corrupt file raises CnnvisError naming it.

    `expect` = (ih, iw) from index.csv is checked from the header before decoding."""
    with _open_checked(path, "image", expect) as im:
        try:
            im.load()
            return np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise CnnvisError(f"{path}: cannot decode image ({e})") from None
