"""What every dataset source gives the one writer of prepared arrays (data/prepared.py).

A source (Broden, ADE20K, COCO panoptic, a mask folder, several merged, a segmenter's
predictions) is an object with:

- `categories` (names, in order), `pixel_categories` (those labelled by planes), `concepts`
  (broden.Concept: label number, name, category; a concept is a (label, category) pair);
- `names` and `splits` (per image: its name, "train" or "val");
- `read(i)` -> (uint8 RGB [H, W, 3], {pixel category: int [planes, h, w] label numbers, 0 =
  unlabelled}, {image-level category: [label numbers]}), at the files' own size, errors naming
  the file (the writer resizes: images bilinear, labels nearest);
- `geometry(size)` -> (ih, iw, sh, sw), the prepared image and segmentation sizes;
- `planes_per_category()`, `concept_index()` and `describe()` (meta.json's `source_info`: the
  format, its paths and options, and whether labels are annotations or predictions).

Also here: `select` (split and deterministic `limit`), `read_classes_csv` (a spreadsheet's CSV:
BOM, CRLF, quoted fields), `read_index_png` (a PNG of class indices), the most common size.
"""

from __future__ import annotations

import csv
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnvis_pipeline.data.broden import Concept
from cnnvis_pipeline.errors import CnnvisError

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class Source:
    """Base of the sources: the members the writer reads, with the shared defaults."""

    kind = "source"
    labels = "annotations"  # or "predictions" (a segmenter's)

    def __init__(self):
        self.categories: list[str] = []
        self.pixel_categories: list[str] = []
        self.concepts: list[Concept] = []
        self.names: list[str] = []
        self.splits: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[int]]]:
        raise NotImplementedError

    def image_path(self, i: int) -> Path:
        raise NotImplementedError

    def planes_per_category(self) -> dict[str, int]:
        return {c: 1 for c in self.pixel_categories}

    def concept_index(self) -> dict[tuple[int, str], int]:
        return {(c.label, c.category): c.index for c in self.concepts}

    def geometry(self, size: int | None) -> tuple[int, int, int, int]:
        """Images and segmentations at `size` x `size`, else at the most common image size
        (annotations have their image's size)."""
        if size:
            return size, size, size, size
        h, w = most_common_size([self.image_path(i) for i in range(len(self))])
        return h, w, h, w

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": self.labels}


SPLITS = ("train", "val")


def check_split(split: str | None, where) -> None:
    """A source's `split:` is one of SPLITS (or absent); anything else names the source."""
    if split is not None and split not in SPLITS:
        raise CnnvisError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")


def make_concepts(pairs) -> list[Concept]:
    """Concepts from (label, name, category) triples, in the given order."""
    return [Concept(i, int(lab), str(name), str(cat)) for i, (lab, name, cat) in enumerate(pairs)]


def select(items: list, limit: int | None, *, key=lambda it: it[0]) -> list:
    """Items sorted by name (`key`), then `limit` of them spread evenly over the whole list
    (item floor(k * n / limit) for k < limit): the same subset on every machine."""
    items = sorted(items, key=key)
    if limit is not None and limit < len(items):
        n = len(items)
        items = [items[(k * n) // limit] for k in range(limit)]
    return items


def most_common_size(paths: list[Path]) -> tuple[int, int]:
    """(height, width) most images have, read from their headers."""
    sizes: Counter = Counter()
    for path in paths:
        with open_image(path, "image") as im:
            sizes[(im.size[1], im.size[0])] += 1
    if not sizes:
        raise CnnvisError("the source has no images")
    return max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]


class open_image:
    """Image.open as a context manager whose errors name the file (`what` says which kind)."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what

    def __enter__(self):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.im = Image.open(self.path)
        except FileNotFoundError:
            raise CnnvisError(f"{self.path}: {self.what} is missing") from None
        except Image.DecompressionBombError as e:
            raise CnnvisError(f"{self.path}: refused before decoding: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise CnnvisError(f"{self.path}: cannot decode {self.what} ({e})") from None
        return self.im

    def __exit__(self, *exc):
        self.im.close()
        return False


def read_index_png(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG of class indices (8-bit grayscale or palette, or 16-bit grayscale) as int32
    [H, W]; `shape` (H, W), when given, is the size it must have (its image's)."""
    with open_image(path, "annotation PNG") as im:
        if im.format != "PNG":
            raise CnnvisError(f"{path}: annotation is not a PNG file ({im.format})")
        if im.mode not in ("L", "P", "I;16", "I"):
            raise CnnvisError(f"{path}: annotation PNG has mode {im.mode}; it must hold one "
                              "class index per pixel (8-bit grayscale or palette, or 16-bit)")
        if shape is not None and (im.size[1], im.size[0]) != tuple(shape):
            raise CnnvisError(f"{path}: annotation is {im.size[0]}x{im.size[1]}, its image is "
                              f"{shape[1]}x{shape[0]}")
        try:
            im.load()
            return np.asarray(im).astype(np.int32)
        except (OSError, SyntaxError, ValueError) as e:
            raise CnnvisError(f"{path}: cannot decode annotation PNG ({e})") from None


def read_rgb_checked(path: Path) -> np.ndarray:
    with open_image(path, "image") as im:
        try:
            im.load()
            return np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:
            raise CnnvisError(f"{path}: cannot decode image ({e})") from None


def unknown_values(path: Path, plane: np.ndarray, known: np.ndarray, what: str) -> None:
    """Raise naming `path` when `plane` holds values that `known` (bool lookup) lacks."""
    if plane.size and (plane.max() >= len(known) or not known[plane].all()):
        inside = plane < len(known)
        bad = np.unique(np.concatenate([plane[~inside], plane[inside][~known[plane[inside]]]]))
        raise CnnvisError(f"{path}: value(s) {bad[:10].tolist()} are not in {what}")


def read_classes_csv(path: Path, problems: list[str]) -> list[list]:
    """Rows (line number first) of a CSV as spreadsheets write it: a UTF-8 byte-order mark,
    CRLF line ends and quoted fields are read; blank lines are skipped; a first row whose first
    cell is not a number is a header."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1)]
    except FileNotFoundError:
        problems.append(f"{path}: required file is missing")
        return []
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not UTF-8 text ({e})")
        return []
    except (OSError, csv.Error) as e:
        problems.append(f"{path}: cannot read CSV ({e})")
        return []
    rows = [(n, row) for n, row in rows if any(row)]
    if rows and not rows[0][1][0].lstrip("-").isdigit():
        rows = rows[1:]  # a header row (its columns are taken by position)
    return [[n, *row] for n, row in rows]


def images_by_stem(folder: Path, problems: list[str]) -> dict[str, Path]:
    """Image files of a folder (recursively) by their path without suffix, relative to it."""
    if not folder.is_dir():
        problems.append(f"{folder}: image directory does not exist")
        return {}
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            stem = str(path.relative_to(folder).with_suffix(""))
            if stem in out:
                problems.append(f"{path}: another image has the same name ({out[stem].name})")
            out[stem] = path
    return out
