"""A Broden directory (data/broden.py) as a source of the writer, with `size`, `split`, `limit`.

Sizes: the most common ih x iw and sh x sw of index.csv; with `size` S the images are S x S and
the segmentations keep their ratio to the images (Broden's 224 px images with 112 px labels at
S = 384 give 192 px labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.broden import BrodenDataset, load_broden
from cnnvis_pipeline.data.sources.base import Source, select
from cnnvis_pipeline.errors import CnnvisError


class BrodenSource(Source):
    kind = "broden"

    def __init__(self, ds: BrodenDataset | str | Path, *, split: str | None = None,
                 limit: int | None = None):
        super().__init__()
        self.ds = ds if isinstance(ds, BrodenDataset) else load_broden(ds)
        rows = [(r.image, i) for i, r in enumerate(self.ds.records)
                if split is None or r.split == split]
        if not rows:
            raise CnnvisError(f"{self.ds.root / 'index.csv'}: no images of split {split!r}")
        self.rows = [i for _, i in (rows if limit is None else select(rows, limit))]
        if limit is not None:
            self.rows.sort()  # index.csv's order
        self.records = [self.ds.records[i] for i in self.rows]
        self.categories = self.ds.categories
        self.pixel_categories = self.ds.pixel_categories
        self.concepts = self.ds.concepts
        self.names = [r.image for r in self.records]
        self.splits = [r.split for r in self.records]

    def geometry(self, size: int | None) -> tuple[int, int, int, int]:
        def common(values) -> int:
            return int(np.bincount(values).argmax())

        recs = self.records
        ih, iw = common([r.ih for r in recs]), common([r.iw for r in recs])
        sh, sw = common([r.sh for r in recs]), common([r.sw for r in recs])
        if not size:
            return ih, iw, sh, sw
        return size, size, max(1, round(size * sh / ih)), max(1, round(size * sw / iw))

    def planes_per_category(self) -> dict[str, int]:
        return {c: max((len(r.pixel.get(c, [])) for r in self.records), default=0)
                for c in self.pixel_categories}

    def image_path(self, i: int) -> Path:
        rec = self.records[i]
        return self.ds.resolve(rec.image, where=f"{self.ds.root / 'index.csv'}: line {rec.row}")

    def read(self, i: int):
        rec, j = self.records[i], self.rows[i]
        img = self.ds.read_image(j)
        if img.shape[:2] != (rec.ih, rec.iw):
            raise CnnvisError(
                f"{self.image_path(i)}: image is {img.shape[1]}x{img.shape[0]}, "
                f"index.csv line {rec.row} says iw x ih = {rec.iw}x{rec.ih}"
            )
        return img, self.ds.read_planes(j), rec.labels

    def files(self) -> list[Path]:
        return [self.ds.root]

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": "annotations", "root": str(self.ds.root.resolve())}
