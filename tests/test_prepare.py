"""Preparation in worker processes: the same bytes and the same errors as one process."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from cnnvis_pipeline.data import prepared as prepared_mod
from cnnvis_pipeline.data.prepared import PreparedDataset, prepare_dataset
from cnnvis_pipeline.errors import CnnvisError


def _row_file(root, row: int, column: str):
    """The first file named in index.csv's data row `row` (0-based) under `column`."""
    with (root / "index.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return root / "images" / rows[row][column].split(";")[0]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(prepared_mod, "CHUNK", 3)  # 8 images: tasks of 3, 3 and 2


def test_workers_give_the_serial_bytes(synth_dir, tmp_path, small_chunks):
    serial = prepare_dataset(synth_dir, tmp_path / "serial", progress=False)
    parallel = prepare_dataset(synth_dir, tmp_path / "parallel", progress=False, workers=3)
    names = sorted(f.name for f in serial.iterdir())
    assert names == sorted(f.name for f in parallel.iterdir())
    assert {"images.npy", "planes.npy", "slots.npy", "present.npy", "meta.json"} <= set(names)
    for name in names:
        assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name
    ds = PreparedDataset(parallel)
    assert len(ds) == 48
    # the last task's image row is the last image as decoded (32 px: no resize)
    from PIL import Image

    last = np.asarray(Image.open(synth_dir / "images" / ds.meta["images"][-1]).convert("RGB"))
    np.testing.assert_array_equal(ds.images[-1], last)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_bad_file_fails_the_same_way_and_leaves_nothing(dataset, tmp_path, small_chunks,
                                                          workers):
    """Rows 4 (second task) and 7 (third task) are corrupt: the error names row 4's file in
    both modes (index order), and no prepared directory or leftover remains."""
    bad4 = _row_file(dataset, 4, "image")
    bad7 = _row_file(dataset, 7, "object")
    bad4.write_bytes(b"\xff\xd8 not a jpeg")
    bad7.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out" / "p"
    out.parent.mkdir()
    with pytest.raises(CnnvisError) as err:
        prepare_dataset(dataset, out, progress=False, workers=workers)
    assert str(err.value).startswith(f"{bad4}: cannot decode image"), err.value
    assert list(out.parent.iterdir()) == []


def test_workers_option_is_checked(dataset, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cnnvis_pipeline", "prepare", "--dataset", str(dataset),
         "--out", str(tmp_path / "p"), "--workers", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "--workers: must be a whole number >= 1, not '0'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "p").exists()


def test_a_worker_that_dies_is_an_error_not_a_hang(dataset, tmp_path, small_chunks, monkeypatch):
    """A worker killed mid-task (the kernel's OOM killer, say) fails the preparation with a
    message, instead of waiting forever for its rows; nothing is left at the output."""
    import os

    real = prepared_mod._fill_rows

    def dies_on_second_task(plan, lo, hi):
        if lo == 3:
            os._exit(9)
        return real(plan, lo, hi)

    monkeypatch.setattr(prepared_mod, "_fill_rows", dies_on_second_task)
    out = tmp_path / "out" / "p"
    out.parent.mkdir()
    with pytest.raises(CnnvisError, match="a preparation worker process died"):
        prepare_dataset(dataset, out, progress=False, workers=2)
    assert list(out.parent.iterdir()) == []
