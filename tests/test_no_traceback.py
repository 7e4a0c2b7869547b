"""Every hostile case through the real command line: a clear error naming the file, row or key,
a non-zero exit, and never a Python traceback.

Each case builds one hostile input (a dataset file, a model, an archive, a full disk) and runs
`python -m cnnvis_pipeline ...` in a subprocess, as a rule of the workflow does; the output must
hold the expected words and no `Traceback`. The workflow-level cases (a malformed config, a
corrupt image, pickled code, shared data roots) assert the same in test_hostile.py,
test_shared_root.py and test_digests.py.

Cases: decompression-bomb headers (PNG and JPEG image, 30000x30000), a valid 9500x9500 all-zero
PNG (refused from its header, without decoding: the child's peak memory is checked), 16-bit RGB
and 8/16-bit grayscale segmentations, an unknown category column, a corrupt JPEG and PNG, a path
outside images/, unknown labels, an empty dataset; a ModuleList layer, a layer that never runs,
a Linear layer, pickled code in a checkpoint, a missing checkpoint, an unknown factory; a zip
bomb, a zip that fills the disk while unpacking, a download that fills the disk. A spreadsheet's
BOM CSVs are no longer a hostile case: they validate and prepare.

The subprocess cases are marked slow (each starts python and torch, seconds on a busy node).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from loopback_http import LoopbackServer
from PIL import Image

from cnnvis_pipeline import cli
from cnnvis_pipeline import config as cc
from cnnvis_pipeline.data.prepared import prepare_dataset

FACTORY = '''
import torch
from torch import nn


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()])
        self.unused = nn.Conv2d(4, 4, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(5))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def blocks():
    torch.manual_seed(0)
    return Blocks()
'''


# -- helpers ------------------------------------------------------------------------------------
def run_cli(*argv, env=None, limit_file_bytes: int | None = None) -> tuple[int, str]:
    """`python -m cnnvis_pipeline ARGV` in a subprocess: (exit status, stdout + stderr)."""

    def limits():
        if limit_file_bytes is not None:  # writes beyond it fail with EFBIG, as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    proc = subprocess.run([sys.executable, "-m", "cnnvis_pipeline", *map(str, argv)],
                          capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=limits)
    return proc.returncode, proc.stdout + proc.stderr


def peak_rss_mb(*argv) -> tuple[int, str, float]:
    """Run the CLI in a fresh helper process and report the child's peak RSS (MB)."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], "
            "capture_output=True, text=True); print(p.returncode); print(p.stdout + p.stderr); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "cnnvis_pipeline",
                           *map(str, argv)], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.rstrip("\n").split("\n")
    return int(lines[0]), "\n".join(lines[1:-1]), int(lines[-1]) / 1024


def assert_clean_error(rc: int, out: str, *needles: str) -> None:
    assert rc != 0, out
    assert "Traceback" not in out, out
    assert all(n in out for n in needles), out


def png_bytes(width: int, height: int, depth: int, colour: int, row: bytes | None = None) -> bytes:
    """A PNG written by hand (any header, rows of `row` or zeros), streamed through zlib so that
    a 9500x9500 image costs no memory."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = row if row is not None else bytes(width * channels * depth // 8)
    comp, chunks = zlib.compressobj(9), []
    for _ in range(height):
        chunks.append(comp.compress(b"\x00" + row))
    chunks.append(comp.flush())

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(chunks))
            + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header is patched to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def cells(root: Path) -> tuple[list[str], list[list[str]]]:
    with open(root / "index.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def write_rows(root: Path, header, rows) -> None:
    with open(root / "index.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])


def first(root: Path, column: str) -> Path:
    header, rows = cells(root)
    return root / "images" / rows[0][header.index(column)].split(";")[0]


@pytest.fixture
def ds(dataset) -> Path:
    """A writable copy of conftest's `pristine` dataset."""
    return dataset


