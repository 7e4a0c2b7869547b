"""Content digests: what decides that a dataset, a checkpoint or a factory module has changed.

Snakemake compares modification times, and a dataset is a directory whose mtime does not change
when a file inside it is edited; a checkpoint copied with `cp -p` or `rsync -a` keeps an older
mtime. These digests look at the content instead, cheaply enough to run on every invocation:

- dataset_digest(root, cache=...): sha256 over every file's relative path, size and content
  sha256. A manifest (JSON, `cache`) keeps each file's size, mtime, ctime, inode and sha256; only
  files whose stat changed since the manifest are read again, so a second call on 190,000 files
  costs the stat() calls (seconds), not the hashing. The top-level `.complete` marker is not
  content. The digest does not depend on where the directory is or on mtimes: a copy has the
  same digest, an edit in place or a replacement with an older mtime a new one.
- file_sha256(path, cache=...): one file's sha256 through the same kind of manifest.
- module_source_files(module): the source files of a module (and its parent packages' __init__),
  found on sys.path without importing (nothing runs).
- write_if_changed(path, text): write a small file atomically, but only when its content differs,
  so its mtime moves exactly when the digest it holds changes (what Snakemake compares).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.machinery import PathFinder
from pathlib import Path

from cnnvis_pipeline.fileio import write_text

MANIFEST_VERSION = 1
MARKERS = {".complete"}  # top-level files that are not part of a dataset's content


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set by a user: any write, rename onto, or replacement moves it, also when
    # the mtime was set back (cp -p, rsync -a, touch -d).
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _walk(root: Path) -> dict[str, os.stat_result | None]:
    """Every regular file under root (symlinks followed for files, not for directories)."""
    out: dict[str, os.stat_result | None] = {}
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                rel = prefix + entry.name
                if not prefix and entry.name in MARKERS:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((Path(entry.path), rel + "/"))
                    continue
                try:
                    st = entry.stat(follow_symlinks=True)
                except OSError:
                    out[rel] = None  # a dangling link: part of the content, as missing
                    continue
                if stat.S_ISREG(st.st_mode):
                    out[rel] = st
    return out


def _load(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        data = json.loads(Path(cache).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def _save(cache: Path, files: dict) -> None:
    text = json.dumps({"version": MANIFEST_VERSION, "files": files}, sort_keys=True,
                      separators=(",", ":"))
    try:
        write_if_changed(cache, text)
    except OSError:  # a read-only data root still gets its digest, only slower next time
        pass


def dataset_digest(root: str | Path, *, cache: str | Path | None = None,
                   workers: int | None = None) -> dict:
    """{"digest", "files", "bytes", "hashed"} of a dataset directory's content.

    `hashed` is how many files were read this time (the rest came from the manifest `cache`).
    """
    root = Path(root)
    old = _load(Path(cache) if cache else None)
    found = _walk(root)
    files: dict[str, list] = {}
    todo: list[str] = []
    for rel, st in found.items():
        if st is None:
            files[rel] = [-1, 0, 0, 0, "missing"]
            continue
        key = _stat_key(st)
        prev = old.get(rel)
        if isinstance(prev, list) and len(prev) == 5 and prev[:4] == key:
            files[rel] = prev
        else:
            files[rel] = key + [None]
            todo.append(rel)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL
        for rel, h in zip(todo, pool.map(lambda r: _sha256(str(root / r)), todo), strict=True):
            files[rel][4] = h
    h = hashlib.sha256(b"cnnvis-dataset-content-v1\n")
    total = 0
    for rel in sorted(files):
        size, digest = files[rel][0], files[rel][4]
        total += max(size, 0)
        h.update(f"{rel}\0{size}\0{digest}\n".encode("utf-8", "surrogateescape"))
    if cache and (todo or set(old) != set(files)):
        _save(Path(cache), files)
    return {"digest": h.hexdigest(), "files": len(files), "bytes": total, "hashed": len(todo)}


def file_sha256(path: str | Path, *, cache: str | Path | None = None) -> str:
    """sha256 of one file; with `cache`, read again only when its stat changed."""
    path = Path(path)
    st = path.stat()
    key = _stat_key(st)
    absolute = str(path.resolve())
    old = _load(Path(cache) if cache else None)
    prev = old.get(absolute)
    if isinstance(prev, list) and len(prev) == 5 and prev[:4] == key:
        return prev[4]
    digest = _sha256(str(path))
    if cache:
        old[absolute] = key + [digest]
        _save(Path(cache), old)
    return digest


def module_source_files(module: str, search: list[str] | None = None) -> list[Path] | None:
    """The files whose source defines `module` ("a.b.c": a/__init__.py, a/b/__init__.py,
    a/b/c.py), found with the import system's path finder, which executes nothing; None when
    the module is not found (the job that imports it reports that)."""
    path = list(search) if search is not None else [os.getcwd(), *sys.path]
    parts = module.split(".")
    files: list[Path] = []
    for i in range(len(parts)):
        try:
            spec = PathFinder.find_spec(".".join(parts[: i + 1]), path)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.origin and spec.has_location and os.path.isfile(spec.origin):
            files.append(Path(spec.origin))
        path = list(spec.submodule_search_locations or [])
    return files


def write_if_changed(path: str | Path, text: str) -> bool:
    """Write `text` to `path` (fileio.write_text: temp file, then rename) unless it already
    holds exactly that. True if the file was written."""
    path = Path(path)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text)
    return True
