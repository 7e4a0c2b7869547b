"""The prepared dataset: a Broden directory decoded once into packed arrays shared by every model.

- prepare_dataset(broden_root, out_dir): decode images and label planes into .npy arrays (written
  under a temporary name, renamed into place when complete).
- PreparedDataset(out_dir): memory-mapped access, `batch(indices)` for the dissection.
- dataset_digest(ds): the content digest of the dataset directory (data/manifest.py).
- PreparedDataset also opens a prepare receipt (what the workflow's prepare_dataset writes:
  JSON naming the shared prepared directory and the digest it must have).

Layout of a prepared directory:
  meta.json         categories (with kind pixel/image), concepts (label, name, category), image
                    names, splits, sizes, the number of planes per pixel-level category, digest
  images.npy        uint8 [N, H, W, 3], every image resized (bilinear) to one size
  planes.npy        uint16 [N, P, sh, sw], the label planes of all pixel-level categories
                    (plane_category.npy int16 [P] says whose plane it is); 0 = unlabeled
  slots.npy         int32 [N, J], the concepts present in each image (-1 pads): the tally counts
                    only these
  present.npy       bool [N, C], whether the image has any label of category C
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cnnvis_pipeline.data.broden import BrodenDataset, load_broden, write_csv
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir

FORMAT_VERSION = 1  # (`digest` is the content digest, data/manifest.py; the arrays are unchanged)
SLICE = 500  # images per slice of prepare_parallel, at least (broden-big's generation chunk)


def dataset_digest(ds: BrodenDataset) -> str:
    """The content digest of the dataset's directory (manifest.dataset_digest: every file's
    path, size and sha256), so that prepared arrays are keyed by what they were made from."""
    from cnnvis_pipeline.data.manifest import dataset_digest as content_digest

    return content_digest(ds.root)["digest"]


def _resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ys = (np.arange(h) * a.shape[0]) // h
    xs = (np.arange(w) * a.shape[1]) // w
    return a[ys][:, xs]


def prepare_dataset(broden_root: str | Path, out_dir: str | Path, *, image_size: int | None = None,
                    progress: bool = True, digest: str | None = None) -> Path:
    """Decode a Broden directory into `out_dir` (refuses to overwrite a complete one).

    `digest`: the dataset's content digest when the caller has it (else it is computed)."""
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists():
        raise CnnvisError(f"{out_dir}: a prepared dataset is already there; remove it to rebuild")
    ds = load_broden(broden_root)
    n = len(ds)
    # One image size and one segmentation size for the whole array: the most common ones.
    ih = image_size or int(np.bincount([r.ih for r in ds.records]).argmax())
    iw = image_size or int(np.bincount([r.iw for r in ds.records]).argmax())
    sh = int(np.bincount([r.sh for r in ds.records]).argmax())
    sw = int(np.bincount([r.sw for r in ds.records]).argmax())
    planes_per_cat = {
        c: max((len(r.pixel.get(c, [])) for r in ds.records), default=0) for c in ds.pixel_categories
    }
    plane_category = [ds.categories.index(c) for c in ds.pixel_categories for _ in range(planes_per_cat[c])]
    n_planes = len(plane_category)
    if max(ds.label_names) > np.iinfo(np.uint16).max:
        raise CnnvisError(f"{ds.root / 'label.csv'}: label numbers above 65535 are not supported")
    concept_of = ds.concept_index()

    # An incomplete leftover at out_dir (no meta.json, checked above) is replaced.
    with atomic_dir(out_dir) as tmp:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, ih, iw, 3))
        planes = np.lib.format.open_memmap(tmp / "planes.npy", "w+", np.uint16, (n, max(n_planes, 1), sh, sw))
        present = np.zeros((n, len(ds.categories)), bool)
        slots: list[list[int]] = []
        for i in tqdm(range(n), desc="prepare", unit="img", disable=not progress, mininterval=2):
            rec = ds.records[i]
            img = ds.read_image(i)
            if img.shape[:2] != (rec.ih, rec.iw):
                raise CnnvisError(
                    f"{ds.resolve(rec.image, where='')}: image is {img.shape[1]}x{img.shape[0]}, "
                    f"index.csv line {rec.row} says iw x ih = {rec.iw}x{rec.ih}"
                )
            if img.shape[:2] != (ih, iw):
                img = np.asarray(Image.fromarray(img).resize((iw, ih), Image.BILINEAR))
            images[i] = img
            present_concepts: set[int] = set()
            k = 0
            decoded = ds.read_planes(i)
            for cat in ds.pixel_categories:
                cat_planes = decoded.get(cat)
                c_idx = ds.categories.index(cat)
                for j in range(planes_per_cat[cat]):
                    if cat_planes is not None and j < len(cat_planes):
                        p = cat_planes[j]
                        if p.shape != (sh, sw):
                            p = _resize_nearest(p, sh, sw)
                        planes[i, k + j] = p
                        for lab in np.unique(p):
                            if lab and (int(lab), cat) in concept_of:
                                present_concepts.add(concept_of[(int(lab), cat)])
                    else:
                        planes[i, k + j] = 0
                k += planes_per_cat[cat]
                if cat_planes is not None:
                    present[i, c_idx] = True
            for cat, labels in rec.labels.items():
                present[i, ds.categories.index(cat)] = True
                present_concepts.update(concept_of[(lab, cat)] for lab in labels)
            slots.append(sorted(present_concepts))
        width = max(1, max(len(s) for s in slots))
        slot_arr = np.full((n, width), -1, np.int32)
        for i, s in enumerate(slots):
            slot_arr[i, : len(s)] = s
        np.save(tmp / "slots.npy", slot_arr)
        np.save(tmp / "present.npy", present)
        np.save(tmp / "plane_category.npy", np.asarray(plane_category, np.int16))
        images.flush()
        planes.flush()
        del images, planes
        meta = {
            "format": FORMAT_VERSION,
            "source": str(Path(broden_root).resolve()),
            "digest": digest or dataset_digest(ds),
            "n_images": n,
            "image_size": [ih, iw],
            "seg_size": [sh, sw],
            "categories": [
                {"name": c, "kind": "pixel" if c in ds.pixel_categories else "image"}
                for c in ds.categories
            ],
            "concepts": [
                {"label": c.label, "name": c.name, "category": c.category} for c in ds.concepts
            ],
            "images": [r.image for r in ds.records],
            "splits": [r.split for r in ds.records],
        }
        # meta.json is written last: its presence marks the directory complete.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out_dir


