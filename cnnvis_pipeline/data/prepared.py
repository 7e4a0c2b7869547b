"""The prepared dataset: a dataset decoded once into packed arrays shared by every model.

- write_prepared(source, out_dir, size=, digest=, workers=W): the one writer; a source (Broden,
  ADE20K, COCO panoptic, a mask folder, merged, a segmenter's: data/sources/) gives each image
  and its label planes, the writer resizes them (images bilinear, labels nearest) into .npy
  arrays (written under a temporary name, renamed into place when complete), in W processes.
- prepare_dataset(broden_root, out_dir, workers=W): a Broden directory through that writer.
- PreparedDataset(out_dir): memory-mapped access, `batch(indices)` for the dissection; what
  other stages may read of it is declared by data/interface.py (PreparedData).
- dataset_digest(ds): the content digest of the dataset directory (data/manifest.py).
- PreparedDataset also opens a prepare receipt (what the workflow's prepare_dataset writes:
  JSON naming the shared prepared directory and the digest it must have).

Layout of a prepared directory:
  meta.json         categories (with kind pixel/image), concepts (label, name, category), image
                    names, splits, sizes, digest; `source_info` (the source's format, paths and
                    options) and `labels` ("annotations", or "predictions" of a segmenter)
  images.npy        uint8 [N, H, W, 3], every image resized (bilinear) to one size
  planes.npy        uint16 [N, P, sh, sw], the label planes of all pixel-level categories
                    (plane_category.npy int16 [P] says whose plane it is); 0 = unlabeled
  slots.npy         int32 [N, J], the concepts present in each image (-1 pads): the tally counts
                    only these
  present.npy       bool [N, C], whether the image has any label of category C
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cnnvis_pipeline.data.broden import BrodenDataset
from cnnvis_pipeline.data.interface import Batch
from cnnvis_pipeline.data.receipts import read_receipt
from cnnvis_pipeline.data.sources.base import Source
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir
from cnnvis_pipeline.progress import Progress

FORMAT_VERSION = 1  # (`digest` is the content digest, data/manifest.py; the arrays are unchanged)


def dataset_digest(ds: BrodenDataset) -> str:
    """The content digest of the dataset's directory (manifest.dataset_digest: every file's
    path, size and sha256), so that prepared arrays are keyed by what they were made from."""
    from cnnvis_pipeline.data.manifest import dataset_digest as content_digest

    return content_digest(ds.root)["digest"]


def _resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = (np.arange(h) * a.shape[0]) // h
    xs = (np.arange(w) * a.shape[1]) // w
    return a[ys][:, xs]


CHUNK = 64  # images per task of a parallel preparation


@dataclass
class _Plan:
    """What every row of a preparation needs: the source and the arrays' geometry."""

    source: Source
    tmp: Path
    ih: int
    iw: int
    sh: int
    sw: int
    planes_per_cat: dict
    concept_of: dict


_PLAN: _Plan | None = None  # set in the parent before a fork pool starts: children inherit it


def _fill_rows(plan: _Plan, lo: int, hi: int) -> tuple[np.ndarray, list[list[int]]]:
    """Decode images lo..hi-1 into the output arrays (opened for writing in place); return
    their `present` rows and present concepts. The same code runs serially and in workers."""
    src, ih, iw, sh, sw = plan.source, plan.ih, plan.iw, plan.sh, plan.sw
    images = np.load(plan.tmp / "images.npy", mmap_mode="r+")
    planes = np.load(plan.tmp / "planes.npy", mmap_mode="r+")
    present = np.zeros((hi - lo, len(src.categories)), bool)
    slots: list[list[int]] = []
    try:
        for i in range(lo, hi):
            img, decoded, image_labels = src.read(i)
            if img.shape[:2] != (ih, iw):
                img = np.asarray(Image.fromarray(img).resize((iw, ih), Image.BILINEAR))
            images[i] = img
            present_concepts: set[int] = set()
            k = 0
            for cat in src.pixel_categories:
                cat_planes = decoded.get(cat)
                for j in range(plan.planes_per_cat[cat]):
                    if cat_planes is not None and j < len(cat_planes):
                        p = cat_planes[j]
                        if p.shape != (sh, sw):
                            p = _resize_nearest(p, sh, sw)
                        planes[i, k + j] = p
                        # the labels present: nonzero bins of a count (faster than a sort)
                        for lab in np.flatnonzero(np.bincount(p.ravel())):
                            if lab and (int(lab), cat) in plan.concept_of:
                                present_concepts.add(plan.concept_of[(int(lab), cat)])
                    else:
                        planes[i, k + j] = 0
                k += plan.planes_per_cat[cat]
                if cat_planes is not None:
                    present[i - lo, src.categories.index(cat)] = True
            for cat, labels in image_labels.items():
                present[i - lo, src.categories.index(cat)] = True
                present_concepts.update(plan.concept_of[(lab, cat)] for lab in labels)
            slots.append(sorted(present_concepts))
        images.flush()
        planes.flush()
    finally:
        del images, planes
    return present, slots