# -- dataset files ------------------------------------------------------------------------------
def _bomb_png_image(ds):
    path = first(ds, "image")
    png = ds / "images" / (path.relative_to(ds / "images").with_suffix(".png"))
    png.write_bytes(png_bytes(30000, 30000, 8, 2, row=b""))  # header only matters
    header, rows = cells(ds)
    rows[0][0] = png.relative_to(ds / "images").as_posix()
    write_rows(ds, header, rows)
    return png, ["refused before decoding", "exceeds limit"]


def _bomb_jpeg_image(ds):
    path = first(ds, "image")
    path.write_bytes(jpeg_claiming(30000, 30000))
    return path, ["refused before decoding", "exceeds limit"]


def _bomb_png_segmentation(ds):
    path = first(ds, "color")
    path.write_bytes(png_bytes(30000, 30000, 8, 2, row=b""))
    return path, ["refused before decoding"]


def _seg_16bit_rgb(ds):
    path = first(ds, "color")
    path.write_bytes(png_bytes(8, 8, 16, 2, row=bytes([0x0A, 0x01, 0, 0, 0, 0] * 8)))
    return path, ["segmentation PNG is 16-bit RGB", "must be 8-bit RGB or RGBA"]


def _seg_gray8(ds):
    path = first(ds, "color")
    Image.new("L", (8, 8), 3).save(path)
    return path, ["segmentation PNG is 8-bit grayscale (mode L)", "must be 8-bit RGB or RGBA"]


def _seg_gray16(ds):
    path = first(ds, "color")
    Image.fromarray(np.full((8, 8), 3598, np.uint16)).save(path)
    return path, ["segmentation PNG is 16-bit grayscale", "must be 8-bit RGB or RGBA"]


def _unknown_column(ds):
    header, rows = cells(ds)
    write_rows(ds, header + ["colour"], [r + [""] for r in rows])
    return ds / "index.csv", ["column(s) 'colour' are not categories of", "category.csv"]


def _corrupt_jpeg(ds):
    path = first(ds, "image")
    path.write_bytes(b"not a JPEG at all")
    return path, ["cannot decode image"]


def _corrupt_png(ds):
    path = first(ds, "color")
    path.write_bytes(path.read_bytes()[:40])
    return path, ["segmentation PNG"]


def _outside(ds):
    header, rows = cells(ds)
    rows[0][0] = "../../etc/passwd"
    write_rows(ds, header, rows)
    return ds / "index.csv", ["resolves outside the dataset's images/"]


def _unknown_label(ds):
    header, rows = cells(ds)
    rows[0][header.index("scene")] = "999"
    write_rows(ds, header, rows)
    return ds / "index.csv", ["label 999 is not in label.csv"]


def _empty(ds):
    header, _ = cells(ds)
    write_rows(ds, header, [])
    return ds / "index.csv", ["the dataset has no images"]


DATASET_CASES = {
    "bomb-png-image": _bomb_png_image, "bomb-jpeg-image": _bomb_jpeg_image,
    "bomb-png-segmentation": _bomb_png_segmentation, "segmentation-16bit-rgb": _seg_16bit_rgb,
    "segmentation-gray8": _seg_gray8, "segmentation-gray16": _seg_gray16,
    "unknown-category-column": _unknown_column, "corrupt-jpeg": _corrupt_jpeg,
    "corrupt-png": _corrupt_png, "path-outside-images": _outside,
    "unknown-label": _unknown_label, "empty-dataset": _empty,
}


@pytest.mark.slow  # a subprocess per case (python + torch start-up)
@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_hostile_dataset_files(case, ds, tmp_path):
    path, needles = DATASET_CASES[case](ds)
    rc, out = run_cli("validate", ds, "--quiet")
    assert rc == 1
    assert_clean_error(rc, out, str(path), *needles)
    prepared = tmp_path / "prepared" / "p"
    rc, out = run_cli("prepare", "--dataset", ds, "--out", prepared, "--quiet")
    assert rc == 2
    assert_clean_error(rc, out, "error:", str(path), *needles)
    assert not prepared.exists()


