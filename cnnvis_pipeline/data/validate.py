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
a UTF-8 byte-order mark. index.csv is read a chunk of rows at a time and the chunk's files are
decoded on a thread pool, with progress lines in the log for large datasets; problems are listed up to a
limit per kind, then counted (data/problems.py), and a dataset whose rows mostly name missing
files stops early, so time and memory stay bounded.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.broden import (
    INDEX_FIXED,
    BrodenDataset,
    CsvRows,
    parse_label_categories,
    read_csv_rows,
    unknown_columns,
    unknown_columns_message,
)
from cnnvis_pipeline.data.decode import decode_label_png, known_label_table, read_rgb
from cnnvis_pipeline.data.problems import Problems, count_rows, missing_where
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.progress import Progress

SPLITS = ("train", "val")
PROGRESS_MIN_FILES = 2000  # progress lines from this many rows on
CHUNK_ROWS = 1000  # rows whose files are checked together (memory stays flat)
EARLY_ROWS = 1000  # from this many rows checked on, a mostly missing dataset stops early
EARLY_MISSING = 0.9  # ... when at least this share of the rows checked name missing files
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
    problems: Problems = field(default_factory=Problems)  # bounded per kind; .total: all
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


def _check_file(job: _FileCheck, known: np.ndarray) -> tuple[list[str], bool]:
    """(problems, whether the file is missing); known: bool [65536], True for 0 and every label
    number of label.csv."""
    # The header's size is checked against index.csv before decoding (a 30000x30000 header or a
    # 9500x9500 all-zero PNG is refused without allocating gigabytes).
    try:
        if job.kind == "image":
            arr = read_rgb(job.path, job.shape)
        else:
            arr = decode_label_png(job.path, job.shape)
    except CnnvisError as e:
        return [f"{job.where}: {e}"], not job.path.exists()
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
    return problems, False


def validation_report(root: Path, *, progress: bool = True,
                      workers: int | None = None) -> ValidationReport:
    """Every problem of the dataset at `root` (up to problems.LIMIT_PER_KIND of each kind, then
    their count) and its counts; CSV problems first, then index.csv's and its files' in line
    order. index.csv is read and its files checked a chunk of rows at a time; a dataset whose
    rows mostly name missing files stops early with one line saying what seems missing."""
    report = ValidationReport()
    if not root.is_dir():
        report.problems.append(f"{root}: dataset directory does not exist")
        return report
    categories = _check_categories(root, report)
    label_cats = _check_labels(root, categories, report)
    _check_category_tables(root, categories, set(label_cats), report.problems)
    index = _IndexCheck(root, categories, set(label_cats), report)
    if not index.check(progress=progress, workers=workers):
        report.problems.finish()
        return report
    if label_cats and not index.image_level_seen and not any(label_cats.values()) \
            and not index.stopped:
        report.problems.append(f"{root / 'label.csv'}: no labels belong to any category")
    report.problems.extend(msg for _, _, msg in sorted(index.problems))
    report.problems.finish()
    if index.stopped:
        report.problems.append(index.stopped)
    return report


def _check_categories(root: Path, report: ValidationReport) -> list[str]:
    """category.csv: the valid category names, in order."""
    problems = report.problems
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
    return categories


def _check_labels(root: Path, categories: list[str],
                  report: ValidationReport) -> dict[int, set[str]]:
    """label.csv: label number -> its categories that category.csv lists."""
    problems = report.problems
    label_path = root / "label.csv"
    label_cats: dict[int, set[str]] = {}
    for n, row in _read_table(label_path, ["number", "name", "category"], problems) or []:
        where = f"{label_path}: line {n}"
        number = _int(row.get("number"))
        if number is None:
            got = row.get("number")
            problems.append(f"{where}: column 'number' must be an integer, got {got!r}")
        elif number <= 0:
            problems.append(f"{where}: label number must be > 0 (0 is unlabeled)")
        elif number in label_cats:
            problems.append(f"{where}: duplicate label number {number}")
        else:
            label_cats[number] = _label_categories(row, where, categories, problems)
    report.labels = len(label_cats)
    return label_cats


