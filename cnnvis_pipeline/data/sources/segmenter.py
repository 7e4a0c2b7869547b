"""Labels predicted by a segmentation model, as a source (docs/DATA_SOURCES.md).

  segmenter: {images: DIR, factory: "module:function", checkpoint: FILE, classes: CSV,
              kwargs: {...}, mean: [..], std: [..]}

The model (built as a `factory:` model is, models/registry.py) labels every image of the folder
by the argmax over its output channels per pixel, at the prepared segmentation size (the
images are resized to it first, bilinear; the logits too when the model's output is smaller).
That runs in the dissection room (`cnnvis segment`, dissection/segment.py, sharded like
extraction, on the GPU when there is one); this module reads its output, a `labels.npy`
(uint16 [n, sh, sw]) per shard.

classes CSV: `channel,name[,category]`: the model's output channel (0-based) and its concept;
label number = channel + 1 (0 stays unlabelled), so a channel the CSV lacks (a background)
labels nothing. The prepared dataset says `labels: predictions`, with the factory, the
checkpoint and its sha256 in `source_info`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.sources.base import (
    Source,
    images_by_stem,
    make_concepts,
    read_classes_csv,
    read_rgb_checked,
    select,
)
from cnnvis_pipeline.data.sources.masks import read_classes
from cnnvis_pipeline.errors import CnnvisError


def read_channels(path: Path, problems: list[str]) -> list[tuple[int, str, str]]:
    """The classes CSV as (label = channel + 1, name, category)."""
    rows = []
    for n, *row in read_classes_csv(Path(path), problems):
        if row and row[0].isdigit():
            row = [str(int(row[0]) + 1), *row[1:]]
        rows.append((n, row))
    return read_classes(Path(path), problems, rows=rows)


class SegmenterSource(Source):
    kind = "segmenter"
    labels = "predictions"

    def __init__(self, spec: dict, *, size: int | None = None, limit: int | None = None,
                 predictions: list[Path] | None = None, problems: list[str] | None = None):
        super().__init__()
        strict = problems is None
        problems = [] if problems is None else problems
        self.spec = spec
        self.images_dir, self.classes = Path(spec["images"]), Path(spec["classes"])
        rows = read_channels(self.classes, problems)
        found = images_by_stem(self.images_dir, problems)
        if not found and self.images_dir.is_dir():
            problems.append(f"{self.images_dir}: no images")
        items = [(str(p.relative_to(self.images_dir)), "val", p) for p in found.values()]
        self.items = select(items, limit)
        self.categories = list(dict.fromkeys(cat for _, _, cat in rows))
        self.pixel_categories = list(self.categories)
        self.concepts = make_concepts([(lab, name, cat) for cat in self.categories
                                       for lab, name, c in sorted(rows) if c == cat])
        size_of = max((lab for lab, _, _ in rows), default=0) + 1
        self.category_of = np.full(size_of, -1, np.int16)
        for lab, _, cat in rows:
            self.category_of[lab] = self.categories.index(cat)
        self.names = [it[0] for it in self.items]
        self.splits = [it[1] for it in self.items]
        self.size = size
        self.info: dict = {}
        self.predicted = self._load(predictions) if predictions else None
        if strict and problems:
            raise CnnvisError(problems[0])

    def _load(self, dirs: list[Path]) -> np.ndarray:
        parts, lo = [], 0
        for d in dirs:
            try:
                info = json.loads((Path(d) / "info.json").read_text(encoding="utf-8"))
                arr = np.load(Path(d) / "labels.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise CnnvisError(f"{d}: not a segmenter's output ({e})") from None
            if info.get("start") != lo or len(arr) != info.get("stop", -1) - lo:
                raise CnnvisError(f"{d}: holds images {info.get('start')}..{info.get('stop')}, "
                                  f"expected them from {lo} (shards in order)")
            self.info = {k: info[k] for k in ("checkpoint_sha256", "factory") if k in info}
            parts.append(arr)
            lo = info["stop"]
        if lo != len(self):
            raise CnnvisError(f"{dirs[-1]}: the shards hold {lo} images, the folder {len(self)}")
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def image_path(self, i: int) -> Path:
        return self.items[i][2]

    def files(self) -> list[Path]:
        return [self.images_dir, self.classes]

    def read(self, i: int):
        img = read_rgb_checked(self.items[i][2])
        if self.predicted is None:
            return img, {}, {}
        labels = np.asarray(self.predicted[i]).astype(np.int32)
        if len(self.categories) == 1:
            return img, {self.categories[0]: labels[None]}, {}
        cat = self.category_of[labels]
        return img, {c: np.where(cat == k, labels, 0)[None]
                     for k, c in enumerate(self.categories)}, {}

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": self.labels,
                "images": str(self.images_dir.resolve()), "classes": str(self.classes.resolve()),
                "factory": self.spec.get("factory"), "checkpoint": self.spec.get("checkpoint"),
                **self.info}
