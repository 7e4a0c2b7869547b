"""A folder of images with one PNG of class indices each, as a source (docs/DATA_SOURCES.md).

  images: DIR    image files (any depth; .jpg .jpeg .png .bmp .tif .tiff .webp)
  masks: DIR     one PNG per image at the same relative path and stem, the image's size, one
                 class index per pixel (8-bit grayscale or palette, or 16-bit); 0 = unlabelled
  classes: CSV   rows `index,name[,category]` (a header row is optional; a spreadsheet's BOM,
                 CRLF and quoted fields are read); index 1..65535; category default `object`

Every category of the CSV is a pixel-level category with one plane: a pixel of class k is
labelled k in the plane of k's category. A mask value that the CSV lacks is an error naming the
mask. `split`: images/<split>/ and masks/<split>/ (train or val); unset, every image is "val".
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.sources.base import (
    Source,
    check_split,
    images_by_stem,
    make_concepts,
    read_classes_csv,
    read_index_png,
    read_rgb_checked,
    select,
    unknown_values,
)
from cnnvis_pipeline.errors import CnnvisError

_CATEGORY = re.compile(r"^[A-Za-z0-9_-]+$")


def read_classes(path: Path, problems: list[str], *,
                 rows: list | None = None) -> list[tuple[int, str, str]]:
    """The classes CSV (or its `rows` as (line, cells)) as (index, name, category) rows, every
    problem appended."""
    out: list[tuple[int, str, str]] = []
    seen: dict[int, int] = {}
    names: set[tuple[str, str]] = set()
    if rows is None:
        rows = [(n, row) for n, *row in read_classes_csv(path, problems)]
    for n, row in rows:
        where = f"{path}: line {n}"
        if len(row) not in (2, 3) or not row[0].isdigit():
            problems.append(f"{where}: expected index,name[,category] with a whole-number "
                            f"index, got {','.join(row)!r}")
            continue
        idx, name = int(row[0]), row[1]
        cat = (row[2] if len(row) == 3 else "") or "object"
        if not 1 <= idx <= 65535:
            problems.append(f"{where}: index {idx} must be 1..65535 (0 means unlabelled)")
        elif idx in seen:
            problems.append(f"{where}: index {idx} is also on line {seen[idx]}")
        elif not name:
            problems.append(f"{where}: the name is empty")
        elif not _CATEGORY.match(cat):
            problems.append(f"{where}: category {cat!r} must be letters, digits, _ or -")
        elif (name, cat) in names:
            problems.append(f"{where}: {name!r} is already a class of category {cat!r}")
        else:
            seen[idx] = n
            names.add((name, cat))
            out.append((idx, name, cat))
    if not out and not problems:
        problems.append(f"{path}: no classes")
    return out


class MaskTable:
    """The classes of a CSV: concepts, categories and the per-pixel category lookup."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = Path(path)
        rows = read_classes(self.path, problems)
        self.categories = list(dict.fromkeys(cat for _, _, cat in rows))
        size = max((i for i, _, _ in rows), default=0) + 1
        self.known = np.zeros(size, bool)
        self.known[[0, *(i for i, _, _ in rows)]] = True
        self.category_of = np.full(size, -1, np.int16)  # class index -> category position
        for i, _, cat in rows:
            self.category_of[i] = self.categories.index(cat)
        self.concepts = [(i, name, cat) for cat in self.categories
                         for i, name, c in sorted(rows) if c == cat]

    def planes(self, path: Path, mask: np.ndarray) -> dict[str, np.ndarray]:
        unknown_values(path, mask, self.known, str(self.path))
        if len(self.categories) == 1:
            return {self.categories[0]: mask[None]}
        cat = self.category_of[mask]
        return {c: np.where(cat == k, mask, 0)[None] for k, c in enumerate(self.categories)}


class MasksSource(Source):
    kind = "masks"

    def __init__(self, images: str | Path, masks: str | Path, classes: str | Path, *,
                 split: str | None = None, limit: int | None = None,
                 problems: list[str] | None = None):
        super().__init__()
        strict = problems is None
        problems = [] if problems is None else problems
        check_split(split, images)
        self.images_dir, self.masks_dir = Path(images), Path(masks)
        self.table = MaskTable(Path(classes), problems)
        sub = split or ""
        if not self.masks_dir.is_dir():
            problems.append(f"{self.masks_dir}: mask directory does not exist")
        found = images_by_stem(self.images_dir / sub, problems)
        if not found and self.images_dir.is_dir():
            problems.append(f"{self.images_dir / sub}: no images")
        items = [(str(Path(sub, p.relative_to(self.images_dir / sub))), split or "val", p,
                  self.masks_dir / sub / f"{stem}.png") for stem, p in found.items()]
        self.items = select(items, limit)
        self.categories = list(self.table.categories)
        self.pixel_categories = list(self.categories)
        self.concepts = make_concepts(self.table.concepts)
        self.names = [it[0] for it in self.items]
        self.splits = [it[1] for it in self.items]
        if strict and problems:
            raise CnnvisError(problems[0])

    def image_path(self, i: int) -> Path:
        return self.items[i][2]

    def files(self) -> list[Path]:
        return [self.images_dir, self.masks_dir, self.table.path]

    def read(self, i: int):
        _, _, image, mask_path = self.items[i]
        img = read_rgb_checked(image)
        if not mask_path.is_file():
            raise CnnvisError(f"{mask_path}: mask PNG is missing (for {image})")
        mask = read_index_png(mask_path, img.shape[:2])
        return img, self.table.planes(mask_path, mask), {}

    def describe(self) -> dict:
        return {**super().describe(), "images": str(self.images_dir.resolve()),
                "masks": str(self.masks_dir.resolve()), "classes": str(self.table.path.resolve())}