def _fill_rows_in_worker(bounds: tuple[int, int]):
    return _fill_rows(_PLAN, *bounds)


def prepare_dataset(broden_root: str | Path, out_dir: str | Path, *, image_size: int | None = None,
                    progress: bool = True, digest: str | None = None,
                    workers: int = 1, split: str | None = None,
                    limit: int | None = None) -> Path:
    """Decode a Broden directory into `out_dir` (refuses to overwrite a complete one).

    `image_size` S: images S x S, segmentations at their ratio to the images
    (data/sources/broden.py); `split`, `limit`: a split and a deterministic subset.
    `digest`: the dataset's content digest when the caller has it (else it is computed)."""
    from cnnvis_pipeline.data.sources.broden import BrodenSource

    source = BrodenSource(broden_root, split=split, limit=limit)
    return write_prepared(source, out_dir, size=image_size, progress=progress,
                          digest=digest or dataset_digest(source.ds), workers=workers,
                          origin=str(Path(broden_root).resolve()))


def _run_chunks(plan: _Plan, n: int, out_dir: Path, workers: int, progress: bool):
    """Every chunk of rows, serially or in `workers` forked processes; (present, slots)."""
    global _PLAN
    chunks = [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)]
    workers = max(1, min(int(workers), len(chunks)))
    present_parts, slots = [], []
    if workers == 1:
        pool, results = None, (_fill_rows(plan, lo, hi) for lo, hi in chunks)
    else:
        # The workers fork before any other thread (the progress bar's) exists; they
        # inherit the plan instead of receiving it pickled.
        _PLAN = plan
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
        results = pool.map(_fill_rows_in_worker, chunks)  # in index order
    try:
        with tqdm(total=n, desc="prepare", unit="img", disable=not progress,
                  mininterval=2) as bar:
            # The first error raised is the first bad row's, with 1 worker or many.
            lines = Progress("prepare", n, enabled=progress)
            for (lo, hi), (pres, sl) in zip(chunks, results, strict=True):
                present_parts.append(pres)
                slots.extend(sl)
                bar.update(hi - lo)
                lines.update(hi - lo)
            lines.close()
    except BrokenProcessPool as e:
        raise CnnvisError(
            f"{out_dir}: a preparation worker process died ({e}; killed for memory?); "
            "nothing was kept; try fewer workers (the rule's threads)"
        ) from None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _PLAN = None
    present = (np.concatenate(present_parts) if present_parts
               else np.zeros((0, len(plan.source.categories)), bool))
    return present, slots


