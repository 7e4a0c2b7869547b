"""Preparation of an ADE20K-shaped dataset read in place, against Broden's preparation of the
same images (images/s each).

    python -m cnnvis_pipeline.bench.sources --images 20000
    python -m cnnvis_pipeline.bench.sources --images 2000 --workers 1

Generates (not timed) an ADEChallengeData2016 layout of `--images` JPEGs of `--height` x
`--width` (half in training/, half in validation/) with 8-bit class-index annotation PNGs
(151 classes), objectInfo150.csv and sceneCategories.txt, and the same images as a Broden
directory (index.csv, category.csv, label.csv, R + 256 G segmentation PNGs; images hard-linked).
The images are drawn from a pool of `--distinct` different ones, so that generation stays
cheap; every file is still read and decoded. Then times, each with `--workers` processes:
`write_prepared` of the ADE20K source at `--size` (images bilinear, labels nearest) and
`prepare_dataset` of the Broden directory at the same size, and checks that both give the same
images and label planes. Prints one JSON line; asserts nothing else.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _pool(k: int, h: int, w: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """An image of coloured blocks and its class indices (1..150, some 0)."""
    by, bx = 6, 8
    classes = rng.integers(0, 151, (by, bx))
    palette = rng.integers(0, 256, (151, 3), dtype=np.uint8)
    ys = (np.arange(h) * by) // h
    xs = (np.arange(w) * bx) // w
    cls = classes[ys][:, xs]
    img = palette[cls] // 2 + rng.integers(0, 128, (h, w, 3), dtype=np.uint8)
    return img.astype(np.uint8), cls.astype(np.uint8)


def generate(root: Path, n: int, h: int, w: int, distinct: int, seed: int = 0) -> tuple[Path, Path]:
    """The ADE20K layout under root/ade and the same images as Broden under root/broden."""
    rng = np.random.default_rng(seed)
    ade, broden = root / "ade", root / "broden"
    pool = root / "pool"
    pool.mkdir(parents=True)
    for k in range(distinct):
        img, cls = _pool(k, h, w, rng)
        Image.fromarray(img).save(pool / f"{k}.jpg", quality=90)
        Image.fromarray(cls, "L").save(pool / f"{k}.png")
        seg = np.zeros((h, w, 3), np.uint8)
        seg[..., 0] = cls
        Image.fromarray(seg, "RGB").save(pool / f"{k}_seg.png")
    rows, scenes = [], []
    for i in range(n):
        split, prefix, j = (("training", "ADE_train", i + 1) if i < n // 2
                            else ("validation", "ADE_val", i - n // 2 + 1))
        stem, k = f"{prefix}_{j:08d}", i % distinct
        for src, dst in ((f"{k}.jpg", ade / "images" / split / f"{stem}.jpg"),
                         (f"{k}.png", ade / "annotations" / split / f"{stem}.png"),
                         (f"{k}.jpg", broden / "images" / split / f"{stem}.jpg"),
                         (f"{k}_seg.png", broden / "images" / split / f"{stem}_object.png")):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(pool / src, dst)
        scenes.append(f"{stem} scene{i % 7}")
        rows.append([f"{split}/{stem}.jpg", "train" if split == "training" else "val", h, w, h, w,
                     f"{split}/{stem}_object.png"])
    (ade / "sceneCategories.txt").write_text("\n".join(scenes) + "\n")
    names = [[i, 0.1, 1, 1, f"class{i}"] for i in range(1, 151)]
    _csv(ade / "objectInfo150.csv", ["Idx", "Ratio", "Train", "Val", "Name"], names)
    _csv(broden / "index.csv", ["image", "split", "ih", "iw", "sh", "sw", "object"], rows)
    _csv(broden / "category.csv", ["name", "first", "last", "count", "frequency"],
         [["object", 1, 150, 150, n]])
    _csv(broden / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
         [[i, f"class{i}", "object(1)", 1, 0.1, ""] for i in range(1, 151)])
    return ade, broden


def _csv(path: Path, header: list, rows: list) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def run(n: int, h: int, w: int, size: int, workers: int, distinct: int, scratch: Path) -> dict:
    from cnnvis_pipeline.data.prepared import prepare_dataset, write_prepared
    from cnnvis_pipeline.data.sources.ade20k import Ade20kSource

    t = time.perf_counter()
    ade, broden = generate(scratch, n, h, w, distinct)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    source = Ade20kSource(ade)
    write_prepared(source, scratch / "p_ade", size=size, digest="bench", workers=workers,
                   progress=False)
    ade_s = time.perf_counter() - t
    t = time.perf_counter()
    prepare_dataset(broden, scratch / "p_broden", image_size=size, digest="bench",
                    workers=workers, progress=False)
    broden_s = time.perf_counter() - t
    same = all(np.array_equal(np.load(scratch / "p_ade" / f, mmap_mode="r"),
                              np.load(scratch / "p_broden" / f, mmap_mode="r"))
               for f in ("images.npy", "planes.npy"))
    return {"images": n, "image_hw": [h, w], "size": size, "workers": workers,
            "cpus": os.cpu_count(), "generate_s": round(gen_s, 1),
            "ade20k_s": round(ade_s, 2), "ade20k_images_per_s": round(n / ade_s, 1),
            "broden_s": round(broden_s, 2), "broden_images_per_s": round(n / broden_s, 1),
            "same_arrays": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnnvis_pipeline.bench.sources",
                                description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--distinct", type=int, default=64, help="different images generated")
    p.add_argument("--workers", type=int, default=None, help="default: CPUs")
    p.add_argument("--scratch", default=None, help="a directory for the data (default: a "
                   "temporary one, removed after)")
    args = p.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        out = run(args.images, args.height, args.width, args.size, workers, args.distinct,
                  Path(tmp))
    print(json.dumps(out), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
