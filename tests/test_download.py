"""fetch_dataset against a loopback HTTP server: full download, resume, checksums, hostile zips."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import socket
import stat
import zipfile
from pathlib import Path

import pytest
from loopback_http import LoopbackServer

from cnnvis_pipeline import cli
from cnnvis_pipeline.data import commands as data_commands
from cnnvis_pipeline.data import download, source
from cnnvis_pipeline.data.archive import extract_zip_safely
from cnnvis_pipeline.data.broden import load_broden
from cnnvis_pipeline.data.download import COMPLETE_MARKER, fetch_dataset, is_complete
from cnnvis_pipeline.data.source import resolve_source
from cnnvis_pipeline.data.synth import generate_broden_synth
from cnnvis_pipeline.data.validate import validate_broden
from cnnvis_pipeline.errors import CnnvisError

N_IMAGES = 8


def _zip_dir(src: Path, top: str | None, extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                rel = p.relative_to(src).as_posix()
                zf.write(p, f"{top}/{rel}" if top else rel)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return generate_broden_synth(tmp_path_factory.mktemp("src") / "synth", N_IMAGES, 16, seed=1)


@pytest.fixture(scope="module")
def synth_zip(synth_dir) -> bytes:
    return _zip_dir(synth_dir, "broden_synth")


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    monkeypatch.setattr(download, "CHUNK_SIZE", 512)
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)


@pytest.fixture
def server():
    with LoopbackServer() as s:
        yield s


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spec(server, data: bytes, path="/d/broden_synth.zip", **extra):
    server.files[path] = data
    return {"url": server.url(path), "sha256": _sha(data), "name": "broden_synth", **extra}


def _looks_valid_anywhere(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name in (COMPLETE_MARKER, "index.csv")]


def _leftovers(data_root: Path) -> list[str]:
    """Everything in data_root but the lock file."""
    if not data_root.exists():
        return []
    return sorted(p.name for p in data_root.iterdir() if not p.name.endswith(".lock"))


# -- downloads ----------------------------------------------------------------------------------
def test_full_download_loads_and_validates(server, synth_zip, tmp_path):
    spec = _spec(server, synth_zip)
    data_root = tmp_path / "resources"
    path = fetch_dataset(spec, data_root, progress=False)
    assert path == data_root / "broden_synth"
    assert is_complete(path)
    record = json.loads((path / COMPLETE_MARKER).read_text())
    assert record["sha256"] == _sha(synth_zip) and record["url"] == spec["url"]
    assert len(load_broden(path)) == N_IMAGES
    assert validate_broden(path, progress=False) == []
    assert _leftovers(data_root) == ["broden_synth"]  # no .zip, .part or temp dir left
    # a second call finds it complete and sends no request
    n = len(server.log)
    assert fetch_dataset(spec, data_root, progress=False) == path
    assert len(server.log) == n


def test_md5_and_name_and_flat_archive(server, synth_dir, tmp_path):
    data = _zip_dir(synth_dir, None)  # no top-level folder in this one
    server.files["/x.zip"] = data
    spec = {"url": server.url("/x.zip"), "md5": hashlib.md5(data).hexdigest(), "name": "mine"}
    path = fetch_dataset(spec, tmp_path, progress=False)
    assert path == tmp_path / "mine" and len(load_broden(path)) == N_IMAGES


def test_cut_transfer_resumes_within_one_call(server, synth_zip, tmp_path):
    spec = _spec(server, synth_zip)
    half = len(synth_zip) // 2
    server.cut_after["/d/broden_synth.zip"] = half
    path = fetch_dataset(spec, tmp_path, progress=False, retries=1)
    gets = server.gets("/d/broden_synth.zip")
    assert len(gets) == 2 and gets[0]["range"] is None
    offset = int(gets[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < offset <= half
    assert len(load_broden(path)) == N_IMAGES


def test_killed_transfer_looks_invalid_then_next_call_resumes(server, synth_zip, tmp_path):
    spec = _spec(server, synth_zip)
    half = len(synth_zip) // 2
    server.cut_after["/d/broden_synth.zip"] = half
    with pytest.raises(CnnvisError, match=r"download interrupted .* run the same command again"):
        fetch_dataset(spec, tmp_path, progress=False, retries=0)
    part = tmp_path / "broden_synth.zip.part"
    assert 0 < part.stat().st_size <= half
    assert _leftovers(tmp_path) == ["broden_synth.zip.part"]
    assert not is_complete(tmp_path / "broden_synth") and not _looks_valid_anywhere(tmp_path)

    kept = part.stat().st_size
    path = fetch_dataset(spec, tmp_path, progress=False, retries=0)
    gets = server.gets("/d/broden_synth.zip")
    assert len(gets) == 2 and gets[1]["range"] == f"bytes={kept}-"
    assert is_complete(path) and validate_broden(path, progress=False) == []
    assert _leftovers(tmp_path) == ["broden_synth"]


def test_server_ignoring_range_restarts_from_zero(server, synth_zip, tmp_path):
    spec = _spec(server, synth_zip)
    (tmp_path / "broden_synth.zip.part").write_bytes(synth_zip[:1000])
    server.ignore_range = True
    path = fetch_dataset(spec, tmp_path, progress=False)
    assert server.gets("/d/broden_synth.zip")[0]["range"] == "bytes=1000-"
    assert is_complete(path)


def test_corrupt_partial_file_fails_checksum_then_recovers(server, synth_zip, tmp_path):
    spec = _spec(server, synth_zip)
    (tmp_path / "broden_synth.zip.part").write_bytes(b"\0" * 1000)  # not a prefix of the file
    with pytest.raises(CnnvisError, match="sha256 checksum mismatch"):
        fetch_dataset(spec, tmp_path, progress=False)
    assert _leftovers(tmp_path) == []  # the bad partial file is gone
    assert is_complete(fetch_dataset(spec, tmp_path, progress=False))


def test_checksum_mismatch_names_url_and_both_checksums(server, synth_zip, tmp_path):
    wrong = "0" * 64
    spec = _spec(server, synth_zip)
    spec["sha256"] = wrong
    with pytest.raises(CnnvisError) as e:
        fetch_dataset(spec, tmp_path / "res", progress=False)
    msg = str(e.value)
    assert spec["url"] in msg and f"expected {wrong}" in msg and f"got {_sha(synth_zip)}" in msg
    assert _leftovers(tmp_path / "res") == []
    assert not _looks_valid_anywhere(tmp_path)


def test_md5_mismatch_when_both_given(server, synth_zip, tmp_path):
    spec = _spec(server, synth_zip, md5="f" * 32)
    with pytest.raises(CnnvisError, match=f"md5 checksum mismatch: expected {'f' * 32}, got"):
        fetch_dataset(spec, tmp_path, progress=False)
    assert _leftovers(tmp_path) == []


def test_http_404_is_reported_without_retrying(server, tmp_path):
    spec = {"url": server.url("/missing.zip"), "sha256": "a" * 64}
    with pytest.raises(CnnvisError, match=r"missing\.zip: download failed: HTTP 404"):
        fetch_dataset(spec, tmp_path, progress=False, retries=3)
    assert len(server.gets("/missing.zip")) == 1
    assert _leftovers(tmp_path) == []


def test_unreachable_server_is_retried_then_reported(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = {"url": f"http://127.0.0.1:{port}/a.zip", "md5": "a" * 32}
    with pytest.raises(CnnvisError) as e:
        fetch_dataset(spec, tmp_path, progress=False, retries=1)
    message = str(e.value)
    # whole (no reprs cut mid-string), no "resume" with nothing kept, and the offline ways out
    assert message.startswith(f"http://127.0.0.1:{port}/a.zip: download failed after 2 attempt(s) "
                              f"(cannot connect to 127.0.0.1:{port}: Connection refused); "
                              "nothing was downloaded."), message
    assert "resume" not in message and "0 bytes" not in message
    assert "mirror: file:///path/to/" in message and "dataset.path:" in message
    assert "dataset.mirror:" in message and message.count("(") == message.count(")")
    assert _leftovers(tmp_path) == []


def test_file_url_copies_a_local_archive(synth_zip, tmp_path):
    local = tmp_path / "copied here" / "broden_synth.zip"
    local.parent.mkdir()
    local.write_bytes(synth_zip)
    root = tmp_path / "root"
    spec = {"download": "broden1_224", "mirror": local.as_uri(),
            "sha256": hashlib.sha256(synth_zip).hexdigest(), "name": "broden_synth"}
    path = fetch_dataset(spec, root, progress=False)
    assert path == root / "broden_synth" and len(load_broden(path)) == N_IMAGES
    assert is_complete(path) and _leftovers(root) == ["broden_synth"]
    assert local.read_bytes() == synth_zip  # the source is left alone

    bad = dict(spec, name="other", sha256="0" * 64)
    with pytest.raises(CnnvisError, match=r"sha256 checksum mismatch.*the copy was deleted"):
        fetch_dataset(bad, root, progress=False)
    assert _leftovers(root) == ["broden_synth"]
    with pytest.raises(CnnvisError, match=r"no such file .*nothere\.zip"):
        fetch_dataset(dict(spec, mirror=(tmp_path / "nothere.zip").as_uri(), name="x"), root,
                      progress=False)
    with pytest.raises(CnnvisError, match=r"dataset\.mirror: 'file://host/x\.zip': a file URL"):
        resolve_source(dict(spec, mirror="file://host/x.zip"))
    with pytest.raises(CnnvisError, match=r"dataset\.url: 'ftp://h/x\.zip' must be an http://"):
        resolve_source({"url": "ftp://h/x.zip", "md5": "a" * 32})


def test_not_a_zip_and_not_a_dataset(server, tmp_path):
    with pytest.raises(CnnvisError, match="not a valid zip archive"):
        fetch_dataset(_spec(server, b"hello " * 100, "/a.zip"), tmp_path, progress=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", b"no dataset here")
    with pytest.raises(CnnvisError, match="holds no Broden dataset"):
        fetch_dataset(_spec(server, buf.getvalue(), "/b.zip"), tmp_path, progress=False)
    assert _leftovers(tmp_path) == []


def test_existing_directories_are_not_taken_for_complete(server, synth_zip, tmp_path):
    (tmp_path / "broden_synth").mkdir()  # e.g. a user's half-copied folder: no marker
    with pytest.raises(CnnvisError, match="exists but is not a complete download"):
        fetch_dataset(_spec(server, synth_zip), tmp_path, progress=False)
    assert server.log == []
    other = tmp_path / "other"
    path = fetch_dataset(_spec(server, synth_zip), other, progress=False)
    spec = _spec(server, synth_zip)
    spec["sha256"] = "1" * 64
    with pytest.raises(CnnvisError, match=r"holds the download of http\S+ \(sha256 [0-9a-f]{64}, md5 "
                       r"[0-9a-f]{32}\), but the config asks for the archive http\S+ \(sha256 1{64}\)"):
        fetch_dataset(spec, other, progress=False)
    assert is_complete(path)


# -- hostile archives ---------------------------------------------------------------------------
def _symlink_entry(name: str, target: str):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


HOSTILE = {
    "dotdot": lambda tmp: ("../evil", b"x"),
    "nested-dotdot": lambda tmp: ("broden_synth/images/../../../evil", b"x"),
    "absolute": lambda tmp: (str(tmp / "evil"), b"x"),
    "symlink": lambda tmp: _symlink_entry("broden_synth/images/evil", str(tmp)),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_is_refused_whole(server, synth_dir, tmp_path, kind):
    name, data = HOSTILE[kind](tmp_path)
    zdata = _zip_dir(synth_dir, "broden_synth", [(name, data)])
    data_root = tmp_path / "a" / "b" / "resources"
    with pytest.raises(CnnvisError, match="refusing to extract: entry .* nothing was extracted"):
        fetch_dataset(_spec(server, zdata), data_root, progress=False)
    assert not [p for p in tmp_path.rglob("*") if p.name == "evil"]
    assert _leftovers(data_root) == []  # no dataset, no temp dir, no archive
    # and the extractor on its own writes nothing either
    (tmp_path / "h.zip").write_bytes(zdata)
    with pytest.raises(CnnvisError, match="refusing to extract"):
        extract_zip_safely(tmp_path / "h.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name == "evil"]


def test_duplicate_entries_are_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("a/index.csv", b"1")
        zf.writestr("a/index.csv", b"2")
    (tmp_path / "d.zip").write_bytes(buf.getvalue())
    with pytest.raises(CnnvisError, match="appears twice"):
        extract_zip_safely(tmp_path / "d.zip", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- specs --------------------------------------------------------------------------------------
def test_resolve_known_and_mirror():
    src = resolve_source({"download": "broden1_224"})
    assert src.url == "http://netdissect.csail.mit.edu/data/broden1_224.zip"
    assert src.md5 == "be13c292eaef3300da03f8d0e48eab1c" and src.name == "broden1_224"
    src = resolve_source({"download": "broden1_224", "mirror": "https://m.example/b.zip"})
    assert src.url == "https://m.example/b.zip" and src.md5.startswith("be13c2")
    src = resolve_source({"download": "broden1_384", "sha256": "A" * 64})
    assert src.sha256 == "a" * 64 and src.md5 is None and src.name == "broden1_384"
    src = resolve_source({"url": "http://h/path/my.set.zip?x=1", "md5": "b" * 32})
    assert re.fullmatch(r"my-set-[0-9a-f]{8}", src.name)  # as config.dataset_name names it
    assert src.name == source.default_name("http://h/path/my.set.zip?x=1")
    assert resolve_source({"url": "http://h/a.zip", "md5": "b" * 32, "name": "n"}).name == "n"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"download": "broden1_227"}, "no checksum is pinned for broden1_227"),
        ({"download": "broden9"}, "unknown dataset 'broden9'"),
        ({"url": "http://h/a.zip"}, "needs sha256: or md5:"),
        ({"url": "ftp://h/a.zip", "md5": "b" * 32}, "must be an http://, https:// or file:// URL"),
        ({"url": "http://h/a.zip", "sha256": "xyz"}, "is not 64 hex digits"),
        ({"url": "http://h/a.zip", "md5": "b" * 32, "name": "../x"}, "name '../x' is not allowed"),
        ({}, "give download:"),
        ("broden1_224", "expected a mapping"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(CnnvisError, match=message.replace("(", r"\(")):
        resolve_source(spec)


# -- command line -------------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser()
    data_commands.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_download_prints_path(server, synth_zip, tmp_path, capsys):
    spec = _spec(server, synth_zip)
    args = _parse(
        ["download", "--data-root", str(tmp_path), "--url", spec["url"], "--sha256", spec["sha256"]]
    )
    assert args.func(args) == 0
    expected = tmp_path / source.default_name(spec["url"])
    assert capsys.readouterr().out.strip() == str(expected) and is_complete(expected)
    args = _parse(["download", "--data-root", str(tmp_path), "--url", spec["url"], "--name",
                   "named", "--md5", hashlib.md5(synth_zip).hexdigest(), "--quiet"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "named")
    with pytest.raises(SystemExit):
        _parse(["download", "--url", "u", "--sha256", "a", "--md5", "b"])


def test_cli_errors_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["cnnvis_pipeline.data.commands"])
    assert cli.main(["download", "--data-root", str(tmp_path), "--name", "broden1_227"]) == 2
    assert "error: dataset: no checksum is pinned for broden1_227" in capsys.readouterr().err
    assert cli.main(["download", "--data-root", str(tmp_path)]) == 2
    assert "error: download: give --name" in capsys.readouterr().err
