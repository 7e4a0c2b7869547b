"""Reader for the Broden dataset format (docs/DATA_SOURCES.md).

- Concept: one (label, category) pair, the unit of dissection.
- ImageRecord: one row of index.csv, its pixel-level planes and image-level labels.
- BrodenDataset: the parsed CSVs of a dataset directory; reads images and decodes label planes.
- load_broden(root): parse and check a dataset directory (errors name the file and row).
- read_csv_rows, write_csv, parse_label_categories, unknown_columns: the CSV rules, shared with
  the validator (data/validate.py).

The files themselves are decoded by data/decode.py (`decode_label_png`: a segmentation PNG to
global label numbers, R + 256 * G).

Category columns follow category.csv (any order); a category is pixel-level when its cells list PNG
files and image-level when they list label numbers. Every path is resolved and must stay inside
the dataset's images/ directory.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.decode import decode_label_png, known_label_table, read_rgb
from cnnvis_pipeline.errors import CnnvisError

INDEX_FIXED = ["image", "split", "ih", "iw", "sh", "sw"]
_CAT_FIELD = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*(?:\((\d+)\))?\s*$")


@dataclass(frozen=True)
class Concept:
    index: int  # position in BrodenDataset.concepts
    label: int  # global label number
    name: str
    category: str


@dataclass
class ImageRecord:
    row: int  # 1-based line number in index.csv (the header is line 1)
    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    pixel: dict[str, list[str]] = field(default_factory=dict)  # category -> PNG paths
    labels: dict[str, list[int]] = field(default_factory=dict)  # image-level category -> labels


class CsvRows:
    """The rows of a CSV as (line number, dict), read one at a time; each problem (missing file
    or column, duplicate column when `duplicates`, not UTF-8, malformed) is appended to
    `problems`, and `failed` says the file could not be read to its end."""

    def __init__(self, path: Path, required: list[str], problems: list[str], *,
                 duplicates: bool = False):
        self.path, self.required, self.problems = path, required, problems
        self.duplicates = duplicates
        self.failed = False
        self.header: list[str] = []

    def __iter__(self):
        path, problems = self.path, self.problems
        if not path.is_file():
            problems.append(f"{path}: required file is missing")
            self.failed = True
            return
        try:
            # utf-8-sig: a spreadsheet's "CSV UTF-8" export starts with a byte-order mark
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = self.header = reader.fieldnames or []
                missing = [c for c in self.required if c not in header]
                if missing:
                    problems.append(f"{path}: line 1: missing column(s) {', '.join(missing)}")
                dupes = sorted({c for c in header if header.count(c) > 1}) \
                    if self.duplicates else []
                if dupes:
                    problems.append(f"{path}: line 1: duplicate column(s) {', '.join(dupes)}")
                for row in reader:
                    yield reader.line_num, row
        except UnicodeDecodeError as e:
            problems.append(f"{path}: not UTF-8 text ({e})")
            self.failed = True
        except csv.Error as e:
            problems.append(f"{path}: malformed CSV ({e})")
            self.failed = True


def read_csv_rows(path: Path, required: list[str], problems: list[str], *,
                  duplicates: bool = False) -> list[tuple[int, dict]] | None:
    """Rows of a CSV as (line number, dict), or None if unreadable (see CsvRows)."""
    reader = CsvRows(path, required, problems, duplicates=duplicates)
    rows = list(reader)
    return None if reader.failed else rows


def _read_csv(path: Path, required: list[str]) -> list[dict[str, str]]:
    problems: list[str] = []
    rows = read_csv_rows(path, required, problems)
    if problems:
        raise CnnvisError(problems[0])
    return [row for _, row in rows]


def write_csv(path: Path, header: list[str], rows) -> None:
    """A Broden CSV as the generators write it (UTF-8, `\\n` line ends)."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _int(path: Path, row: int, column: str, value: str | None) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise CnnvisError(
            f"{path}: line {row}: column {column!r} must be an integer, got {value!r}"
        ) from None


def unknown_columns(header: list, categories: list[str]) -> list[str]:
    """index.csv columns that are neither fixed nor a category of category.csv."""
    return [c for c in header if c is not None and c not in INDEX_FIXED and c not in categories]


def unknown_columns_message(index_path: Path, unknown: list[str], cat_path: Path) -> str:
    return (f"{index_path}: line 1: column(s) {', '.join(map(repr, unknown))} are not "
            f"categories of {cat_path}; add them there or remove the column(s) (they would "
            "be ignored)")


