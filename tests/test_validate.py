"""validate_broden on a synthetic Broden dataset that each test corrupts in its own way."""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnvis_pipeline.data import commands as data_commands
from cnnvis_pipeline.data.synth import LABELS, generate_broden_synth
from cnnvis_pipeline.data.validate import validate_broden

N_IMAGES = 10  # image 10 is the one val image


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return generate_broden_synth(tmp_path_factory.mktemp("src") / "synth", N_IMAGES, 16, seed=2)


@pytest.fixture
def ds(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ds"))


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _edit_index(ds: Path, edit) -> None:
    header, rows = _read(ds / "index.csv")
    header = edit(header, rows) or header
    _write(ds / "index.csv", header, rows)


def _png(ds: Path, row: dict, col: str = "color") -> Path:
    return ds / "images" / row[col].split(";")[0]


def _problems(ds: Path) -> list[str]:
    return validate_broden(ds, progress=False, workers=2)


def _has(problems: list[str], *parts: str) -> bool:
    return any(all(p in m for p in parts) for m in problems)


def test_clean_dataset_has_no_problems(ds):
    assert _problems(ds) == []


def test_missing_files_and_columns(ds):
    (ds / "label.csv").unlink()

    def drop_sw(header, rows):
        for r in rows:
            del r["sw"]
        return [c for c in header if c != "sw"]

    _edit_index(ds, drop_sw)
    problems = _problems(ds)
    assert f"{ds / 'label.csv'}: required file is missing" in problems
    assert f"{ds / 'index.csv'}: line 1: missing column(s) sw" in problems
    # with label.csv gone every PNG label is unknown: still reported row by row, not just once
    assert _has(problems, "index.csv: line 2:", "are not in label.csv")


def test_paths_outside_the_dataset(ds, tmp_path):
    outside = tmp_path / "outside.jpg"
    shutil.copy(ds / "images" / "synth" / "000000.jpg", outside)
    (ds / "images" / "link.jpg").symlink_to(outside)

    def edit(header, rows):
        rows[0]["image"] = "../index.csv"
        rows[1]["image"] = "/etc/hostname"
        rows[2]["image"] = "link.jpg"
        rows[3]["color"] = "synth/../../label.csv.png"

    _edit_index(ds, edit)
    problems = _problems(ds)
    idx = ds / "index.csv"
    assert f"{idx}: line 2: path '../index.csv' resolves outside the dataset's images/" in problems
    assert f"{idx}: line 3: path '/etc/hostname' must be relative to images/" in problems
    assert f"{idx}: line 4: path 'link.jpg' resolves outside the dataset's images/" in problems
    assert _has(problems, f"{idx}: line 5: path 'synth/../../label.csv.png' resolves outside")


def test_missing_and_corrupt_files(ds):
    _, rows = _read(ds / "index.csv")
    (ds / "images" / rows[0]["image"]).unlink()
    _png(ds, rows[1]).unlink()
    jpg = ds / "images" / rows[2]["image"]
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # truncated JPEG
    _png(ds, rows[3]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (ds / "images" / rows[4]["image"]).write_bytes(b"not an image at all")
    problems = _problems(ds)
    idx = ds / "index.csv"
    assert f"{idx}: line 2: {ds / 'images' / rows[0]['image']}: image is missing" in problems
    assert f"{idx}: line 3: {_png(ds, rows[1])}: segmentation PNG is missing" in problems
    assert _has(problems, f"{idx}: line 4: {jpg}: cannot decode image (Truncated")
    assert _has(problems, f"{idx}: line 5: {_png(ds, rows[3])}: cannot decode segmentation PNG")
    assert _has(problems, f"{idx}: line 6:", "cannot decode image")
    assert len(problems) == 5


def test_wrong_sizes(ds):
    _, rows = _read(ds / "index.csv")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(_png(ds, rows[1]))

    def edit(header, rows):
        rows[0]["ih"] = "20"

    _edit_index(ds, edit)
    problems = _problems(ds)
    idx = ds / "index.csv"
    img = ds / "images" / rows[0]["image"]
    assert f"{idx}: line 2: {img}: image is 16x16, index.csv says iw x ih = 16x20" in problems
    assert (
        f"{idx}: line 3: {_png(ds, rows[1])}: segmentation is 10x8, index.csv says sw x sh = 8x8"
        in problems
    )


def test_png_label_not_in_label_csv(ds):
    _, rows = _read(ds / "index.csv")
    labels = np.zeros((8, 8), np.int32)
    labels[0, 0] = 999  # R = 999 % 256, G = 999 // 256
    rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(_png(ds, rows[2]))
    problems = _problems(ds)
    assert problems == [
        f"{ds / 'index.csv'}: line 4: {_png(ds, rows[2])}: label number(s) [999] are not in "
        "label.csv"
    ]


def test_bad_cells_rows_and_labels(ds):
    def edit(header, rows):
        rows[0]["ih"] = "big"
        rows[0]["split"] = "test"
        rows[1]["scene"] = "500"
        rows[2]["texture"] = "stripes"
        rows[3]["object"] = rows[3]["color"] + ";12"
        rows[4]["scene"] = rows[4]["color"]
        rows[5]["image"] = rows[0]["image"]

    _edit_index(ds, edit)
    with (ds / "index.csv").open("a") as f:
        f.write("synth/000000.jpg,train,16,16,8,8,,,,,,,extra\n")
    header, labels = _read(ds / "label.csv")
    labels[0]["number"] = "one"
    labels[1]["number"] = labels[2]["number"]
    labels[3]["category"] = "flavour(1)"
    _write(ds / "label.csv", header, labels)
    problems = _problems(ds)
    idx, lab = ds / "index.csv", ds / "label.csv"
    last = N_IMAGES + 2  # the appended row
    expected = [
        f"{lab}: line 2: column 'number' must be an integer, got 'one'",
        f"{lab}: line 4: duplicate label number 3",
        f"{lab}: line 5: category 'flavour' is not in category.csv",
        f"{idx}: line 2: column 'ih' must be a positive integer, got 'big'",
        f"{idx}: line 2: split 'test' is not one of train, val",
        f"{idx}: line 3: column 'scene': label 500 is not in label.csv",
        f"{idx}: line 4: column 'texture': 'stripes' is not a label number",
        f"{idx}: line 5: column 'object' mixes PNG files and label numbers",
        f"{idx}: line 7: image 'synth/000000.jpg' is listed twice (also line 2)",
        f"{idx}: line {last}: more cells than header columns",
        f"{idx}: line {last}: image 'synth/000000.jpg' is listed twice (also line 2)",
    ]
    for message in expected:
        assert message in problems, (message, problems)
    assert _has(problems, f"{idx}: line 6: column 'scene' holds PNG files but line 2 has label")


def test_category_csv_problems(ds):
    header, cats = _read(ds / "category.csv")
    cats.append(dict(cats[0]))
    cats.append({**cats[0], "name": "bad name"})
    _write(ds / "category.csv", header, cats)
    problems = _problems(ds)
    cat = ds / "category.csv"
    assert f"{cat}: line 8: duplicate category {cats[0]['name']!r}" in problems
    assert f"{cat}: line 9: invalid category name 'bad name'" in problems


def test_empty_dataset_and_missing_directory(ds, tmp_path):
    _edit_index(ds, lambda header, rows: rows.clear())
    assert _problems(ds) == [f"{ds / 'index.csv'}: the dataset has no images"]
    missing = tmp_path / "nope"
    assert _problems(missing) == [f"{missing}: dataset directory does not exist"]
    empty = tmp_path / "empty"
    empty.mkdir()
    names = ("category.csv", "label.csv", "index.csv")
    assert _problems(empty) == [f"{empty / n}: required file is missing" for n in names]


def _run_cli(argv) -> int:
    parser = argparse.ArgumentParser()
    data_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(ds, capsys):
    assert _run_cli(["validate", str(ds), "-q"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    n_files = sum(1 for p in (ds / "images").rglob("*") if p.is_file())
    assert out == [
        f"{ds}: OK: {N_IMAGES} images (9 train, 1 val), {len(LABELS)} labels, 6 categories, "
        f"{n_files} files checked"
    ]
    _, rows = _read(ds / "index.csv")
    (ds / "images" / rows[0]["image"]).unlink()
    (ds / "images" / rows[1]["image"]).unlink()
    assert _run_cli(["validate", str(ds), "-q"]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 2
    assert captured.err.strip() == f"{ds}: 2 problems"


def test_a_dataset_without_images_stops_early_with_one_summary(tmp_path, capsys):
    """5,000 rows naming missing files (a Broden copied without images/): the CLI stops after
    the first chunk of rows, says what seems missing, and lists at most 100 problems per kind."""
    from cnnvis_pipeline.bench.validation import write_missing_dataset

    ds = write_missing_dataset(tmp_path / "copy", 5000)
    assert _run_cli(["validate", str(ds), "-q"]) == 1
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[-1] == (
        f"{ds}: images/ seems missing: 1,000 of 1,000 rows checked so far name missing files; "
        "validation stopped early (index.csv has 5,000 rows): copy the whole dataset, or give "
        "the directory that holds it")
    listed = [ln for ln in out if not ln.startswith("... and ")]
    image = [ln for ln in listed if ln.endswith(": image is missing")]
    png = [ln for ln in listed if ln.endswith(": segmentation PNG is missing")]
    assert len(image) == len(png) == 100
    assert image[0].startswith(f"{ds / 'index.csv'}: line 2: ")
    more = [ln for ln in out if ln.startswith("... and ")]
    assert len(more) == 2 and more[0].startswith("... and 900 more problems of the kind of: ")
    assert more[1].startswith("... and 3,900 more")  # four segmentation PNGs per row
    assert len(out) == 203
    assert "Traceback" not in captured.err and captured.err.strip().endswith(" problems")


def test_problems_are_listed_up_to_a_limit_per_kind(ds):
    """300 rows with a bad split (files present, no early stop): 100 listed, the rest counted,
    and the problems of another kind still listed."""
    def edit(header, rows):
        base = rows[0]
        rows.clear()
        rows.extend(dict(base, split="test") for _ in range(300))
    _edit_index(ds, edit)
    report_problems = _problems(ds)
    listed = [m for m in report_problems if not m.startswith("... and ")]
    split = [m for m in listed if "split 'test' is not one of" in m]
    twice = [m for m in listed if "is listed twice" in m]
    assert len(split) == 100 and len(twice) == 100
    assert split[0].startswith(f"{ds / 'index.csv'}: line 2: ")
    assert any(m.startswith("... and 200 more problems of the kind of: ") and "split" in m
               for m in report_problems)
    assert report_problems.total == 300 + 299
