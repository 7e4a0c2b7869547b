"""ADE20K scene parsing (the ADEChallengeData2016 release) as a source (docs/DATA_SOURCES.md).

Layout read:
  images/training/*.jpg, images/validation/*.jpg
  annotations/training/*.png, annotations/validation/*.png   one class index per pixel,
                                                             0..150, 0 = unlabelled
  objectInfo150.csv    columns Idx,Ratio,Train,Val,Name; Name lists synonyms separated by `;`
  sceneCategories.txt  (optional) lines "<image stem> <scene>"

Concepts: category `object` (pixel-level): the 150 classes, named by their first synonym
(label number = Idx); category `scene` (image-level): the scenes of sceneCategories.txt,
numbered 1.. in name order. `split`: train (training/), val (validation/), or both when unset.
"""

from __future__ import annotations

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

SPLIT_DIRS = {"train": "training", "val": "validation"}
OBJECTS = "objectInfo150.csv"
SCENES = "sceneCategories.txt"


def _object_classes(path: Path, problems: list[str]) -> dict[int, str]:
    """objectInfo150.csv: Idx -> the first synonym of Name (unique: a repeated one gets
    `-<Idx>`)."""
    classes: dict[int, str] = {}
    for n, *row in read_classes_csv(path, problems):
        if len(row) < 5 or not row[0].isdigit() or int(row[0]) < 1 or int(row[0]) > 65535:
            problems.append(f"{path}: line {n}: expected Idx,Ratio,Train,Val,Name with Idx a "
                            f"whole number 1..65535, got {','.join(row)!r}")
            continue
        idx, name = int(row[0]), row[4].split(";")[0].strip()
        if idx in classes:
            problems.append(f"{path}: line {n}: duplicate Idx {idx}")
            continue
        if not name:
            problems.append(f"{path}: line {n}: Name is empty")
            continue
        classes[idx] = name
    names = list(classes.values())
    return {i: (f"{v}-{i}" if names.count(v) > 1 else v) for i, v in classes.items()}


def _scenes(path: Path, problems: list[str]) -> dict[str, str]:
    """sceneCategories.txt: image stem -> scene (absent file: no scenes)."""
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot read ({e})")
        return {}
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            problems.append(f"{path}: line {n}: expected '<image stem> <scene>', got {line!r}")
            continue
        out[parts[0]] = parts[1]
    return out


class Ade20kSource(Source):
    kind = "ade20k"

    def __init__(self, root: str | Path, *, split: str | None = None, limit: int | None = None,
                 problems: list[str] | None = None):
        super().__init__()
        self.root = Path(root)
        strict = problems is None
        problems = [] if problems is None else problems
        if not self.root.is_dir():
            raise CnnvisError(f"{self.root}: ADE20K directory does not exist")
        check_split(split, self.root)
        classes = _object_classes(self.root / OBJECTS, problems)
        scenes = _scenes(self.root / SCENES, problems)
        items = []
        for sp in ([split] if split else list(SPLIT_DIRS)):
            folder = self.root / "images" / SPLIT_DIRS[sp]
            if split is None and not folder.is_dir():
                continue
            for stem, path in images_by_stem(folder, problems).items():
                ann = self.root / "annotations" / SPLIT_DIRS[sp] / f"{stem}.png"
                items.append((f"{SPLIT_DIRS[sp]}/{path.name}", sp, path, ann, Path(stem).name))
        if not items and not problems:
            problems.append(f"{self.root / 'images'}: no images (expected images/training/ or "
                            "images/validation/)")
        items = select(items, limit)
        scene_names = sorted({scenes[it[4]] for it in items if it[4] in scenes})
        self.scene_label = {s: k for k, s in enumerate(scene_names, 1)}
        self.items = items
        self.scenes = scenes
        self.known = np.zeros(max(classes, default=0) + 1, bool)
        self.known[[0, *classes]] = True
        self.categories = ["object"] + (["scene"] if scene_names else [])
        self.pixel_categories = ["object"]
        self.concepts = make_concepts(
            [(i, classes[i], "object") for i in sorted(classes)]
            + [(k, s, "scene") for s, k in self.scene_label.items()]
        )
        self.names = [it[0] for it in items]
        self.splits = [it[1] for it in items]
        if strict and problems:
            raise CnnvisError(problems[0])

    def image_path(self, i: int) -> Path:
        return self.items[i][2]

    def files(self) -> list[Path]:
        return [self.root / OBJECTS, self.root / SCENES, self.root / "images",
                self.root / "annotations"]

    def read(self, i: int):
        _, _, image, ann, stem = self.items[i]
        img = read_rgb_checked(image)
        if not ann.is_file():
            raise CnnvisError(f"{ann}: annotation PNG is missing (for {image})")
        plane = read_index_png(ann, img.shape[:2])
        unknown_values(ann, plane, self.known, f"{self.root / OBJECTS} (class indices)")
        labels = {"scene": [self.scene_label[self.scenes[stem]]]} if stem in self.scenes else {}
        return img, {"object": plane[None]}, labels

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root.resolve())}
