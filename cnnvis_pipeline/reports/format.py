"""How the reports print numbers and embed files.

- fmt(x, digits=3): fixed `digits` decimals (IoUs, ratios), scientific for very large or small.
- fmt_t(x): a threshold or activation in raw activation units, 4 significant digits everywhere.
- pct(x): a fraction as a percentage with 2 significant digits ("0.031%").
- data_uri(path): a PNG/JPEG/SVG file as a base64 data URI (pages fetch nothing).
- png_size(path): (width, height) from a PNG's header.
- slug(text): an HTML id fragment.
"""

from __future__ import annotations

import base64
import math
import re
import struct
from pathlib import Path

from cnnvis_pipeline.errors import CnnvisError

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def _float(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def fmt(x, digits: int = 3) -> str:
    v = _float(x)
    if v is None:
        return "n/a"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 10 ** -digits):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}f}"


def _nonzero(x, zero: str, text) -> str:
    """"n/a" for a missing or NaN value, `zero` for 0, else text(value)."""
    v = _float(x)
    if v is None:
        return "n/a"
    return zero if v == 0 else text(v)


def fmt_t(x) -> str:
    return _nonzero(x, "0", lambda v: f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}")


def pct(x) -> str:
    return _nonzero(x, "0%", lambda v: f"{100 * v:.2g}%" if abs(100 * v) < 10
                    else f"{100 * v:.0f}%")


def data_uri(path: str | Path) -> str:
    path = Path(path)
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise CnnvisError(f"{path}: cannot embed a {path.suffix} file as an image")
    if not path.is_file():
        raise CnnvisError(f"{path}: image missing; rerun the step that writes it")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def png_size(path: str | Path) -> tuple[int, int]:
    head = Path(path).read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise CnnvisError(f"{path}: not a PNG file")
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def number_or_none(x) -> float | None:
    """x as a float, or None when it is missing, not a number or NaN (a table's null)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if v != v else v