@dataclass
class Batch:
    indices: np.ndarray  # [B] image indices
    images: np.ndarray  # uint8 [B, H, W, 3]
    planes: np.ndarray  # uint16 [B, P, sh, sw]
    slots: np.ndarray  # int32 [B, J]
    present: np.ndarray  # bool [B, C]


def resolve_prepared(path: str | Path) -> Path:
    """The prepared directory `path` names: itself, or the one its prepare receipt names."""
    path = Path(path)
    if path.is_file():
        from cnnvis_pipeline.data.entries import read_receipt

        return Path(read_receipt(path, "prepared")["prepared"])
    return path


class PreparedDataset:
    """Memory-mapped view of a prepared directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        want = None
        if self.path.is_file():  # a receipt of the workflow's prepare_dataset
            from cnnvis_pipeline.data.entries import read_receipt

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


# -- parallel preparation -----------------------------------------------------------------------

def _prepare_slice(args) -> str:
    view, out = args
    prepare_dataset(view, out, progress=False)
    return out


def _npy_offset(path: Path) -> int:
    m = np.load(path, mmap_mode="r")
    try:
        return int(m.offset)
    finally:
        del m


def _append_bytes(src: Path, dst_fd: int, dst_offset: int) -> int:
    """Copy the data of .npy `src` into `dst_fd` at `dst_offset` (file I/O, no memory maps)."""
    start = _npy_offset(src)
    size = src.stat().st_size - start
    with open(src, "rb") as f:
        f.seek(start)
        done = 0
        while done < size:
            block = f.read(min(64 << 20, size - done))
            if not block:
                raise CnnvisError(f"{src}: truncated")
            view = memoryview(block)
            while len(view):
                n = os.pwrite(dst_fd, view, dst_offset + done)
                view, done = view[n:], done + n
    return size


def prepare_parallel(broden_root: str | Path, out_dir: str | Path, *, workers: int | None = None,
                     progress: bool = True, chunk: int = SLICE) -> Path:
    """prepare_dataset over slices of a Broden directory in parallel, joined into `out_dir`.

    Every slice is prepared by prepare_dataset itself (from a view directory sharing images/);
    the join checks that the slices agree on categories, concepts, sizes and planes and
    concatenates their arrays, so the result equals a serial prepare_dataset of the whole
    directory (same arrays and meta, same digest).
    """
    broden_root, out_dir = Path(broden_root).resolve(), Path(out_dir)
    if (out_dir / "meta.json").exists():
        raise CnnvisError(f"{out_dir}: a prepared dataset is already there; remove it to rebuild")
    with (broden_root / "index.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    workers = max(1, workers or os.cpu_count() or 1)
    n_slices = min(workers * 2, max(1, len(rows) // chunk))
    if n_slices <= 1:
        return prepare_dataset(broden_root, out_dir, progress=progress)
    # Slice boundaries on generation chunks, so every slice has every category and plane count.
    bounds = np.linspace(0, len(rows) // chunk, n_slices + 1).round().astype(int) * chunk
    bounds[-1] = len(rows)
    work = out_dir.with_name(f".{out_dir.name}.slices-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        jobs = []
        for k in range(n_slices):
            view = work / f"view{k:03d}"
            view.mkdir()
            for f in broden_root.glob("*.csv"):
                if f.name != "index.csv":
                    shutil.copy(f, view / f.name)
            (view / "images").symlink_to(broden_root / "images")
            write_csv(view / "index.csv", header, rows[bounds[k] : bounds[k + 1]])
            jobs.append((str(view), str(work / f"prep{k:03d}")))
        with mp.get_context("fork").Pool(min(workers, n_slices)) as pool:
            parts = [Path(p) for p in pool.map(_prepare_slice, jobs, chunksize=1)]
        metas = [json.loads((p / "meta.json").read_text()) for p in parts]
        same = ("categories", "concepts", "image_size", "seg_size")
        plane_cats = [np.load(p / "plane_category.npy") for p in parts]
        for m, pc, p in zip(metas, plane_cats, parts, strict=True):
            if any(m[k] != metas[0][k] for k in same) or not np.array_equal(pc, plane_cats[0]):
                raise CnnvisError(f"{p}: this slice disagrees with the first one; prepare serially")
        n = sum(m["n_images"] for m in metas)
        with atomic_dir(out_dir) as tmp:
            for name in ("images", "planes"):
                first = np.load(parts[0] / f"{name}.npy", mmap_mode="r")
                dtype, row_shape = first.dtype, first.shape[1:]
                del first
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                            "shape": (n, *row_shape)})
                fd = os.open(tmp / f"{name}.npy", os.O_WRONLY)
                try:
                    pos = os.fstat(fd).st_size  # the header just written
                    for p in parts:
                        pos += _append_bytes(p / f"{name}.npy", fd, pos)
                        (p / f"{name}.npy").unlink()  # keep the disk peak low
                finally:
                    os.close(fd)
            slots = [np.load(p / "slots.npy") for p in parts]
            width = max(s.shape[1] for s in slots)
            slots = np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-1)
                                    for s in slots])
            np.save(tmp / "slots.npy", slots)
            np.save(tmp / "present.npy", np.concatenate([np.load(p / "present.npy") for p in parts]))
            np.save(tmp / "plane_category.npy", plane_cats[0])
            meta = dict(metas[0])
            meta.update({
                "format": FORMAT_VERSION,
                "source": str(broden_root),
                "digest": dataset_digest(load_broden(broden_root)),
                "n_images": n,
                "images": [x for m in metas for x in m["images"]],
                "splits": [x for m in metas for x in m["splits"]],
            })
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir
