"""Dataset sources besides a Broden directory (docs/DATA_SOURCES.md), as the config's `dataset`
mapping names them:

  ade20k: DIR                                    data/sources/ade20k.py
  coco_panoptic: {images, annotations, masks}    data/sources/coco_panoptic.py
  masks: {images, masks, classes}                data/sources/masks.py
  concepts: [<a source above>, {colour: {}}, {masks: {masks, classes}}, ...]
                                                 data/sources/colour.py (merged concept sets)
  segmenter: {images, factory, checkpoint, classes, kwargs, mean, std}
                                                 data/sources/segmenter.py (predicted labels)
  options (any source, Broden's `path:` too): size, split, limit

- source_kind(dataset): which of them a `dataset` mapping is (None: a Broden directory).
- open_source(dataset, problems=None, predictions=None): the Source (base.py); with a
  `problems` list the structural problems are appended there instead of raised (validation
  lists them all); `predictions`: a segmenter's output directories, one per shard.
- source_paths(dataset): the files and directories it is made from, by role.
- source_digest(dataset, manifests=DIR): the content digest (every file's path, size and
  sha256 through data/manifest.py, per role) with the preparation options: the key of its
  prepared entry.
- size_estimate(dataset): images, sizes, planes and concepts without decoding (the resource
  plan's figures).
- write_source_digest(dataset, out, manifests=, name=): that digest as the workflow's digest file.
- options_digest(content, options): a Broden directory's content digest with its options.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cnnvis_pipeline.errors import CnnvisError

SOURCE_KINDS = ("ade20k", "coco_panoptic", "masks", "concepts", "segmenter")
OPTIONS = ("size", "split", "limit")
_FIELDS = {"coco_panoptic": ("images", "annotations", "masks"),
           "masks": ("images", "masks", "classes")}
_EXTRA_FIELDS = {"masks": ("masks", "classes"), "colour": (), "color": ()}


def source_kind(dataset: dict) -> str | None:
    kinds = [k for k in SOURCE_KINDS if k in dataset]
    return kinds[0] if kinds else None


def options(dataset: dict) -> dict:
    return {k: dataset[k] for k in OPTIONS if dataset.get(k) is not None}


def _fields(kind: str, value, where: str, fields: dict) -> dict:
    if not isinstance(value, dict) or set(value) != set(fields[kind]):
        raise CnnvisError(f"{where}: needs exactly the keys {', '.join(fields[kind])}")
    return value


def _open_one(kind: str, value, opts: dict, problems, where: str, predictions=None):
    from cnnvis_pipeline.data.sources.ade20k import Ade20kSource
    from cnnvis_pipeline.data.sources.coco_panoptic import CocoPanopticSource
    from cnnvis_pipeline.data.sources.masks import MasksSource

    split, limit = opts.get("split"), opts.get("limit")
    if kind == "segmenter":
        from cnnvis_pipeline.data.sources.segmenter import SegmenterSource

        if split is not None:
            raise CnnvisError(f"{where}: a segmenter's folder has no splits (drop `split`)")
        return SegmenterSource(_segmenter_fields(value, where), size=opts.get("size"),
                               limit=limit, predictions=predictions, problems=problems)
    if kind == "ade20k":
        return Ade20kSource(value, split=split, limit=limit, problems=problems)
    v = _fields(kind, value, where, _FIELDS)
    if kind == "coco_panoptic":
        return CocoPanopticSource(v["images"], v["annotations"], v["masks"], split=split,
                                  limit=limit, problems=problems)
    return MasksSource(v["images"], v["masks"], v["classes"], split=split, limit=limit,
                       problems=problems)


_SEGMENTER = {"required": ("images", "factory", "classes"),
              "optional": ("checkpoint", "kwargs", "mean", "std")}


def _segmenter_fields(value, where: str) -> dict:
    keys = set(value) if isinstance(value, dict) else set()
    if not isinstance(value, dict) or not set(_SEGMENTER["required"]) <= keys or keys - set(
            _SEGMENTER["required"] + _SEGMENTER["optional"]):
        raise CnnvisError(f"{where}: needs images, factory, classes (and optionally "
                          "checkpoint, kwargs, mean, std)")
    return value


def _entries(dataset: dict, where: str) -> list[tuple[str, object]]:
    entries = dataset["concepts"]
    if not isinstance(entries, list) or not entries:
        raise CnnvisError(f"{where}: concepts must be a list of sources, the first one with images")
    out = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise CnnvisError(f"{where}[{k}]: each entry is one mapping such as `ade20k: DIR` "
                              "or `colour: {}`")
        out.append(next(iter(entry.items())))
    kinds = [k for k, _ in out]
    if kinds[0] not in ("ade20k", "coco_panoptic", "masks"):
        raise CnnvisError(f"{where}[0]: the first entry gives the images: ade20k, coco_panoptic "
                          f"or masks, not {kinds[0]!r}")
    for k, kind in enumerate(kinds[1:], 1):
        if kind not in _EXTRA_FIELDS:
            raise CnnvisError(f"{where}[{k}]: {kind!r} cannot add concepts to another source's "
                              "images (colour, or masks: {masks, classes})")
    return out


def open_source(dataset: dict, problems: list[str] | None = None, *,
                predictions: list | None = None):
    """The Source of a `dataset` mapping of one of SOURCE_KINDS."""
    kind, opts, where = source_kind(dataset), options(dataset), "config: dataset"
    if kind is None:
        raise CnnvisError(f"{where}: none of {', '.join(SOURCE_KINDS)}")
    if kind != "concepts":
        return _open_one(kind, dataset[kind], opts, problems, f"{where}.{kind}", predictions)
    from cnnvis_pipeline.data.sources.colour import ColourLabels, MaskLabels, MergedSource

    entries = _entries(dataset, f"{where}.concepts")
    base = _open_one(*entries[0], opts, problems, f"{where}.concepts[0]")
    extras = []
    collect = [] if problems is None else problems
    for k, (kind, value) in enumerate(entries[1:], 1):
        if kind == "masks":
            v = _fields(kind, value, f"{where}.concepts[{k}].masks", _EXTRA_FIELDS)
            extras.append(MaskLabels(v["masks"], v["classes"], collect))
        else:
            extras.append(ColourLabels())
    if problems is None and collect:
        raise CnnvisError(collect[0])
    return MergedSource(base, extras)


def source_paths(dataset: dict) -> list[tuple[str, Path]]:
    """(role, path) of every file or directory a source is made from, without opening it."""
    kind = source_kind(dataset)
    if kind == "ade20k":
        return [("ade20k", Path(dataset["ade20k"]))]
    if kind == "segmenter":
        return _segmenter_paths(_segmenter_fields(dataset[kind], "config: dataset.segmenter"))
    if kind in _FIELDS:
        v = _fields(kind, dataset[kind], f"config: dataset.{kind}", _FIELDS)
        return [(f"{kind}.{f}", Path(v[f])) for f in _FIELDS[kind]]
    out = []
    for k, (sub, value) in enumerate(_entries(dataset, "config: dataset.concepts")):
        for role, path in source_paths({sub: value}) if k == 0 else [
                (f"{sub}.{f}", Path(value[f])) for f in _EXTRA_FIELDS[sub]]:
            out.append((f"concepts[{k}].{role}", path))
    return out


def _segmenter_paths(v: dict) -> list[tuple[str, Path]]:
    """The images, the classes, the checkpoint and the factory module's source files (found
    without importing it): what its predictions are made from."""
    from cnnvis_pipeline.data.manifest import module_source_files

    out = [("segmenter.images", Path(v["images"])), ("segmenter.classes", Path(v["classes"]))]
    if v.get("checkpoint"):
        out.append(("segmenter.checkpoint", Path(v["checkpoint"])))
    module = str(v["factory"]).partition(":")[0]
    for k, f in enumerate(module_source_files(module) or []):
        out.append((f"segmenter.factory[{k}]", Path(f)))
    return out


def _describe_entries(dataset: dict) -> object:
    """The spec without its paths (a copy elsewhere has the same digest)."""
    kind = source_kind(dataset)
    if kind == "segmenter":  # what changes predictions besides files
        v = dataset[kind]
        return [kind, v["factory"], v.get("kwargs"), v.get("mean"), v.get("std")]
    if kind != "concepts":
        return kind
    return [next(iter(e)) for e in dataset["concepts"]]


def source_digest(dataset: dict, *, manifests: str | Path | None = None) -> dict:
    """{"digest", "files", "bytes"}: every path's content (manifest.dataset_digest for a
    directory, file_sha256 for a file) and the options; raise CnnvisError naming a missing
    path."""
    from cnnvis_pipeline.data.manifest import dataset_digest, file_sha256

    parts, files, total = [], 0, 0
    for k, (role, path) in enumerate(source_paths(dataset)):
        cache = Path(manifests) / f"{k}.json" if manifests else None
        try:
            if path.is_dir():
                d = dataset_digest(path, cache=cache)
                parts.append([role, d["digest"]])
                files, total = files + d["files"], total + d["bytes"]
            elif path.is_file():
                parts.append([role, file_sha256(path, cache=cache)])
                files, total = files + 1, total + path.stat().st_size
            else:
                raise CnnvisError(f"{path}: does not exist (config: dataset, {role})")
        except OSError as e:
            raise CnnvisError(f"{e.filename or path}: cannot read ({e.strerror or e})") from None
    record = {"source": _describe_entries(dataset), "content": parts, "options": options(dataset)}
    text = "cnnvis-source-v1\n" + json.dumps(record, sort_keys=True)
    return {"digest": hashlib.sha256(text.encode()).hexdigest(), "files": files, "bytes": total}


def size_estimate(dataset: dict) -> tuple[int, tuple[int, int], tuple[int, int], int, int]:
    """(images, image size, segmentation size, planes, concepts) of a source's prepared arrays,
    without decoding: `size`, else the first image's header (what the resource plan needs)."""
    from cnnvis_pipeline.data.sources.base import most_common_size

    source = open_source(dataset)
    size = options(dataset).get("size")
    if size:
        hw = (size, size)
    else:
        hw = most_common_size([source.image_path(0)]) if len(source) else (224, 224)
    planes = sum(source.planes_per_category().values())
    return len(source), hw, hw, max(planes, 1), len(source.concepts)


def write_source_digest(dataset: dict, out: str | Path, *, manifests: str | Path | None,
                        name: str = "") -> dict:
    """The digest file of a source (a dataset-digest receipt), written only when it changes."""
    from cnnvis_pipeline.data.receipts import write_receipt

    record = source_digest(dataset, manifests=manifests)
    write_receipt(out, "dataset-digest", dataset=name, **record)
    return record


def options_digest(content: str, opts: dict) -> str:
    """A Broden directory's content digest, combined with its preparation options (the same
    digest when there are none, so that existing entries keep their names)."""
    if not opts:
        return content
    text = f"cnnvis-broden-options-v1\n{content}\n{json.dumps(opts, sort_keys=True)}"
    return hashlib.sha256(text.encode()).hexdigest()
