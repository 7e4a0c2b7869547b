"""Check a Broden-format dataset directory and report every problem at once.

- validate_broden(root): a list of problems, each naming the file and (where there is one) the
  line; empty when the dataset is fine. Unlike load_broden it does not stop at the first problem.
- `cnnvis validate DATASET_DIR`: prints the problems and exits 1, or prints a one-line summary and
  exits 0.

Checked: index.csv, category.csv and label.csv exist and have their columns (c_<category>.csv is
checked when present); category names, label numbers and label categories; every row's sizes and
split; every image and PNG named in index.csv is a relative path that resolves inside images/,
exists, has the size index.csv gives (ih x iw, sh x sw; read from the header, before decoding)
and decodes; segmentations are 8-bit RGB or RGBA PNGs; PNG label numbers and image-level labels
exist in label.csv; a category column holds either PNGs or label numbers; index.csv has no
column that category.csv does not list; duplicate rows; an empty dataset. CSVs may start with
a UTF-8 byte-order mark. Files are decoded on a thread pool, with a progress bar for large
datasets.
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnvis_pipeline.data.broden import (
    INDEX_FIXED,
    BrodenDataset,
    decode_label_png,
    known_label_table,
    parse_label_categories,
    read_csv_rows,
    read_rgb,
    unknown_columns,
    unknown_columns_message,
)
from cnnvis_pipeline.errors import CnnvisError

SPLITS = ("train", "val")
PROGRESS_MIN_FILES = 2000  # show a progress bar from this many files on
_CATEGORY_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_WHAT = {"pixel": "PNG files", "image": "label numbers"}


@dataclass
class _FileCheck:
    line: int
    where: str  # "index.csv: line n"
    path: Path
    kind: str  # "image" or "png"
    shape: tuple[int, int] | None  # expected (height, width), None if index.csv's was invalid


@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    images: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    labels: int = 0
    categories: int = 0
    files_checked: int = 0


def _read_table(path: Path, required: list[str], problems: list[str]):
    """Rows of a CSV as (line number, dict); None if unreadable. Missing columns are reported."""
    return read_csv_rows(path, required, problems, duplicates=True)


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _check_file(job: _FileCheck, known: np.ndarray) -> list[str]:
    """known: bool [65536], True for 0 and every label number of label.csv."""
    # The header's size is checked against index.csv before decoding (a 30000x30000 header or a
    # 9500x9500 all-zero PNG is refused without allocating gigabytes).
    try:
        if job.kind == "image":
            arr = read_rgb(job.path, job.shape)
        else:
            arr = decode_label_png(job.path, job.shape)
    except CnnvisError as e:
        return [f"{job.where}: {e}"]
    problems = []
    h, w = arr.shape[:2]
    if job.shape is not None and (h, w) != job.shape:
        what, names = ("image", "iw x ih") if job.kind == "image" else ("segmentation", "sw x sh")
        problems.append(
            f"{job.where}: {job.path}: {what} is {w}x{h}, index.csv says {names} = "
            f"{job.shape[1]}x{job.shape[0]}"
        )
    if job.kind == "png":
        bad = ~known[arr]  # one lookup per pixel: labels are R + 256 * G < 65536
        unknown = sorted(set(np.unique(arr[bad]).tolist())) if bad.any() else []
        if unknown:
            more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
            problems.append(
                f"{job.where}: {job.path}: label number(s) {unknown[:10]}{more} are not in "
                "label.csv"
            )
    return problems


def validation_report(root: Path, *, progress: bool = True, workers: int | None = None):
    report = ValidationReport()
    problems = report.problems
    if not root.is_dir():
        problems.append(f"{root}: dataset directory does not exist")
        return report

    # category.csv
    cat_path = root / "category.csv"
    categories: list[str] = []
    for n, row in _read_table(cat_path, ["name"], problems) or []:
        name = (row.get("name") or "").strip()
        if not _CATEGORY_NAME.match(name):
            problems.append(f"{cat_path}: line {n}: invalid category name {name!r}")
        elif name in categories:
            problems.append(f"{cat_path}: line {n}: duplicate category {name!r}")
        else:
            categories.append(name)
    if cat_path.is_file() and not categories:
        problems.append(f"{cat_path}: no categories")
    report.categories = len(categories)

    # label.csv
    label_path = root / "label.csv"
    label_cats: dict[int, set[str]] = {}
    for n, row in _read_table(label_path, ["number", "name", "category"], problems) or []:
        where = f"{label_path}: line {n}"
        number = _int(row.get("number"))
        if number is None:
            got = row.get("number")
            problems.append(f"{where}: column 'number' must be an integer, got {got!r}")
            continue
        if number <= 0:
            problems.append(f"{where}: label number must be > 0 (0 is unlabeled)")
            continue
        if number in label_cats:
            problems.append(f"{where}: duplicate label number {number}")
            continue
        try:
            cats = parse_label_categories(row.get("category") or "", where=where)
        except CnnvisError as e:
            problems.append(str(e))
            cats = {}
        for c in cats:
            if categories and c not in categories:
                problems.append(f"{where}: category {c!r} is not in category.csv")
        label_cats[number] = set(cats) & set(categories)
    report.labels = len(label_cats)
    label_numbers = set(label_cats)

    # c_<category>.csv, when present
    for cat in categories:
        cpath = root / f"c_{cat}.csv"
        if not cpath.exists():
            continue
        for n, row in _read_table(cpath, ["code", "number", "name"], problems) or []:
            number = _int(row.get("number"))
            if number is None:
                problems.append(
                    f"{cpath}: line {n}: column 'number' must be an integer, "
                    f"got {row.get('number')!r}"
                )
            elif number not in label_numbers:
                problems.append(f"{cpath}: line {n}: label {number} is not in label.csv")

    # index.csv
    index_path = root / "index.csv"
    rows = _read_table(index_path, INDEX_FIXED + categories, problems)
    if rows is None:
        return report
    if rows and categories:
        unknown = unknown_columns(list(rows[0][1]), categories)
        if unknown:
            problems.append(unknown_columns_message(index_path, unknown, cat_path))
    if not rows:
        problems.append(f"{index_path}: the dataset has no images")
    ds = BrodenDataset(root)  # for its path rule (relative, inside images/)
    index_problems: list[tuple[int, int, str]] = []  # (line, order, message)
    jobs: list[_FileCheck] = []
    kinds: dict[str, tuple[str, int]] = {}  # category -> (kind, first line)
    seen_images: dict[str, int] = {}
    image_level_seen = False

    def add(line: int, message: str) -> None:
        index_problems.append((line, len(index_problems), message))

    def resolve(line: int, rel: str, where: str) -> Path | None:
        try:
            return ds.resolve(rel, where=where)
        except CnnvisError as e:
            add(line, str(e))
            return None

    for n, row in rows:
        where = f"{index_path}: line {n}"
        if None in row:
            add(n, f"{where}: more cells than header columns")
        sizes = {}
        for col in ("ih", "iw", "sh", "sw"):
            if col not in row:
                continue
            v = _int(row[col])
            if v is None or v <= 0:
                add(n, f"{where}: column {col!r} must be a positive integer, got {row[col]!r}")
            else:
                sizes[col] = v
        if "split" in row and (row["split"] or "").strip() not in SPLITS:
            add(n, f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        split = (row.get("split") or "").strip()
        report.splits[split] = report.splits.get(split, 0) + 1
        if "image" in row:
            rel = (row["image"] or "").strip()
            if rel in seen_images:
                add(n, f"{where}: image {rel!r} is listed twice (also line {seen_images[rel]})")
            seen_images.setdefault(rel, n)
            path = resolve(n, rel, where)
            if path is not None:
                shape = (sizes["ih"], sizes["iw"]) if {"ih", "iw"} <= set(sizes) else None
                jobs.append(_FileCheck(n, where, path, "image", shape))
        seg_shape = (sizes["sh"], sizes["sw"]) if {"sh", "sw"} <= set(sizes) else None
        for cat in categories:
            entries = [e.strip() for e in (row.get(cat) or "").split(";") if e.strip()]
            if not entries:
                continue
            is_png = [e.lower().endswith(".png") for e in entries]
            kind = "pixel" if all(is_png) else "image" if not any(is_png) else "mixed"
            if kind == "mixed":
                add(n, f"{where}: column {cat!r} mixes PNG files and label numbers")
                continue
            first_kind, first_line = kinds.setdefault(cat, (kind, n))
            if first_kind != kind:
                add(
                    n,
                    f"{where}: column {cat!r} holds {_WHAT[kind]} but line {first_line} has "
                    f"{_WHAT[first_kind]} (a category is either pixel-level or image-level)",
                )
                continue
            if kind == "pixel":
                for e in entries:
                    path = resolve(n, e, where)
                    if path is not None:
                        jobs.append(_FileCheck(n, where, path, "png", seg_shape))
            else:
                for e in entries:
                    if not e.isdigit():
                        add(n, f"{where}: column {cat!r}: {e!r} is not a label number")
                    elif int(e) not in label_numbers:
                        add(n, f"{where}: column {cat!r}: label {int(e)} is not in label.csv")
                    else:
                        image_level_seen = True
    report.images = len(rows)

    if label_numbers and not image_level_seen and not any(label_cats.values()):
        problems.append(f"{label_path}: no labels belong to any category")

    # decode every image and PNG; order of results follows the jobs
    known = known_label_table(label_numbers)
    report.files_checked = len(jobs)
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(
        total=len(jobs),
        unit="file",
        desc=f"validate {root.name}",
        disable=not progress or len(jobs) < PROGRESS_MIN_FILES,
        file=sys.stderr,
        leave=False,
    )
    with bar, ThreadPoolExecutor(max_workers=workers) as pool:
        for job, found in zip(
            jobs, pool.map(lambda j: _check_file(j, known), jobs), strict=True
        ):
            bar.update(1)
            for message in found:
                add(job.line, message)
    problems.extend(msg for _, _, msg in sorted(index_problems))
    return report


def validate_broden(
    root: str | Path, *, progress: bool = True, workers: int | None = None
) -> list[str]:
    """Every problem of the Broden dataset at `root`, each naming its file and line."""
    return validation_report(Path(root), progress=progress, workers=workers).problems


def summary_line(root: Path, report: ValidationReport) -> str:
    splits = ", ".join(f"{v} {k}" for k, v in sorted(report.splits.items()))
    return (
        f"{root}: OK: {report.images} images ({splits}), {report.labels} labels, "
        f"{report.categories} categories, {report.files_checked} files checked"
    )