@pytest.mark.slow  # a subprocess per case (python + torch start-up)
def test_large_zero_png_is_refused_from_its_header(ds):
    """A valid 9500x9500 all-zero PNG (263 KB) where index.csv says 8x8 is refused from its
    header: the validating process never holds the 270 MB a decode takes."""
    rc, out, clean_mb = peak_rss_mb("validate", ds, "--quiet")
    assert rc == 0, out
    path = first(ds, "color")
    path.write_bytes(png_bytes(9500, 9500, 8, 2))
    assert path.stat().st_size < 400_000
    rc, out, hostile_mb = peak_rss_mb("validate", ds, "--quiet")
    assert_clean_error(rc, out, f"{path}: segmentation is 9500x9500, index.csv says sw x sh = 8x8")
    assert hostile_mb < clean_mb + 100, (clean_mb, hostile_mb)
    print(f"peak RSS: clean {clean_mb:.0f} MB, with the 9500x9500 PNG {hostile_mb:.0f} MB")


def test_bom_csvs_are_read(ds, tmp_path, capsys):
    """A spreadsheet's "CSV UTF-8" export (a byte-order mark before the header) is fine."""
    for name in ("index.csv", "label.csv", "category.csv"):
        (ds / name).write_bytes(b"\xef\xbb\xbf" + (ds / name).read_bytes())
    assert cli.main(["validate", str(ds), "--quiet"]) == 0
    assert "OK: 8 images" in capsys.readouterr().out
    out = prepare_dataset(ds, tmp_path / "p", progress=False)
    assert json.loads((out / "meta.json").read_text())["n_images"] == 8


# -- models -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(pristine, tmp_path_factory) -> Path:
    return prepare_dataset(pristine, tmp_path_factory.mktemp("ntp") / "p", progress=False)


@pytest.fixture(scope="module")
def factory_env(tmp_path_factory) -> dict:
    lib = tmp_path_factory.mktemp("ntlib")
    (lib / "nt_models.py").write_text(FACTORY)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(lib), os.environ.get("PYTHONPATH")])))


def _spec(**model) -> str:
    model = {k: v for k, v in {"factory": "nt_models:blocks", "layers": ["blocks.0"],
                               **model}.items() if v is not None}
    spec = cc.model_specs({"models": {"m": model}})["m"]
    return json.dumps(dict(spec, name="m", resources={"batch_size": 4, "device": "cpu"}))


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED_nt', 'w').write('x')",))


MODEL_CASES = {
    "modulelist-layer": (dict(layers=["blocks"]),
                         ["layer 'blocks' is a ModuleList", "blocks.0, blocks.1"]),
    "layer-that-never-runs": (dict(layers=["blocks.0", "unused"]),
                              ["layer 'unused' was not used in the forward pass"]),
    "linear-layer": (dict(layers=["head.1"]), ["layer 'head.1' outputs (",
                                               ", 5), not a 4-D feature map"]),
    "unknown-factory": (dict(factory="nt_no_such_module:build"),
                        ["cannot import module 'nt_no_such_module'"]),
    "missing-checkpoint": (dict(arch="synthnet", factory=None, kwargs={"width": 4},
                                layers=["features.relu3"], checkpoint="nt-missing.pt"),
                           ["nt-missing.pt does not exist"]),
}


