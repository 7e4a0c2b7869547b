"""Tiny datasets in the real formats, written from the formats' published definitions (not by
the package's writers), for tests/test_sources.py.

Every fixture shares one content: 32x32 images of a grey background with 8-pixel-aligned
rectangles: a pure red "car" and, in every other image, a pure blue "sky"; the rest is "wall"
except one unlabelled 8x8 corner. JPEG images are saved at quality 100 without chroma
subsampling, so flat 8x8 blocks decode to their colour.

- ADE20K (ADEChallengeData2016): images/{training,validation}/ADE_*_%08d.jpg,
  annotations/... PNG (8-bit grayscale, class index 0..150, 0 = unlabelled),
  objectInfo150.csv (Idx,Ratio,Train,Val,Name; Name = synonyms joined by ';'),
  sceneCategories.txt ("<image stem> <scene>").
- COCO panoptic: panoptic JSON (images[], annotations[].segments_info[] {id, category_id,
  iscrowd, area, bbox}, categories[] {id, name, isthing, supercategory}) and RGB PNGs whose
  segment id = R + 256 G + 256^2 B.
- masks: PNG of class indices per image (same stem) and a classes CSV as a spreadsheet saves it
  (BOM, CRLF, a quoted field).
- Broden: index.csv, category.csv, label.csv, segmentation PNGs with label = R + 256 G.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
GREY, RED, BLUE = (128, 128, 128), (255, 0, 0), (0, 0, 255)
# ADE20K's class indices (objectInfo150.csv of the release)
ADE = {1: "wall", 3: "sky", 13: "person;individual;someone;somebody;mortal;soul",
       21: "car;auto;automobile;machine;motorcar"}


def layout(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image k: uint8 RGB [32, 32, 3] and its classes (0 none, 1 wall, 2 car, 3 sky)."""
    img = np.full((SIZE, SIZE, 3), GREY, np.uint8)
    cls = np.ones((SIZE, SIZE), np.int32)
    y, x = 8 * (k % 3), 8 * ((k // 3) % 3)
    img[y:y + 8, x:x + 16] = RED
    cls[y:y + 8, x:x + 16] = 2
    if k % 2 == 0:
        img[24:32, 16:32] = BLUE
        cls[24:32, 16:32] = 3
    cls[0:8, 24:32] = np.where(cls[0:8, 24:32] == 1, 0, cls[0:8, 24:32])
    return img, cls


def save_jpeg(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=100, subsampling=0)


def save_png(arr: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def write_ade20k(root: Path, n_train: int = 4, n_val: int = 6) -> Path:
    ade_index = {0: 0, 1: 1, 2: 21, 3: 3}
    lut = np.array([ade_index[c] for c in range(4)], np.uint8)
    scenes = []
    k = 0
    for split, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        for j in range(1, n + 1):
            img, cls = layout(k)
            stem = f"{prefix}_{j:08d}"
            save_jpeg(img, root / "images" / split / f"{stem}.jpg")
            save_png(lut[cls], root / "annotations" / split / f"{stem}.png", "L")
            scenes.append(f"{stem} {'street' if k % 2 else 'highway'}")
            k += 1
    with (root / "objectInfo150.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        for idx in range(1, 151):
            w.writerow([idx, 0.01, 100, 10, ADE.get(idx, f"thing{idx};stuff{idx}")])
    (root / "sceneCategories.txt").write_text("\n".join(scenes) + "\n")
    return root


COCO_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "person"},
    {"id": 3, "name": "car", "isthing": 1, "supercategory": "vehicle"},
    {"id": 119, "name": "sky-other-merged", "isthing": 0, "supercategory": "sky"},
    {"id": 200, "name": "wall-other-merged", "isthing": 0, "supercategory": "wall"},
]


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1)]


def write_coco_panoptic(root: Path, n: int = 6) -> dict:
    """A panoptic_val2017.json, val2017/*.jpg and panoptic_val2017/*.png; the car of image 1 is
    a crowd segment (iscrowd 1). Segment ids are large (B and G channels used)."""
    cat_of_class = {1: 200, 2: 3, 3: 119}
    images, annotations = [], []
    for k in range(n):
        img, cls = layout(k)
        name = f"{k + 1:012d}"
        save_jpeg(img, root / "val2017" / f"{name}.jpg")
        ids = np.zeros((SIZE, SIZE), np.int64)
        segments = []
        for c, cat in cat_of_class.items():
            mask = cls == c
            if not mask.any():
                continue
            sid = 70000 + 1000 * c + k  # R + 256 G + 65536 B with B = 1
            ids[mask] = sid
            segments.append({"id": sid, "category_id": cat, "iscrowd": int(k == 1 and c == 2),
                             "area": int(mask.sum()), "bbox": _bbox(mask)})
        rgb = np.stack([ids % 256, (ids // 256) % 256, ids // 65536], -1).astype(np.uint8)
        save_png(rgb, root / "panoptic_val2017" / f"{name}.png", "RGB")
        images.append({"id": k + 1, "file_name": f"{name}.jpg", "height": SIZE, "width": SIZE})
        annotations.append({"image_id": k + 1, "file_name": f"{name}.png",
                            "segments_info": segments})
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations,
            "categories": COCO_CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    return {"images": str(root / "val2017"),
            "annotations": str(root / "annotations" / "panoptic_val2017.json"),
            "masks": str(root / "panoptic_val2017")}


MASK_CLASSES = [(1, "wall", "object"), (2, "car", "object"), (3, "sky, blue", "object")]


def write_masks(root: Path, n: int = 6, *, image_ext: str = ".png") -> dict:
    """images/img_k.png|jpg, masks/img_k.png (8-bit grayscale indices), classes.csv with a BOM,
    CRLF line ends, a header and a quoted name holding a comma."""
    for k in range(n):
        img, cls = layout(k)
        path = root / "images" / f"img_{k}{image_ext}"
        save_jpeg(img, path) if image_ext == ".jpg" else save_png(img, path, "RGB")
        save_png(cls.astype(np.uint8), root / "masks" / f"img_{k}.png", "L")
    rows = ["index,name,category"] + [f'{i},"{name}",{cat}' for i, name, cat in MASK_CLASSES]
    (root / "classes.csv").write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode())
    return {"images": str(root / "images"), "masks": str(root / "masks"),
            "classes": str(root / "classes.csv")}


def write_broden(root: Path, n: int = 6) -> Path:
    """The masks fixture's content in the Broden format (label = R + 256 G), PNG images."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        img, cls = layout(k)
        save_png(img, root / "images" / f"img_{k}.png", "RGB")
        seg = np.zeros((SIZE, SIZE, 3), np.uint8)
        seg[..., 0] = cls
        save_png(seg, root / "images" / f"img_{k}_object.png", "RGB")
        rows.append([f"img_{k}.png", "val", SIZE, SIZE, SIZE, SIZE, f"img_{k}_object.png"])
    for name, header, body in (
        ("index.csv", ["image", "split", "ih", "iw", "sh", "sw", "object"], rows),
        ("category.csv", ["name", "first", "last", "count", "frequency"], [["object", 1, 3, 3, 6]]),
        ("label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
         [[i, name, f"{cat}({n})", n, 0.1, ""] for i, name, cat in MASK_CLASSES]),
    ):
        with (root / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(body)
    return root
