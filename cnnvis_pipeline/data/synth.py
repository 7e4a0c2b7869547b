"""broden-synth: a deterministic generator of small Broden-format datasets (the embedded default).

- LABELS: the label vocabulary (name, categories) of broden-synth, 36 labels, 37 concepts
  (label, category) over 6 categories.
- generate_broden_synth(out, n_images, image_size, seed): write a complete Broden directory.

Each image is a background of one or two material regions sharing one texture pattern, with one to
three coloured objects. The scene (image-level) decides the key object (present in 90% of its images), so a network
trained to classify scenes has reason to learn object detectors. Parts come in two layered planes
(upper/lower halves; rim/core), so one pixel carries two part labels. Some categories are missing
from some images (parts, materials, textures), as in the real Broden. "grass" is both a material
and an object, as some real Broden labels belong to several categories. The output is a pure
function of (n_images, image_size, seed): byte-identical files for the same arguments.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from cnnvis_pipeline.data.broden import write_csv
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir

CATEGORY_ORDER = ["object", "part", "scene", "material", "texture", "color"]
COLORS = {
    "red": (220, 30, 30),
    "green": (40, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "orange": (240, 140, 20),
    "purple": (140, 40, 180),
}
SHAPES = ["disc", "box", "triangle", "cross", "ring", "hbar", "vbar", "diamond"]
PARTS = ["upper", "lower", "rim", "core"]
MATERIALS = {  # name -> (base colour name, pattern contrast)
    "wood": ("orange", 0.35),
    "grass": ("green", 0.25),
    "water": ("blue", 0.2),
    "stone": ("white", 0.3),
    "metal": ("black", 0.15),
}
TEXTURES = ["striped", "checkered", "dotted", "zigzag", "plain"]
SCENES = {  # name -> (key object, likely material); boxes, vbars and grass are distractors
    "kitchen": ("disc", "wood"),
    "park": ("triangle", "grass"),
    "harbor": ("hbar", "water"),
    "street": ("cross", "stone"),
    "factory": ("diamond", "metal"),
    "stadium": ("ring", "grass"),
}
DISTRACTORS = ["box", "vbar", "grass"]


def _vocabulary() -> list[tuple[str, list[str]]]:
    """Label names in global-number order with their categories (number = position + 1)."""
    vocab: list[tuple[str, list[str]]] = []
    vocab += [(c, ["color"]) for c in COLORS]
    vocab += [(s, ["object"]) for s in SHAPES]
    vocab += [(p, ["part"]) for p in PARTS]
    vocab += [(m, ["material", "object"] if m == "grass" else ["material"]) for m in MATERIALS]
    vocab += [(s, ["scene"]) for s in SCENES]
    vocab += [(t, ["texture"]) for t in TEXTURES]
    return vocab


LABELS = _vocabulary()
NUMBER = {name: i + 1 for i, (name, _) in enumerate(LABELS)}


def _shape_mask(shape: str, yy, xx, cy, cx, r):
    dy, dx = (yy - cy) / r, (xx - cx) / r
    if shape in ("disc", "grass"):
        return dy**2 + dx**2 <= 1
    if shape == "box":
        return (abs(dy) <= 0.8) & (abs(dx) <= 0.8)
    if shape == "triangle":
        return (dy <= 0.8) & (dy >= -0.9) & (abs(dx) <= (dy + 0.9) * 0.6)
    if shape == "cross":
        return ((abs(dy) <= 0.25) & (abs(dx) <= 1)) | ((abs(dx) <= 0.25) & (abs(dy) <= 1))
    if shape == "ring":
        d = dy**2 + dx**2
        return (d <= 1) & (d >= 0.35)
    if shape == "hbar":
        return (abs(dy) <= 0.3) & (abs(dx) <= 1.2)
    if shape == "vbar":
        return (abs(dx) <= 0.3) & (abs(dy) <= 1.2)
    if shape == "diamond":
        return abs(dy) + abs(dx) <= 1
    raise ValueError(shape)


def _texture(texture: str, yy, xx, phase: float):
    """A pattern in [-1, 1] on the pixel grid (coordinates in pixels of a 64-px reference)."""
    if texture == "striped":
        return np.sign(np.sin((xx + phase) * 0.9))
    if texture == "checkered":
        return np.sign(np.sin((xx + phase) * 0.6) * np.sin((yy + phase) * 0.6))
    if texture == "dotted":
        return np.where((np.sin((xx + phase) * 0.8) * np.sin((yy + phase) * 0.8)) > 0.7, 1.0, -0.3)
    if texture == "zigzag":
        return np.sign(np.sin((yy + 2.5 * np.abs(((xx + phase) % 6) - 3)) * 0.9))
    return np.zeros_like(xx)


def _scene_layout(rng: np.random.Generator) -> dict:
    """Draw everything about one image except pixels: a plain dict of its content."""
    scene = list(SCENES)[rng.integers(len(SCENES))]
    key_object, likely_material = SCENES[scene]
    materials = [likely_material if rng.random() < 0.5 else list(MATERIALS)[rng.integers(5)]]
    split = None
    if rng.random() < 0.5:
        materials.append(list(MATERIALS)[rng.integers(5)])
        split = ("v" if rng.random() < 0.5 else "h", float(rng.uniform(0.3, 0.7)))
    shapes = [key_object] if rng.random() < 0.9 else []
    for _ in range(int(rng.integers(0, 3))):
        pool = DISTRACTORS if rng.random() < 0.85 else SHAPES
        shapes.append(pool[rng.integers(len(pool))])
    if not shapes:
        shapes.append(DISTRACTORS[rng.integers(len(DISTRACTORS))])
    shapes = [shapes[k] for k in rng.permutation(len(shapes))]  # the key object is not always on top
    objects = []
    for shape in shapes:
        objects.append(
            {
                "shape": shape,
                "color": "green" if shape == "grass" else list(COLORS)[rng.integers(len(COLORS))],
                "cy": float(rng.uniform(0.2, 0.8)),
                "cx": float(rng.uniform(0.2, 0.8)),
                "r": float(rng.uniform(0.13, 0.25)),
            }
        )
    return {
        "scene": scene,
        "materials": materials,
        "split": split,
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "phase": float(rng.uniform(0, 6)),
        "objects": objects,
        "has_part": bool(rng.random() < 0.7),
        "has_material": bool(rng.random() < 0.8),
        "has_texture": bool(rng.random() < 0.85),
        "noise_seed": int(rng.integers(2**31)),
    }


def _render_maps(layout: dict, size: int):
    """Label maps of a layout on a size x size grid of pixel centres (coordinates in [0, 1))."""
    c = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(c, c, indexing="ij")
    region = np.zeros((size, size), np.int64)
    if layout["split"] is not None:
        axis, pos = layout["split"]
        region = ((xx if axis == "v" else yy) >= pos).astype(np.int64)
    material = np.array([NUMBER[m] for m in layout["materials"]])[region]
    colour = np.array([NUMBER[MATERIALS[m][0]] for m in layout["materials"]])[region]
    obj = np.zeros((size, size), np.int32)
    upper_lower = np.zeros((size, size), np.int32)
    rim_core = np.zeros((size, size), np.int32)
    for o in layout["objects"]:
        m = _shape_mask(o["shape"], yy, xx, o["cy"], o["cx"], o["r"])
        obj[m] = NUMBER[o["shape"]]
        colour[m] = NUMBER[o["color"]]
        if o["shape"] != "grass":
            upper_lower[m] = np.where(yy[m] < o["cy"], NUMBER["upper"], NUMBER["lower"])
            inner = _shape_mask(o["shape"], yy, xx, o["cy"], o["cx"], o["r"] * 0.6)
            rim_core[m] = np.where(inner[m], NUMBER["core"], NUMBER["rim"])
        else:  # parts of later objects are hidden by an occluding grass patch
            upper_lower[m] = 0
            rim_core[m] = 0
    return {
        "material": material.astype(np.int32),
        "color": colour.astype(np.int32),
        "object": obj,
        "part": [upper_lower, rim_core],
    }


def _render_image(layout: dict, size: int) -> np.ndarray:
    maps = _render_maps(layout, size)
    rgb_of = {NUMBER[n]: np.array(v, np.float64) for n, v in COLORS.items()}
    img = np.zeros((size, size, 3), np.float64)
    for number, rgb in rgb_of.items():
        img[maps["color"] == number] = rgb
    scale = 64.0 / size
    yy, xx = np.meshgrid(np.arange(size) * scale, np.arange(size) * scale, indexing="ij")
    pattern = _texture(layout["texture"], yy, xx, layout["phase"])
    background = maps["object"] == 0
    contrast = np.array([MATERIALS[m][1] for m in layout["materials"]])
    region_contrast = np.zeros((size, size))
    for i, m in enumerate(layout["materials"]):
        region_contrast[maps["material"] == NUMBER[m]] = contrast[i]
    img[background] *= (1 + region_contrast * pattern)[background][:, None]
    noise = np.random.default_rng(layout["noise_seed"]).normal(0, 8, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _png_bytes(labels: np.ndarray) -> bytes:
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write_planes(images: Path, base: str, cat: str, planes: list[np.ndarray], freq: dict,
                  cover: dict) -> str:
    """Write one category's label planes as PNGs; count label frequency and coverage."""
    names = []
    for k, plane in enumerate(planes, start=1):
        name = f"{base}_{cat}_{k}.png" if len(planes) > 1 else f"{base}_{cat}.png"
        (images / name).write_bytes(_png_bytes(plane))
        names.append(name)
        for lab, cnt in zip(*np.unique(plane[plane > 0], return_counts=True), strict=True):
            cover[int(lab)] += cnt / plane.size
    for lab in np.unique(np.concatenate([p.ravel() for p in planes])):
        if lab > 0:
            freq[int(lab)] += 1
    return ";".join(names)