def write_prepared(source: Source, out_dir: str | Path, *, size: int | None, digest: str,
                   progress: bool = True, workers: int = 1, origin: str = "") -> Path:
    """The one writer: a source's images and labels into the arrays of the module docstring.

    `workers` > 1 decodes chunks of CHUNK images in that many forked processes, each writing its
    rows of the arrays in place; the result is the same bytes as with 1, and a bad file raises
    the same error (the first bad row in index order)."""
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists():
        raise CnnvisError(f"{out_dir}: a prepared dataset is already there; remove it to rebuild")
    n = len(source)
    ih, iw, sh, sw = source.geometry(size)
    planes_per_cat = source.planes_per_category()
    plane_category = [source.categories.index(c) for c in source.pixel_categories
                      for _ in range(planes_per_cat[c])]
    if max((c.label for c in source.concepts), default=0) > np.iinfo(np.uint16).max:
        raise CnnvisError(f"{origin}: label numbers above 65535 are not supported")

    # An incomplete leftover at out_dir (no meta.json, checked above) is replaced.
    with atomic_dir(out_dir) as tmp:
        for name, dtype, shape in (("images", np.uint8, (n, ih, iw, 3)),
                                   ("planes", np.uint16, (n, max(len(plane_category), 1), sh, sw))):
            # Sparse files of the final size; every row is written below (absent planes as 0).
            arr = np.lib.format.open_memmap(tmp / f"{name}.npy", "w+", dtype, shape)
            del arr
        plan = _Plan(source, tmp, ih, iw, sh, sw, planes_per_cat, source.concept_index())
        present, slots = _run_chunks(plan, n, out_dir, workers, progress)
        width = max(1, max((len(s) for s in slots), default=0))
        slot_arr = np.full((n, width), -1, np.int32)
        for i, s in enumerate(slots):
            slot_arr[i, : len(s)] = s
        np.save(tmp / "slots.npy", slot_arr)
        np.save(tmp / "present.npy", present)
        np.save(tmp / "plane_category.npy", np.asarray(plane_category, np.int16))
        meta = {
            "format": FORMAT_VERSION,
            "source": origin,
            "source_info": source.describe(),
            "labels": source.labels,
            "digest": digest,
            "n_images": n,
            "image_size": [ih, iw],
            "seg_size": [sh, sw],
            "categories": [
                {"name": c, "kind": "pixel" if c in source.pixel_categories else "image"}
                for c in source.categories
            ],
            "concepts": [
                {"label": c.label, "name": c.name, "category": c.category}
                for c in source.concepts
            ],
            "images": list(source.names),
            "splits": list(source.splits),
        }
        # meta.json is written last: its presence marks the directory complete.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


class PreparedDataset:
    """Memory-mapped view of a prepared directory. Other stages read only the members of
    data/interface.py's PreparedData (shapes and dtypes are documented there)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        want = None
        if self.path.is_file():  # a receipt of the workflow's prepare_dataset
            receipt = read_receipt(self.path, "prepared")
            self.path, want = Path(receipt["prepared"]), receipt["digest"]
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise CnnvisError(f"{self.path}: not a complete prepared dataset (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise CnnvisError(f"{meta_path}: prepared with another format version; prepare it again")
        if want is not None and self.meta.get("digest") != want:
            raise CnnvisError(
                f"{meta_path}: holds dataset digest {str(self.meta.get('digest'))[:16]}, but the "
                f"receipt asks for {want[:16]}; run the workflow again"
            )
        self.images = np.load(self.path / "images.npy", mmap_mode="r")
        self.planes = np.load(self.path / "planes.npy", mmap_mode="r")
        self.slots = np.load(self.path / "slots.npy")
        self.present = np.load(self.path / "present.npy")
        self.plane_category = np.load(self.path / "plane_category.npy").astype(np.int64)
        self.categories = [c["name"] for c in self.meta["categories"]]
        self.category_kind = [c["kind"] for c in self.meta["categories"]]
        self.concepts = self.meta["concepts"]
        self.concept_label = np.array([c["label"] for c in self.concepts], np.int64)
        self.concept_category = np.array(
            [self.categories.index(c["category"]) for c in self.concepts], np.int64
        )

    def __len__(self) -> int:
        return int(self.meta["n_images"])

    @property
    def digest(self) -> str:
        return self.meta["digest"]

    @property
    def seg_size(self) -> tuple[int, int]:
        return tuple(self.meta["seg_size"])

    def batch(self, indices) -> Batch:
        idx = np.asarray(indices, np.int64)
        # Sorted contiguous reads from the memory maps are the fast path; shards are contiguous.
        return Batch(
            indices=idx,
            images=np.ascontiguousarray(self.images[idx]),
            planes=np.ascontiguousarray(self.planes[idx]),
            slots=self.slots[idx],
            present=self.present[idx],
        )