def parse_label_categories(text: str, *, where: str) -> dict[str, int]:
    """Parse label.csv's category field, e.g. 'material(36);object(3)' -> {material: 36, object: 3}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        m = _CAT_FIELD.match(part)
        if not m:
            raise CnnvisError(f"{where}: malformed category entry {part!r}")
        out[m.group(1)] = int(m.group(2) or 0)
    return out


class BrodenDataset:
    """A parsed Broden-format directory. Construct with load_broden(root)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.categories: list[str] = []
        self.pixel_categories: list[str] = []
        self.image_categories: list[str] = []
        self.label_names: dict[int, str] = {}
        self.label_categories: dict[int, dict[str, int]] = {}
        self.records: list[ImageRecord] = []
        self.concepts: list[Concept] = []

    def __len__(self) -> int:
        return len(self.records)

    # -- paths --------------------------------------------------------------------------------
    def resolve(self, rel: str, *, where: str) -> Path:
        """Path of a file named in index.csv; refuses absolute paths and escapes from images/."""
        if not rel or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
            raise CnnvisError(f"{where}: path {rel!r} must be relative to images/")
        # As Path.resolve() of the whole path (symbolic links followed), with each directory
        # resolved once per dataset: a dataset names 10^5 files in a few directories.
        cache = self.__dict__.setdefault("_resolved_dirs", {})
        if "" not in cache:
            cache[""] = os.path.realpath(self.images_dir)
        base = cache[""]
        head, name = os.path.split(rel)
        if name in ("", ".", ".."):
            full = os.path.realpath(os.path.join(self.images_dir, rel))
        else:
            d = cache.get(head)
            if d is None:
                d = cache[head] = os.path.realpath(os.path.join(self.images_dir, head))
            full = os.path.join(d, name)
            if os.path.islink(full):
                full = os.path.realpath(full)
        if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
            raise CnnvisError(f"{where}: path {rel!r} resolves outside the dataset's images/")
        return Path(full)

    # -- reading ------------------------------------------------------------------------------
    def read_image(self, i: int) -> np.ndarray:
        rec = self.records[i]
        return read_rgb(self.resolve(rec.image, where=self._where(rec)), (rec.ih, rec.iw))

    def read_planes(self, i: int) -> dict[str, np.ndarray]:
        """Pixel-level label planes of image i: category -> int32 [planes, sh, sw]."""
        rec = self.records[i]
        out = {}
        for cat, files in rec.pixel.items():
            planes = []
            for rel in files:
                path = self.resolve(rel, where=self._where(rec))
                plane = decode_label_png(path, (rec.sh, rec.sw))
                if plane.shape != (rec.sh, rec.sw):
                    raise CnnvisError(
                        f"{path}: segmentation is {plane.shape[1]}x{plane.shape[0]}, "
                        f"index.csv line {rec.row} says sw x sh = {rec.sw}x{rec.sh}"
                    )
                known = self._known_labels()
                bad = ~known[plane]  # a lookup per pixel (label = R + 256 * G < 65536)
                unknown = set(np.unique(plane[bad]).tolist()) if bad.any() else None
                if unknown:
                    raise CnnvisError(
                        f"{path}: label number(s) {sorted(unknown)[:10]} are not in label.csv"
                    )
                planes.append(plane)
            out[cat] = np.stack(planes)
        return out

    def _known_labels(self) -> np.ndarray:
        if getattr(self, "_known", None) is None:
            self._known = known_label_table(self.label_names)
        return self._known

    def _where(self, rec: ImageRecord) -> str:
        return f"{self.root / 'index.csv'}: line {rec.row}"

    def concept_index(self) -> dict[tuple[int, str], int]:
        return {(c.label, c.category): c.index for c in self.concepts}


def load_broden(root: str | Path) -> BrodenDataset:
    """Parse a Broden-format directory's CSVs; raise CnnvisError naming the file and row."""
    root = Path(root)
    if not root.is_dir():
        raise CnnvisError(f"{root}: dataset directory does not exist")
    ds = BrodenDataset(root)
    ds.categories = _read_categories(root / "category.csv")
    _read_labels(ds, root / "label.csv")
    kinds = _read_index(ds, root / "index.csv")
    ds.pixel_categories = [c for c in ds.categories if kinds.get(c) == "pixel"]
    ds.image_categories = [c for c in ds.categories if kinds.get(c) == "image"]
    ds.concepts = _concepts(ds)
    if not ds.concepts:
        raise CnnvisError(f"{root / 'label.csv'}: no labels belong to any category")
    return ds


def _read_categories(cat_path: Path) -> list[str]:
    categories: list[str] = []
    for n, row in enumerate(_read_csv(cat_path, ["name"]), start=2):
        name = (row.get("name") or "").strip()
        if not name or not _CAT_FIELD.match(name) or "(" in name:
            raise CnnvisError(f"{cat_path}: line {n}: invalid category name {name!r}")
        if name in categories:
            raise CnnvisError(f"{cat_path}: line {n}: duplicate category {name!r}")
        categories.append(name)
    if not categories:
        raise CnnvisError(f"{cat_path}: no categories")
    return categories


