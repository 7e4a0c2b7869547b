"""The classification data of an ablation: which images, which classes, and how they are read.

Two sources (config `ablation.models.<name>`):

- an ImageFolder-style directory (`images:`): one folder per class, image files inside (sorted
  by name; the first `limit` of each folder), and a class-index file (`classes:`) saying which
  output of the model each folder is:
    JSON  {"n01440764": 0, ...} or {"n01440764": {"index": 0, "name": "tench",
          "concepts": ["fish"]}, ...}
    CSV   a header with `folder` and `index`, optionally `name` and `concepts` (names
          separated by `;`).
  Single-label: the model's scores are a softmax over its outputs.
- a `train:` model's own labels on the prepared dataset (models.synthnet.class_targets): the
  images of the `val` split (all images when there is none) annotated for the trained
  category; per class its first `limit` images where the class is present. Multi-label: each
  output is a sigmoid.

Each class has a set of related concept names (lower case): its `concepts` from the class-index
file, else its name (the folder name or `name`); for a `train:` model, the class's own concept
(the class is a label of the trained category, which is a concept of the dissection dataset).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnvis_pipeline.data.decode import read_rgb
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.input import to_unit_float
from cnnvis_pipeline.models.synthnet import class_targets

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class ClassData:
    """Images to classify: targets[i, j] says image i is evaluated for class j."""

    names: list[str]  # [K] class names
    outputs: np.ndarray  # int64 [K]: the model output of each class
    targets: np.ndarray  # bool [N, K]
    related: list[frozenset]  # [K] related concept names (lower case)
    multi_label: bool  # sigmoid per output (True) or softmax over outputs
    read: Callable[[np.ndarray, torch.device], torch.Tensor]  # rows -> float [B, 3, h, w] in [0, 1]
    source: str

    def __len__(self) -> int:
        return len(self.targets)


def _class_entry(folder: str, value, where: str) -> tuple[int, str, list[str]]:
    if isinstance(value, dict):
        if "index" not in value:
            raise CnnvisError(f"{where}: class {folder!r} has no `index`")
        index, name, concepts = value["index"], value.get("name", folder), value.get("concepts")
    else:
        index, name, concepts = value, folder, None
    try:
        index = int(index)
    except (TypeError, ValueError):
        raise CnnvisError(f"{where}: class {folder!r}: index {index!r} is not an integer") from None
    if index < 0:
        raise CnnvisError(f"{where}: class {folder!r}: index {index} is negative")
    if isinstance(concepts, str):
        concepts = [c for c in concepts.split(";") if c.strip()]
    return index, str(name), [str(c).strip() for c in (concepts or [str(name)])]


def read_class_index(path: str | Path) -> dict[str, tuple[int, str, list[str]]]:
    """folder -> (model output index, class name, related concept names) from a JSON or CSV
    class-index file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CnnvisError(f"{path}: cannot read the class-index file ({e.strerror})") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise CnnvisError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict) or not raw:
            raise CnnvisError(f"{path}: expected a JSON object folder -> class index")
        return {str(k): _class_entry(str(k), v, str(path)) for k, v in raw.items()}
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or not {"folder", "index"} <= set(rows[0]):
        raise CnnvisError(f"{path}: a CSV class-index file needs the columns folder,index")
    return {r["folder"]: _class_entry(r["folder"], {k: v for k, v in r.items() if v}, str(path))
            for r in rows}


def image_folder(root: str | Path, classes: str | Path, limit: int,
                 size: tuple[int, int]) -> ClassData:
    """An ImageFolder directory with its class-index file; images resized to `size`."""
    root = Path(root)
    if not root.is_dir():
        raise CnnvisError(f"config: ablation: images {str(root)!r} is not a directory")
    index = read_class_index(classes)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise CnnvisError(f"{classes}: no class index for the folders {unknown[:5]} of {root}")
    if not folders:
        raise CnnvisError(f"{root}: no class folders")
    files, labels = [], []
    for k, folder in enumerate(folders):
        found = sorted(p for p in (root / folder).iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
        files += found
        labels += [k] * len(found)
    if not files:
        raise CnnvisError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in its folders")
    targets = np.zeros((len(files), len(folders)), bool)
    targets[np.arange(len(files)), labels] = True

    def read(rows: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.cat([to_unit_float(np.array(read_rgb(files[int(i)])[None]), size, device)
                          for i in rows])

    return ClassData(names=[index[f][1] for f in folders],
                     outputs=np.array([index[f][0] for f in folders], np.int64),
                     targets=targets,
                     related=[frozenset(c.lower() for c in index[f][2]) for f in folders],
                     multi_label=False, read=read, source=str(root))


def own_labels(ds: PreparedDataset, category: str, limit: int,
               input_size: tuple[int, int] | None) -> ClassData:
    """A `train:` model's own labels: the first `limit` images of each class (see the module
    docstring); `input_size` as the model's spec (None = the dataset's size)."""
    multi_hot, names = class_targets(ds, category)
    splits = np.array(ds.meta["splits"])
    pool = np.flatnonzero(multi_hot[:, 0] >= 0)
    if (splits[pool] == "val").any():
        pool = pool[splits[pool] == "val"]
    chosen = np.zeros(multi_hot.shape, bool)
    for k in range(len(names)):
        have = pool[multi_hot[pool, k] > 0.5][:limit]
        chosen[have, k] = True
    rows = np.flatnonzero(chosen.any(1))
    if not len(rows):
        raise CnnvisError(f"ablation: no image of the dataset has a {category} label")

    def read(sel: np.ndarray, device: torch.device) -> torch.Tensor:
        idx = rows[np.asarray(sel)]
        return to_unit_float(np.ascontiguousarray(ds.images[idx]), input_size, device)

    return ClassData(names=list(names), outputs=np.arange(len(names), dtype=np.int64),
                     targets=chosen[rows], related=[frozenset([n.lower()]) for n in names],
                     multi_label=True, read=read, source=f"{category} labels")
