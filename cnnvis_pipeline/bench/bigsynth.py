"""broden-big: a fast generator of large Broden-format datasets for benchmarks.

- VOCABULARY: about 1,200 labels over the six Broden categories (object 584, part 234, scene 468,
  material 32, texture 47, color 11; some object labels are also parts or materials, as in Broden).
- generate_broden_big(out, n_images, image_size, seed, workers, chunk): write a complete Broden dir
  (index.csv, category.csv, label.csv, c_<category>.csv, JPEG images, R + 256 * G label PNGs).
  (It is prepared by cnnvis_pipeline.data.prepared.prepare_dataset, with workers.)

Content is simple but has the real shape of the workload: a "stuff" background of one or two
regions and two to seven ellipses and boxes with Zipf-distributed labels; parts in two layered
planes (upper half, inner core); materials and colours per region; image-level scene and texture
labels. Images come from four kinds of source, like Broden's (ADE-like: object, part, scene,
color; surfaces: material, object, color; Pascal-like: object, part, color; DTD-like: texture,
color), so some categories are missing from some images. Rendering is vectorised over chunks of
images; chunks are encoded in parallel processes. Output is a pure function of the arguments
(and does not depend on `workers`).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cnnvis_pipeline.data.broden import write_csv
from cnnvis_pipeline.data.synth import check_new_dataset
from cnnvis_pipeline.fileio import atomic_dir

VERSION = 1
CATEGORY_ORDER = ["object", "part", "scene", "material", "texture", "color"]
CHUNK = 500  # images per generation chunk (and per prepare slice boundary)

# Label numbers: one contiguous block per category; parts and materials also reuse object labels.
N_COLOR, N_OBJECT, N_PART_OWN, N_PART_SHARED = 11, 584, 84, 150
N_MATERIAL_OWN, N_MATERIAL_SHARED, N_SCENE, N_TEXTURE = 25, 7, 468, 47
COLOR_NAMES = ["black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red",
               "white", "yellow"]
PALETTE = np.array([(20, 20, 20), (40, 70, 200), (120, 70, 30), (40, 160, 50), (128, 128, 128),
                    (240, 140, 20), (240, 150, 190), (130, 40, 170), (210, 30, 30),
                    (235, 235, 235), (235, 215, 40)], np.int16)


def _vocabulary():
    """(number, name, {category: code}) for every label, and the label numbers per category."""
    first = 1
    color = np.arange(first, first + N_COLOR)
    first += N_COLOR
    obj = np.arange(first, first + N_OBJECT)
    first += N_OBJECT
    part_own = np.arange(first, first + N_PART_OWN)
    first += N_PART_OWN
    mat_own = np.arange(first, first + N_MATERIAL_OWN)
    first += N_MATERIAL_OWN
    scene = np.arange(first, first + N_SCENE)
    first += N_SCENE
    texture = np.arange(first, first + N_TEXTURE)
    members = {
        "color": color,
        "object": obj,
        "part": np.concatenate([obj[:N_PART_SHARED], part_own]),
        "material": np.concatenate([obj[N_PART_SHARED : N_PART_SHARED + N_MATERIAL_SHARED],
                                    mat_own]),
        "scene": scene,
        "texture": texture,
    }
    names = {int(n): COLOR_NAMES[i] for i, n in enumerate(color)}
    names.update({int(n): f"object{i:03d}" for i, n in enumerate(obj)})
    names.update({int(n): f"part{i:03d}" for i, n in enumerate(part_own)})
    names.update({int(n): f"material{i:02d}" for i, n in enumerate(mat_own)})
    names.update({int(n): f"scene{i:03d}" for i, n in enumerate(scene)})
    names.update({int(n): f"texture{i:02d}" for i, n in enumerate(texture)})
    return names, members


NAMES, MEMBERS = _vocabulary()
N_LABELS = len(NAMES)


def _zipf(rng: np.random.Generator, labels: np.ndarray, size, offset: float = 4.0) -> np.ndarray:
    p = 1.0 / (np.arange(len(labels)) + offset)
    return labels[rng.choice(len(labels), size=size, p=p / p.sum())]


def _render_chunk(seed: int, chunk: int, n: int, seg: int) -> dict:
    """Label maps and image-level labels of `n` images (vectorised over the chunk)."""
    rng = np.random.default_rng([seed, chunk])
    c = ((np.arange(seg) + 0.5) / seg).astype(np.float32)
    yy, xx = c[None, :, None], c[None, None, :]
    # Source: 0 ADE-like, 1 surfaces, 2 Pascal-like, 3 DTD-like. The first image of every chunk is
    # ADE-like with parts and a material, so every chunk has every category and both part planes.
    source = rng.choice(4, size=n, p=[0.5, 0.2, 0.2, 0.1])
    source[0] = 0
    has_part = (source == 0) & (rng.random(n) < 0.7) | (source == 2) & (rng.random(n) < 0.8)
    has_part[0] = True
    has_material = (source == 1) | (source == 0) & (rng.random(n) < 0.1)
    has_material[0] = True
    has_object = source != 3
    # Layers: 0 and 1 are the two "stuff" regions (upper, lower), 2.. the blobs painted in order.
    k_max = 7
    n_layers = k_max + 2
    split = np.where(rng.random(n) < 0.6, rng.uniform(0.3, 0.7, n), 2.0).astype(np.float32)
    top = np.broadcast_to((yy >= split[:, None, None]).astype(np.int8), (n, seg, seg)).copy()
    dtop = np.full((n, seg, seg), 2.0, np.float32)
    count = rng.integers(2, k_max + 1, n)
    cy = rng.uniform(0.1, 0.9, (n, n_layers)).astype(np.float32)
    cx = rng.uniform(0.1, 0.9, (n, n_layers)).astype(np.float32)
    ry = rng.uniform(0.06, 0.3, (n, n_layers)).astype(np.float32)
    rx = rng.uniform(0.06, 0.3, (n, n_layers)).astype(np.float32)
    box = rng.random((n, n_layers)) < 0.4
    for k in range(2, n_layers):
        dy = (yy - cy[:, k, None, None]) / ry[:, k, None, None]
        dx = (xx - cx[:, k, None, None]) / rx[:, k, None, None]
        d = np.where(box[:, k, None, None], np.maximum(np.abs(dy), np.abs(dx)),
                     np.sqrt(dy * dy + dx * dx))
        m = (d <= 1) & (count > k - 2)[:, None, None]
        top[m] = k
        np.copyto(dtop, d, where=m)
    obj = _zipf(rng, MEMBERS["object"], (n, n_layers))
    obj[:, :2] = _zipf(rng, MEMBERS["object"][:40], (n, 2), 2.0)
    mat = _zipf(rng, MEMBERS["material"], (n, n_layers), 2.0)
    mat[:, 2:] *= rng.random((n, k_max)) < 0.5
    col = rng.integers(0, N_COLOR, (n, n_layers))
    shade = rng.uniform(0.6, 1.15, (n, n_layers)).astype(np.float32)
    shade[:, 0], shade[:, 1] = 1.0, 0.8
    with_parts = rng.random((n, n_layers)) < 0.6
    with_parts[:, :2] = False
    upper = _zipf(rng, MEMBERS["part"], (n, n_layers)) * with_parts
    core = _zipf(rng, MEMBERS["part"], (n, n_layers)) * with_parts

    def pick(table):
        return np.take_along_axis(table.reshape(n, -1), top.reshape(n, -1).astype(np.intp),
                                  1).reshape(n, seg, seg)

    above = yy < pick(cy)
    part1 = np.where(above, pick(upper), 0)
    part2 = np.where(dtop <= 0.5, pick(core), 0)
    col_idx = pick(col)
    scene = np.where(source == 0, _zipf(rng, MEMBERS["scene"], n, 8.0), 0)
    texture = np.where(source == 3, _zipf(rng, MEMBERS["texture"], n, 3.0), 0)
    return {
        "source": source, "has_part": has_part, "has_material": has_material,
        "has_object": has_object, "object": pick(obj), "part": [part1, part2],
        "material": pick(mat), "color_index": col_idx, "color": MEMBERS["color"][col_idx],
        "shade": pick(shade), "scene": scene, "texture": texture,
        "noise": rng.integers(0, 1 << 20, n),
    }


def _noise_bank(size: int) -> np.ndarray:
    rng = np.random.default_rng(12345)
    return rng.normal(0, 10, (8, size + 16, size + 16, 3)).astype(np.int16)


def _png(labels: np.ndarray) -> bytes:
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_chunk(args) -> tuple[list[list], np.ndarray, np.ndarray]:
    """Render and encode one chunk; returns index.csv rows, label frequency and coverage."""
    tmp, seed, chunk, start, n, size = args
    seg = size // 2
    r = _render_chunk(seed, chunk, n, seg)
    bank = _noise_bank(size)
    freq = np.zeros(N_LABELS + 1, np.int64)
    cover = np.zeros(N_LABELS + 1, np.float64)
    rel_dir = f"big/{chunk:05d}"
    (Path(tmp) / "images" / rel_dir).mkdir(parents=True, exist_ok=True)
    # Pixels: the colour map's palette, shaded, upsampled (nearest) to the image size, plus noise.
    rgb = PALETTE[r["color_index"]] * r["shade"][..., None]
    rows = []
    for i in range(n):
        img = np.repeat(np.repeat(rgb[i], 2, axis=0), 2, axis=1)[:size, :size]
        if img.shape[0] < size:  # odd sizes are refused by the caller; keep this total anyway
            img = np.pad(img, ((0, size - img.shape[0]), (0, size - img.shape[1]), (0, 0)), "edge")
        k = int(r["noise"][i])
        oy, ox = k % 16, (k >> 4) % 16
        img = np.clip(img + bank[(k >> 8) % 8, oy : oy + size, ox : ox + size], 0, 255)
        base = f"{rel_dir}/{start + i:07d}"
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        (Path(tmp) / "images" / f"{base}.jpg").write_bytes(buf.getvalue())
        cells = dict.fromkeys(CATEGORY_ORDER, "")

        def put(cat: str, planes: list[np.ndarray], _base=base, _cells=cells) -> None:
            names = []
            for j, plane in enumerate(planes, start=1):
                name = f"{_base}_{cat}_{j}.png" if len(planes) > 1 else f"{_base}_{cat}.png"
                (Path(tmp) / "images" / name).write_bytes(_png(plane))
                names.append(name)
            stack = np.stack(planes).reshape(len(planes), -1)
            cover[:] += np.bincount(stack.ravel(), minlength=N_LABELS + 1) / stack.shape[1]
            freq[np.bincount(stack.ravel(), minlength=N_LABELS + 1) > 0] += 1
            _cells[cat] = ";".join(names)

        put("color", [r["color"][i]])
        if r["has_object"][i]:
            put("object", [r["object"][i]])
        if r["has_part"][i]:
            put("part", [r["part"][0][i], r["part"][1][i]])
        if r["has_material"][i]:
            put("material", [r["material"][i]])
        for cat in ("scene", "texture"):
            lab = int(r[cat][i])
            if lab:
                cells[cat] = str(lab)
                freq[lab] += 1
                cover[lab] += 1.0
        split = "val" if (start + i) % 10 == 9 else "train"
        rows.append([f"{base}.jpg", split, size, size, seg, seg] + [cells[c] for c in CATEGORY_ORDER])
    freq[0] = 0
    cover[0] = 0
    return rows, freq, cover


def _pool(workers: int):
    return mp.get_context("fork").Pool(workers)


def generate_broden_big(out: str | Path, n_images: int, image_size: int = 224, seed: int = 0,
                        workers: int | None = None, chunk: int = CHUNK) -> Path:
    """Write a Broden-format directory of `n_images` images (image_size px, segmentations half)."""
    out = check_new_dataset("broden-big", out, n_images, image_size)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        _write_dataset(tmp, n_images, image_size, seed, workers, chunk)
    return out


def _write_dataset(tmp: Path, n_images: int, image_size: int, seed: int, workers: int | None,
                   chunk: int) -> None:
    jobs = [(str(tmp), seed, k, s, min(chunk, n_images - s), image_size)
            for k, s in enumerate(range(0, n_images, chunk))]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        results = [_write_chunk(j) for j in jobs]
    else:
        with _pool(workers) as pool:
            results = pool.map(_write_chunk, jobs, chunksize=1)
    rows = [row for r in results for row in r[0]]
    freq = sum(r[1] for r in results)
    cover = sum(r[2] for r in results)
    write_csv(tmp / "index.csv", ["image", "split", "ih", "iw", "sh", "sw"] + CATEGORY_ORDER,
               rows)
    codes = {cat: {int(num): k + 1 for k, num in enumerate(MEMBERS[cat])}
             for cat in CATEGORY_ORDER}
    write_csv(tmp / "category.csv", ["name", "first", "last", "count", "frequency"],
               [[cat, int(MEMBERS[cat].min()), int(MEMBERS[cat].max()), len(MEMBERS[cat]),
                 int(freq[MEMBERS[cat]].sum())] for cat in CATEGORY_ORDER])
    label_rows = []
    for num in sorted(NAMES):
        cats = ";".join(f"{c}({codes[c][num]})" for c in CATEGORY_ORDER if num in codes[c])
        label_rows.append([num, NAMES[num], cats, int(freq[num]), f"{cover[num]:.4f}", ""])
    write_csv(tmp / "label.csv", ["number", "name", "category", "frequency", "coverage",
                                   "syns"], label_rows)
    for cat in CATEGORY_ORDER:
        write_csv(tmp / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [[codes[cat][int(num)], int(num), NAMES[int(num)], int(freq[num]),
                     f"{cover[num]:.4f}"] for num in MEMBERS[cat]])