def check_new_dataset(kind: str, out: str | Path, n_images: int, image_size: int) -> Path:
    """`out` as a Path, if a generator of `kind` may write a new dataset there."""
    out = Path(out)
    if n_images < 1 or image_size < 8 or image_size % 2:
        raise CnnvisError(f"{kind}: n_images must be >= 1 and image_size an even number >= 8")
    if out.exists():
        raise CnnvisError(f"{out}: already exists; {kind} will not overwrite it")
    return out


def generate_broden_synth(out: str | Path, n_images: int = 1000, image_size: int = 64, seed: int = 0):
    """Write a Broden-format dataset to `out` (created; refuses to overwrite an existing one).

    The directory is built under a temporary name and renamed at the end, so an interrupted run
    never leaves a directory that looks complete.
    """
    out = check_new_dataset("broden-synth", out, n_images, image_size)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        seg = image_size // 2
        rng = np.random.default_rng(seed)
        freq = {n: 0 for n in NUMBER.values()}
        cover = {n: 0.0 for n in NUMBER.values()}
        rows = []
        for i in range(n_images):
            layout = _scene_layout(rng)
            base = f"synth/{i:06d}"
            (tmp / "images" / "synth").mkdir(exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(_render_image(layout, image_size)).save(buf, format="JPEG", quality=92)
            (tmp / "images" / f"{base}.jpg").write_bytes(buf.getvalue())
            maps = _render_maps(layout, seg)
            cells = {c: "" for c in CATEGORY_ORDER}

            def write(cat: str, planes: list[np.ndarray], base=base, cells=cells) -> None:
                cells[cat] = _write_planes(tmp / "images", base, cat, planes, freq, cover)

            write("color", [maps["color"]])
            if maps["object"].any():
                write("object", [maps["object"]])
            if layout["has_part"] and any(p.any() for p in maps["part"]):
                write("part", maps["part"])
            if layout["has_material"]:
                write("material", [maps["material"]])
            cells["scene"] = str(NUMBER[layout["scene"]])
            freq[NUMBER[layout["scene"]]] += 1
            cover[NUMBER[layout["scene"]]] += 1.0
            if layout["has_texture"]:
                cells["texture"] = str(NUMBER[layout["texture"]])
                freq[NUMBER[layout["texture"]]] += 1
                cover[NUMBER[layout["texture"]]] += 1.0
            split = "val" if i % 10 == 9 else "train"
            rows.append([f"{base}.jpg", split, image_size, image_size, seg, seg] + [cells[c] for c in CATEGORY_ORDER])

        write_csv(tmp / "index.csv", ["image", "split", "ih", "iw", "sh", "sw"] + CATEGORY_ORDER, rows)
        cat_rows, codes = [], {}
        for cat in CATEGORY_ORDER:
            members = [(name, NUMBER[name]) for name, cats in LABELS if cat in cats]
            codes[cat] = {num: k + 1 for k, (_, num) in enumerate(members)}
            nums = [num for _, num in members]
            cat_rows.append([cat, min(nums), max(nums), len(members), sum(freq[n] for n in nums)])
        write_csv(tmp / "category.csv", ["name", "first", "last", "count", "frequency"], cat_rows)
        label_rows = []
        for name, cats in LABELS:
            num = NUMBER[name]
            cat_field = ";".join(f"{c}({codes[c][num]})" for c in cats)
            label_rows.append([num, name, cat_field, freq[num], f"{cover[num]:.6f}", ""])
        write_csv(tmp / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], label_rows)
        for cat in CATEGORY_ORDER:
            body = [
                [codes[cat][NUMBER[name]], NUMBER[name], name, freq[NUMBER[name]], f"{cover[NUMBER[name]]:.6f}"]
                for name, cats in LABELS
                if cat in cats
            ]
            write_csv(tmp / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"], body)
    return out