def _read_labels(ds: BrodenDataset, label_path: Path) -> None:
    """label.csv into ds.label_names and ds.label_categories."""
    for n, row in enumerate(_read_csv(label_path, ["number", "name", "category"]), start=2):
        number = _int(label_path, n, "number", row.get("number"))
        if number <= 0:
            raise CnnvisError(f"{label_path}: line {n}: label number must be > 0 (0 is unlabeled)")
        if number in ds.label_names:
            raise CnnvisError(f"{label_path}: line {n}: duplicate label number {number}")
        cats = parse_label_categories(row.get("category", ""), where=f"{label_path}: line {n}")
        for c in cats:
            if c not in ds.categories:
                raise CnnvisError(
                    f"{label_path}: line {n}: category {c!r} is not in category.csv "
                    f"({', '.join(ds.categories)})"
                )
        ds.label_names[number] = (row.get("name") or "").strip() or f"label{number}"
        ds.label_categories[number] = cats


def _read_index(ds: BrodenDataset, index_path: Path) -> dict[str, str]:
    """index.csv into ds.records; return each category's kind (pixel or image)."""
    rows = _read_csv(index_path, INDEX_FIXED + ds.categories)
    if not rows:
        raise CnnvisError(f"{index_path}: the dataset has no images")
    unknown = unknown_columns(list(rows[0]), ds.categories)
    if unknown:
        raise CnnvisError(unknown_columns_message(index_path, unknown,
                                                  ds.root / "category.csv"))
    kinds: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):
        where = f"{index_path}: line {n}"
        rec = _record(ds, index_path, n, row, where)
        for cat in ds.categories:
            entries = [e.strip() for e in (row[cat] or "").split(";") if e.strip()]
            if entries:
                _read_cell(ds, rec, cat, entries, kinds, where)
        ds.records.append(rec)
    return kinds


def _record(ds: BrodenDataset, index_path: Path, n: int, row: dict, where: str) -> ImageRecord:
    """Line `n` of index.csv without its category cells; its image path checked."""
    if None in row:
        raise CnnvisError(f"{where}: more cells than header columns")
    rec = ImageRecord(
        row=n,
        image=(row["image"] or "").strip(),
        split=(row["split"] or "").strip(),
        ih=_int(index_path, n, "ih", row["ih"]),
        iw=_int(index_path, n, "iw", row["iw"]),
        sh=_int(index_path, n, "sh", row["sh"]),
        sw=_int(index_path, n, "sw", row["sw"]),
    )
    if min(rec.ih, rec.iw, rec.sh, rec.sw) <= 0:
        raise CnnvisError(f"{where}: ih, iw, sh, sw must be positive")
    ds.resolve(rec.image, where=where)
    return rec


def _read_cell(ds: BrodenDataset, rec: ImageRecord, cat: str, entries: list[str],
               kinds: dict[str, str], where: str) -> None:
    """One category cell of `rec`: PNG paths (pixel-level) or label numbers (image-level), the
    same kind in every row (`kinds`)."""
    is_png = [e.lower().endswith(".png") for e in entries]
    kind = "pixel" if all(is_png) else "image" if not any(is_png) else "mixed"
    if kind == "mixed" or kinds.setdefault(cat, kind) != kind:
        raise CnnvisError(
            f"{where}: column {cat!r} mixes PNG files and label numbers "
            "(a category is either pixel-level or image-level)"
        )
    if kind == "pixel":
        for e in entries:
            ds.resolve(e, where=where)
        rec.pixel[cat] = entries
        return
    labels = []
    for e in entries:
        if not e.isdigit():
            raise CnnvisError(f"{where}: column {cat!r}: {e!r} is not a label number")
        lab = int(e)
        if lab not in ds.label_names:
            raise CnnvisError(f"{where}: column {cat!r}: label {lab} is not in label.csv")
        labels.append(lab)
    rec.labels[cat] = sorted(set(labels))


def _concepts(ds: BrodenDataset) -> list[Concept]:
    """One concept per (label, category), in category.csv's order, then by label number.

    A label belongs to every category label.csv names for it; an image-level label seen in a
    category column also belongs to that category even if label.csv forgot to say so."""
    for rec in ds.records:
        for cat, labels in rec.labels.items():
            for lab in labels:
                ds.label_categories[lab].setdefault(cat, 0)
    pairs = [(lab, ds.label_names[lab], cat) for cat in ds.categories
             for lab in sorted(ds.label_names) if cat in ds.label_categories[lab]]
    return [Concept(i, lab, name, cat) for i, (lab, name, cat) in enumerate(pairs)]
