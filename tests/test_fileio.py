"""fileio: a block of outputs is all or none, and a file-system refusal (a full tmpfs, a
read-only directory) becomes one line naming the output's own path and the cause, with no
temporary file left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cnnvis_pipeline import fileio


def test_a_failed_block_leaves_none_of_its_outputs(tmp_path):
    kept = fileio.write_text(tmp_path / "before.json", "{}\n")
    with pytest.raises(RuntimeError, match="boom"), fileio.all_or_none():
        with fileio.all_or_none():  # an inner block that completed: still removed by the outer
            fileio.write_text(tmp_path / "a.parquet", "a")
        fileio.write_bytes(tmp_path / "b.png", b"b")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before.json"]
    assert kept.read_text() == "{}\n"
    with fileio.all_or_none() as written:
        fileio.write_text(tmp_path / "c.parquet", "c")
    assert written == [tmp_path / "c.parquet"] and (tmp_path / "c.parquet").read_text() == "c"


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if got.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({got.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_no_space_left_is_one_line_naming_the_output(small_tmpfs):
    out = small_tmpfs / "results" / "iou.parquet"
    with pytest.raises(fileio.WriteError) as info:
        fileio.write_bytes(out, b"x" * (1 << 20))
    line = fileio.error_line(info.value)
    assert line.startswith(f"no space left on device writing {out} (")
    assert line.endswith(" bytes free): free space (or run elsewhere) and run again")
    assert not out.exists() and list(out.parent.iterdir()) == []  # no temporary file left

    # through the command line: `cnnvis synth` into the full file system
    proc = subprocess.run([sys.executable, "-m", "cnnvis_pipeline", "synth", "--out",
                           str(small_tmpfs / "ds"), "--images", "64", "--size", "64"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    (err,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert err.startswith(f"error: no space left on device writing {small_tmpfs}/"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (small_tmpfs / "ds").exists()  # no dataset that looks complete


def test_read_only_directory_is_one_line(tmp_path):
    if os.geteuid() == 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        got = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                             capture_output=True, text=True)
        if got.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({got.stderr.strip()})")
        cause = "read-only file system writing"
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        cause = "permission denied writing"
    try:
        with pytest.raises(fileio.WriteError) as info:
            fileio.write_text(ro / "units.parquet", "x")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
    assert fileio.error_line(info.value).startswith(f"{cause} {ro / 'units.parquet'}: ")
