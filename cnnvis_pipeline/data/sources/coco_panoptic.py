"""COCO panoptic segmentation as a source (docs/DATA_SOURCES.md).

  images: DIR         the images (`images[].file_name` of the JSON)
  annotations: JSON   `images[]` {id, file_name}, `annotations[]` {image_id, file_name,
                      segments_info[] {id, category_id, iscrowd, area, bbox}}, `categories[]`
                      {id, name, isthing, supercategory}
  masks: DIR          one PNG per annotation (`annotations[].file_name`): RGB, segment id =
                      R + 256 G + 256^2 B, 0 = unlabelled (void)

Concepts: the COCO categories, label number = category id, in category `thing` (isthing = 1)
or `stuff` (isthing = 0), each a pixel-level category with one plane. A segment with
`iscrowd: 1` (a region of many instances) is labelled with its category like any other segment:
dissection compares a unit with where a category is, not with instances. A segment id in a PNG
that its `segments_info` lacks is an error naming the PNG. `split` (train or val, default val)
only names the images' split: the JSON is one split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.sources.base import (
    Source,
    check_split,
    make_concepts,
    open_image,
    read_rgb_checked,
    select,
)
from cnnvis_pipeline.errors import CnnvisError

KINDS = ("thing", "stuff")


def _load_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CnnvisError(f"{path}: annotation JSON is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CnnvisError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise CnnvisError(f"{path}: expected a JSON object with images, annotations, categories")
    return data


def _field(path: Path, where: str, obj, key: str, kinds, problems: list[str]):
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kinds) or isinstance(
            obj.get(key), bool):
        problems.append(f"{path}: {where}: missing or invalid {key!r}")
        return None
    return obj[key]


def _categories(path: Path, data: dict, problems: list[str]) -> dict[int, tuple[str, str]]:
    out: dict[int, tuple[str, str]] = {}
    for k, c in enumerate(data.get("categories") or []):
        where = f"categories[{k}]"
        cid = _field(path, where, c, "id", int, problems)
        name = _field(path, where, c, "name", str, problems)
        isthing = c.get("isthing") if isinstance(c, dict) else None
        if isthing not in (0, 1, True, False):
            problems.append(f"{path}: {where}: missing or invalid 'isthing' (0 or 1)")
            continue
        if cid is None or name is None:
            continue
        if not 1 <= cid <= 65535 or cid in out:
            problems.append(f"{path}: {where}: id {cid} is a duplicate or outside 1..65535")
            continue
        out[cid] = (name, KINDS[0] if isthing else KINDS[1])
    if not out and not problems:
        problems.append(f"{path}: no categories")
    return out


def _segments(path: Path, where: str, ann, categories: dict, problems: list[str]) -> dict:
    """segments_info of one annotation: segment id -> category id."""
    out: dict[int, int] = {}
    infos = ann.get("segments_info") if isinstance(ann, dict) else None
    if not isinstance(infos, list):
        problems.append(f"{path}: {where}: missing or invalid 'segments_info'")
        return out
    for j, seg in enumerate(infos):
        at = f"{where}.segments_info[{j}]"
        sid = _field(path, at, seg, "id", int, problems)
        cid = _field(path, at, seg, "category_id", int, problems)
        if sid is None or cid is None:
            continue
        if cid not in categories:
            problems.append(f"{path}: {at}: category_id {cid} is not in categories")
        elif sid <= 0 or sid in out:
            problems.append(f"{path}: {at}: segment id {sid} is a duplicate or not positive")
        else:
            out[sid] = cid
    return out


class CocoPanopticSource(Source):
    kind = "coco_panoptic"

    def __init__(self, images: str | Path, annotations: str | Path, masks: str | Path, *,
                 split: str | None = None, limit: int | None = None,
                 problems: list[str] | None = None):
        super().__init__()
        strict = problems is None
        problems = [] if problems is None else problems
        check_split(split, annotations)
        self.images_dir, self.json, self.masks_dir = Path(images), Path(annotations), Path(masks)
        for d, what in ((self.images_dir, "image"), (self.masks_dir, "mask")):
            if not d.is_dir():
                problems.append(f"{d}: {what} directory does not exist")
        data = _load_json(self.json)
        cats = _categories(self.json, data, problems)
        files = {}
        for k, im in enumerate(data.get("images") or []):
            iid = _field(self.json, f"images[{k}]", im, "id", (int, str), problems)
            name = _field(self.json, f"images[{k}]", im, "file_name", str, problems)
            if iid is not None and name is not None:
                files[iid] = name
        items = []
        for k, ann in enumerate(data.get("annotations") or []):
            where = f"annotations[{k}]"
            iid = _field(self.json, where, ann, "image_id", (int, str), problems)
            png = _field(self.json, where, ann, "file_name", str, problems)
            segs = _segments(self.json, where, ann, cats, problems)
            if iid is None or png is None:
                continue
            if iid not in files:
                problems.append(f"{self.json}: {where}: image_id {iid} is not in images")
                continue
            items.append((files[iid], split or "val", self.images_dir / files[iid],
                          self.masks_dir / png, segs))
        if not items and not problems:
            problems.append(f"{self.json}: no annotations")
        self.items = select(items, limit)
        self.categories = [c for c in KINDS if any(k == c for _, k in cats.values())]
        self.pixel_categories = list(self.categories)
        self.concepts = make_concepts([(cid, name, kind) for kind in self.categories
                                       for cid, (name, k) in sorted(cats.items()) if k == kind])
        self.thing = np.array([cats.get(i, ("", ""))[1] == "thing"
                               for i in range(max(cats, default=0) + 1)], bool)
        self.names = [it[0] for it in self.items]
        self.splits = [it[1] for it in self.items]
        if strict and problems:
            raise CnnvisError(problems[0])

    def image_path(self, i: int) -> Path:
        return self.items[i][2]

    def files(self) -> list[Path]:
        return [self.images_dir, self.json, self.masks_dir]

    def read(self, i: int):
        _, _, image, png, segs = self.items[i]
        img = read_rgb_checked(image)
        with open_image(png, "panoptic PNG") as im:
            if im.format != "PNG" or im.mode not in ("RGB", "RGBA"):
                raise CnnvisError(f"{png}: panoptic annotation must be an RGB PNG (segment id "
                                  f"= R + 256 G + 256^2 B), not {im.format} {im.mode}")
            if (im.size[1], im.size[0]) != img.shape[:2]:
                raise CnnvisError(f"{png}: annotation is {im.size[0]}x{im.size[1]}, its image "
                                  f"is {img.shape[1]}x{img.shape[0]}")
            try:
                rgb = np.asarray(im.convert("RGB")).astype(np.int64)
            except (OSError, SyntaxError, ValueError) as e:
                raise CnnvisError(f"{png}: cannot decode panoptic PNG ({e})") from None
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        uniq, inverse = np.unique(ids, return_inverse=True)
        missing = [int(u) for u in uniq if u and int(u) not in segs]
        if missing:
            raise CnnvisError(f"{png}: segment id(s) {missing[:10]} are not in the segments_info "
                              f"of its annotation in {self.json}")
        lut = np.array([segs.get(int(u), 0) for u in uniq], np.int32)
        labels = lut[inverse.reshape(ids.shape)]
        thing = self.thing[labels] & (labels > 0)
        planes = {"thing": np.where(thing, labels, 0)[None],
                  "stuff": np.where(thing, 0, labels)[None]}
        return img, {c: planes[c] for c in self.categories}, {}

    def describe(self) -> dict:
        return {**super().describe(), "images": str(self.images_dir.resolve()),
                "annotations": str(self.json.resolve()), "masks": str(self.masks_dir.resolve())}