def _label_categories(row: dict, where: str, categories: list[str],
                      problems: list[str]) -> set[str]:
    try:
        cats = parse_label_categories(row.get("category") or "", where=where)
    except CnnvisError as e:
        problems.append(str(e))
        cats = {}
    for c in cats:
        if categories and c not in categories:
            problems.append(f"{where}: category {c!r} is not in category.csv")
    return set(cats) & set(categories)


def _check_category_tables(root: Path, categories: list[str], label_numbers: set[int],
                           problems: list[str]) -> None:
    """c_<category>.csv, when present: integer label numbers of label.csv."""
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


class _IndexCheck:
    """index.csv row by row, and then every file it names. Its problems are kept as (line,
    order, message), so that a file's problems join its row's in line order."""

    def __init__(self, root: Path, categories: list[str], label_numbers: set[int],
                 report: ValidationReport):
        self.root, self.categories, self.label_numbers = root, categories, label_numbers
        self.report = report
        self.index_path = root / "index.csv"
        self.ds = BrodenDataset(root)  # for its path rule (relative, inside images/)
        self.problems: list[tuple[int, int, str]] = []
        self.jobs: list[_FileCheck] = []  # the files of the rows not yet checked
        self.rows_checked = self.rows_missing = self.total_rows = 0
        self.first_missing: Path | None = None
        self.stopped = ""
        self.known = None
        self.kinds: dict[str, tuple[str, int]] = {}  # category -> (kind, first line)
        self.seen_images: dict[str, int] = {}
        self.image_level_seen = False

    def add(self, line: int, message: str) -> None:
        if self.report.problems.keep(message):
            self.problems.append((line, len(self.problems), message))

    def resolve(self, line: int, rel: str, where: str) -> Path | None:
        try:
            return self.ds.resolve(rel, where=where)
        except CnnvisError as e:
            self.add(line, str(e))
            return None

    def check(self, *, progress: bool, workers: int | None) -> bool:
        """Check every row, and the files of each chunk of rows on a thread pool; False when
        index.csv cannot be read at all."""
        report = self.report
        rows = CsvRows(self.index_path, INDEX_FIXED + self.categories, report.problems,
                       duplicates=True)
        self.total_rows = count_rows(self.index_path)
        self.known = known_label_table(self.label_numbers)
        lines = Progress(f"validate {self.root.name}", self.total_rows, "rows",
                         enabled=progress and self.total_rows >= PROGRESS_MIN_FILES)
        with lines, ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            chunk = 0
            for n, row in rows:
                if not report.images and self.categories:
                    unknown = unknown_columns(rows.header, self.categories)
                    if unknown:
                        report.problems.append(unknown_columns_message(
                            self.index_path, unknown, self.root / "category.csv"))
                self._check_row(n, row)
                report.images += 1
                chunk += 1
                if chunk == CHUNK_ROWS:
                    self._check_files(pool, chunk)
                    lines.update(chunk)
                    chunk = 0
                    if self.stopped:
                        return True
            self._check_files(pool, chunk)
            lines.update(chunk)
        if rows.failed and not report.images:
            return False
        if not report.images:
            report.problems.append(f"{self.index_path}: the dataset has no images")
        return True

    def _check_row(self, n: int, row: dict) -> None:
        where = f"{self.index_path}: line {n}"
        if None in row:
            self.add(n, f"{where}: more cells than header columns")
        sizes = self._sizes(n, row, where)
        if "split" in row and (row["split"] or "").strip() not in SPLITS:
            self.add(n, f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
        split = (row.get("split") or "").strip()
        self.report.splits[split] = self.report.splits.get(split, 0) + 1
        if "image" in row:
            self._check_image(n, (row["image"] or "").strip(), where, _shape(sizes, "ih", "iw"))
        seg_shape = _shape(sizes, "sh", "sw")
        for cat in self.categories:
            entries = [e.strip() for e in (row.get(cat) or "").split(";") if e.strip()]
            if entries:
                self._check_cell(n, cat, entries, where, seg_shape)

    def _sizes(self, n: int, row: dict, where: str) -> dict[str, int]:
        """The valid ones of ih, iw, sh, sw."""
        sizes = {}
        for col in ("ih", "iw", "sh", "sw"):
            if col not in row:
                continue
            v = _int(row[col])
            if v is None or v <= 0:
                self.add(n, f"{where}: column {col!r} must be a positive integer, "
                         f"got {row[col]!r}")
            else:
                sizes[col] = v
        return sizes

    def _check_image(self, n: int, rel: str, where: str, shape) -> None:
        if rel in self.seen_images:
            self.add(n, f"{where}: image {rel!r} is listed twice (also line "
                     f"{self.seen_images[rel]})")
        self.seen_images.setdefault(rel, n)
        path = self.resolve(n, rel, where)
        if path is not None:
            self.jobs.append(_FileCheck(n, where, path, "image", shape))

    def _check_cell(self, n: int, cat: str, entries: list[str], where: str, seg_shape) -> None:
        """One category cell: PNG files (pixel-level) or label numbers (image-level), the same
        kind in every row."""
        is_png = [e.lower().endswith(".png") for e in entries]
        kind = "pixel" if all(is_png) else "image" if not any(is_png) else "mixed"
        if kind == "mixed":
            self.add(n, f"{where}: column {cat!r} mixes PNG files and label numbers")
            return
        first_kind, first_line = self.kinds.setdefault(cat, (kind, n))
        if first_kind != kind:
            self.add(
                n,
                f"{where}: column {cat!r} holds {_WHAT[kind]} but line {first_line} has "
                f"{_WHAT[first_kind]} (a category is either pixel-level or image-level)",
            )
            return
        for e in entries:
            if kind == "pixel":
                path = self.resolve(n, e, where)
                if path is not None:
                    self.jobs.append(_FileCheck(n, where, path, "png", seg_shape))
            elif not e.isdigit():
                self.add(n, f"{where}: column {cat!r}: {e!r} is not a label number")
            elif int(e) not in self.label_numbers:
                self.add(n, f"{where}: column {cat!r}: label {int(e)} is not in label.csv")
            else:
                self.image_level_seen = True

    def _check_files(self, pool: ThreadPoolExecutor, rows: int) -> None:
        """Decode the files of the last `rows` rows; stop early (self.stopped: the line that
        says so) when most rows checked so far name missing files."""
        jobs, self.jobs = self.jobs, []
        missing_lines = set()
        # a missing file is reported here (one stat); the pool decodes only files that exist
        there = [os.path.exists(j.path) for j in jobs]
        decoded = iter(pool.map(lambda j: _check_file(j, self.known),
                                [j for j, t in zip(jobs, there, strict=True) if t]))
        for job, t in zip(jobs, there, strict=True):
            found, missing = next(decoded) if t else _check_file(job, self.known)
            for message in found:
                self.add(job.line, message)
            if missing:
                missing_lines.add(job.line)
                self.first_missing = self.first_missing or job.path
        self.report.files_checked += len(jobs)
        self.rows_checked += rows
        self.rows_missing += len(missing_lines)
        if self.rows_checked >= EARLY_ROWS and \
                self.rows_missing >= EARLY_MISSING * self.rows_checked:
            where = missing_where(Path(os.path.realpath(self.root)), self.first_missing)
            self.stopped = (
                f"{self.root}: {where} seems missing: {self.rows_missing:,} of "
                f"{self.rows_checked:,} rows checked so far name missing files; validation "
                f"stopped early (index.csv has {self.total_rows:,} rows): copy the whole "
                "dataset, or give the directory that holds it"
            )


def _shape(sizes: dict[str, int], h: str, w: str) -> tuple[int, int] | None:
    return (sizes[h], sizes[w]) if {h, w} <= set(sizes) else None


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