@pytest.mark.slow  # a subprocess per case (python + torch start-up)
@pytest.mark.parametrize("case", sorted(MODEL_CASES) + ["pickled-code-checkpoint"])
def test_hostile_models(case, prepared, factory_env, tmp_path):
    if case == "pickled-code-checkpoint":
        ckpt = tmp_path / "evil.pt"
        torch.save({"features.conv1.weight": torch.zeros(4, 3, 3, 3), "x": _Evil()}, ckpt)
        model = dict(arch="synthnet", factory=None, kwargs={"width": 4},
                     layers=["features.relu3"], checkpoint=str(ckpt))
        needles = [f"{ckpt}: refused: the checkpoint holds pickled objects",
                   "Save the weights alone, torch.save(model.state_dict(), path), and give that "
                   "file as checkpoint\n"]
    else:
        model, needles = MODEL_CASES[case]
    out_dir = tmp_path / "extract" / "0"
    rc, out = run_cli("extract", "--prepared", prepared, "--spec", _spec(**model), "--shard", 0,
                      "--shards", 1, "--out", out_dir, "--quiet", env=factory_env)
    assert rc == 2
    assert_clean_error(rc, out, "error:", *needles)
    assert not out_dir.exists() and not Path("PWNED_nt").exists()
    assert "Re-running" not in out


# -- archives and downloads ---------------------------------------------------------------------
@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _download(server, tmp_path, data: bytes, *extra, limit=None) -> tuple[int, str, Path]:
    server.files["/d/ds.zip"] = data
    root = tmp_path / "root"
    rc, out = run_cli("download", "--data-root", root, "--name", "ds", "--url",
                      server.url("/d/ds.zip"), "--sha256", hashlib.sha256(data).hexdigest(),
                      "--quiet", *extra, limit_file_bytes=limit)
    return rc, out, root


@pytest.mark.slow  # a subprocess per case (python + torch start-up)
def test_zip_bomb_is_refused_naming_the_entry(server, tmp_path):
    data = _zip({"ds/index.csv": b"image\n", "ds/images/bomb.png": bytes(5 << 20)})
    assert len(data) < 20_000  # 5 MB of zeros in a few KB
    rc, out, root = _download(server, tmp_path, data)
    assert_clean_error(rc, out, "refusing to extract: entry 'ds/images/bomb.png' expands",
                       "more than the limit of 100x (dataset.max_expansion)")
    assert not (root / "ds").exists()
    # the limit is configurable: raised above the ratio, the same archive unpacks
    rc, out, root = _download(server, tmp_path, data, "--max-expansion", "100000")
    assert rc == 0, out
    assert (root / "ds" / "images" / "bomb.png").stat().st_size == 5 << 20


@pytest.mark.slow  # a subprocess per case (python + torch start-up)
def test_zip_filling_the_disk_names_the_entry(server, tmp_path):
    data = _zip({"ds/index.csv": b"image\n", "ds/images/big.bin": bytes(600_000)})
    rc, out, root = _download(server, tmp_path, data, limit=300_000)
    assert_clean_error(rc, out, "ran out of space unpacking entry 'ds/images/big.bin'",
                       "the partial extraction was removed")
    assert not [p for p in root.rglob("*") if p.name.startswith(".ds.extract")]


@pytest.mark.slow  # a subprocess per case (python + torch start-up)
def test_download_filling_the_disk_removes_its_part(server, tmp_path):
    data = _zip({"ds/noise.bin": np.random.default_rng(0).bytes(1 << 20)})
    rc, out, root = _download(server, tmp_path, data, limit=300_000)
    assert_clean_error(rc, out, "ran out of space downloading to", "ds.zip.part",
                       "the partial file was removed")
    assert not (root / "ds.zip.part").exists() and not (root / "ds").exists()


def test_free_space_is_checked_before_unpacking_naming_the_entry(tmp_path, monkeypatch, capsys):
    from cnnvis_pipeline.data import download

    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({"a.bin": os.urandom(4000), "b.bin": os.urandom(4000)}))

    class Usage:
        free = 6000

    monkeypatch.setattr(download.shutil, "disk_usage", lambda _p: Usage)
    with pytest.raises(download.CnnvisError) as e:
        download.extract_zip_safely(archive, tmp_path / "out")
    assert "needs 8000 bytes unpacked but" in str(e.value) and "6000 free" in str(e.value)
    assert "entry 'b.bin' would not fit" in str(e.value)
    assert not (tmp_path / "out").exists()
