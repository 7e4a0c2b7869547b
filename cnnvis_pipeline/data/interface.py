"""What the later stages read of a prepared dataset: `PreparedData`, the one declaration.

dissection/, viz/, models/ (synthnet, check) and bench/ read a prepared dataset
(data/prepared.py, `PreparedDataset`) only through the members of `PreparedData`;
tests/test_prepared_interface.py checks that PreparedDataset has every member with the shape and
dtype its docstring gives, and that those rooms read nothing else.

Each member's docstring starts with `<type> [<shape>]:`. The letters of the shapes:
N images, H x W the image size, C categories, K concepts, P label planes, sh x sw the
segmentation size, J the most concepts present in one image, B images of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

META_KEYS = ("images", "splits")  # the keys of `meta` that other stages read


@dataclass
class Batch:
    """Rows `indices` of the prepared arrays, as contiguous in-memory copies."""

    indices: np.ndarray  # int64 [B] image indices
    images: np.ndarray  # uint8 [B, H, W, 3]
    planes: np.ndarray  # uint16 [B, max(P, 1), sh, sw]
    slots: np.ndarray  # int32 [B, J]
    present: np.ndarray  # bool [B, C]


@runtime_checkable
class PreparedData(Protocol):
    """A prepared dataset as the other stages read it."""

    def __len__(self) -> int:
        """int: N, the number of images."""
        ...

    @property
    def digest(self) -> str:
        """str: the content digest (sha256 hex) of the dataset it was made from (a Broden
        directory, or the files of a source of data/sources/; with `size`, `split` or `limit`,
        combined with them)."""
        ...

    @property
    def meta(self) -> dict:
        """dict: meta.json. Other stages read only META_KEYS: `images` (list[str] [N], each
        image's path relative to images/) and `splits` (list[str] [N], index.csv's split:
        "train" or "val" in a valid dataset)."""
        ...

    @property
    def categories(self) -> list[str]:
        """list[str] [C]: category names, in category.csv's order; a category's index is its
        position here."""
        ...

    @property
    def category_kind(self) -> list[str]:
        """list[str] [C]: "pixel" (labels are segmentation planes) or "image" (labels of the
        whole image) per category."""
        ...

    @property
    def concepts(self) -> list[dict]:
        """list[dict] [K]: per concept (a label in a category) {"label": int, "name": str,
        "category": str}; a concept's index is its position here."""
        ...

    @property
    def concept_label(self) -> np.ndarray:
        """int64 [K]: the label number of each concept (label.csv's `number`)."""
        ...

    @property
    def concept_category(self) -> np.ndarray:
        """int64 [K]: the index in `categories` of each concept's category."""
        ...

    @property
    def images(self) -> np.ndarray:
        """uint8 [N, H, W, 3]: every image, RGB, resized to one size (a read-only memory
        map)."""
        ...

    @property
    def planes(self) -> np.ndarray:
        """uint16 [N, max(P, 1), sh, sw]: the label planes of the pixel-level categories, 0 =
        unlabeled (a read-only memory map; one all-zero plane when no category is
        pixel-level)."""
        ...

    @property
    def plane_category(self) -> np.ndarray:
        """int64 [P]: the index in `categories` of each plane's category."""
        ...

    @property
    def slots(self) -> np.ndarray:
        """int32 [N, J]: the concepts present in each image, ascending, padded with -1."""
        ...

    @property
    def present(self) -> np.ndarray:
        """bool [N, C]: whether the image has any label of the category."""
        ...

    @property
    def seg_size(self) -> tuple[int, int]:
        """tuple[int, int] [2]: (sh, sw), the size of every label plane."""
        ...

    def batch(self, indices) -> Batch:
        """Batch [B]: the rows `indices` (B image indices) of images, planes, slots and
        present."""
        ...
