"""Colour concepts computed from the pixels, and several sources merged into one concept set.

The colour rule: every pixel gets the nearest (Euclidean distance in CIE L*a*b*, D65 white) of
the eleven basic colour terms' prototypes below, in category `color` (label numbers 1..11 in
this order). Broden's colour labels come from a learned colour-naming model; this rule is a
fixed, documented stand-in for it. It is computed at the image's own resolution and resized
with the other labels (nearest).

`MergedSource(base, extras)`: the images and concepts of `base` (any source) plus the
categories of each extra labeller (`ColourLabels`, `MaskLabels`: a folder of class-index PNGs
named like `base`'s images); a category name that an earlier entry already has is qualified
as `<category>-<kind>` so that every concept stays distinct.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.sources.base import Source, make_concepts, read_index_png
from cnnvis_pipeline.data.sources.masks import MaskTable
from cnnvis_pipeline.errors import CnnvisError

COLOURS = {  # sRGB prototypes of the basic colour terms
    "black": (0, 0, 0), "blue": (0, 64, 255), "brown": (128, 80, 32), "grey": (128, 128, 128),
    "green": (0, 160, 0), "orange": (255, 140, 0), "pink": (255, 160, 200),
    "purple": (128, 0, 160), "red": (220, 0, 0), "white": (255, 255, 255),
    "yellow": (255, 230, 0),
}


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> CIE L*a*b* float32 [..., 3] (D65)."""
    c = rgb.astype(np.float32) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                  [0.0193, 0.1192, 0.9505]], np.float32)
    xyz = (c @ m.T) / np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


_PROTOTYPES = rgb_to_lab(np.array(list(COLOURS.values()), np.uint8))


def colour_labels(img: np.ndarray) -> np.ndarray:
    """int32 [H, W]: each pixel's colour label (1..11, the order of COLOURS)."""
    lab = rgb_to_lab(img).reshape(-1, 1, 3)
    d = ((lab - _PROTOTYPES[None]) ** 2).sum(-1)
    return (d.argmin(1).astype(np.int32) + 1).reshape(img.shape[:2])


class ColourLabels:
    kind = "colour"
    categories = ["color"]
    pixel_categories = ["color"]
    concepts = [(k, name, "color") for k, name in enumerate(COLOURS, 1)]

    def label(self, name: str, img: np.ndarray):
        return {"color": colour_labels(img)[None]}, {}

    def files(self) -> list[Path]:
        return []

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": "computed", "rule": "nearest of 11 basic colour "
                "prototypes in CIE L*a*b*"}


class MaskLabels:
    """A folder of class-index PNGs for the base source's images: `<masks>/<image name
    without suffix>.png`, with a classes CSV (as masks:)."""

    kind = "masks"

    def __init__(self, masks: str | Path, classes: str | Path, problems: list[str]):
        self.masks_dir = Path(masks)
        if not self.masks_dir.is_dir():
            problems.append(f"{self.masks_dir}: mask directory does not exist")
        self.table = MaskTable(Path(classes), problems)
        self.categories = list(self.table.categories)
        self.pixel_categories = list(self.categories)
        self.concepts = self.table.concepts

    def label(self, name: str, img: np.ndarray):
        path = self.masks_dir / Path(name).with_suffix(".png")
        if not path.is_file():
            raise CnnvisError(f"{path}: mask PNG is missing (for image {name})")
        return self.table.planes(path, read_index_png(path, img.shape[:2])), {}

    def files(self) -> list[Path]:
        return [self.masks_dir, self.table.path]

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": "annotations", "masks": str(self.masks_dir.resolve()),
                "classes": str(self.table.path.resolve())}


class MergedSource(Source):
    kind = "concepts"

    def __init__(self, base: Source, extras: list):
        super().__init__()
        self.base, self.extras = base, extras
        self.names, self.splits = base.names, base.splits
        self.categories = list(base.categories)
        self.pixel_categories = list(base.pixel_categories)
        triples = [(c.label, c.name, c.category) for c in base.concepts]
        self.renames: list[dict[str, str]] = []
        for extra in extras:
            rename = {}
            for cat in extra.categories:
                new, k = cat, 1
                while new in self.categories:
                    new, k = f"{cat}-{extra.kind}" + (str(k) if k > 1 else ""), k + 1
                rename[cat] = new
                self.categories.append(new)
                if cat in extra.pixel_categories:
                    self.pixel_categories.append(new)
            triples += [(lab, name, rename[cat]) for lab, name, cat in extra.concepts]
            self.renames.append(rename)
        self.concepts = make_concepts(triples)
        self.labels = "predictions" if base.labels == "predictions" else "annotations"

    def image_path(self, i: int) -> Path:
        return self.base.image_path(i)

    def geometry(self, size):
        return self.base.geometry(size)

    def planes_per_category(self) -> dict[str, int]:
        out = dict(self.base.planes_per_category())
        for rename in self.renames:
            out.update({new: 1 for new in rename.values()})
        return out

    def files(self) -> list[Path]:
        return [*self.base.files(), *(f for e in self.extras for f in e.files())]

    def read(self, i: int):
        img, planes, labels = self.base.read(i)
        for extra, rename in zip(self.extras, self.renames, strict=True):
            p, lab = extra.label(self.names[i], img)
            planes.update({rename[c]: v for c, v in p.items()})
            labels.update({rename[c]: v for c, v in lab.items()})
        return img, planes, labels

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "base": self.base.describe(),
                "extras": [e.describe() for e in self.extras]}
