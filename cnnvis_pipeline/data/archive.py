"""Unpacking a downloaded zip safely.

- extract_zip_safely(archive, target): unpack a zip, refusing the whole archive (before writing
  anything) if any entry would land outside `target`, if it expands more than `max_expansion`
  times (default from the schema: a zip bomb) or needs more than the free space (naming the
  entry).
- dataset_root(extracted, url): the Broden directory inside an unpacked archive.
- out_of_space(error): whether an OSError means the disk (or quota) is full.
"""

from __future__ import annotations

import errno
import re
import shutil
import stat
import zipfile
from pathlib import Path

from tqdm import tqdm

from cnnvis_pipeline.errors import CnnvisError

EXPANSION_MIN_BYTES = 1 << 20  # smaller unpacked sizes are never a bomb (a tiny CSV may be 100x)


def out_of_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def default_max_expansion() -> float:
    """`dataset.max_expansion`'s default, from the schema (the only place with defaults)."""
    from cnnvis_pipeline.config import load_schema

    return float(load_schema()["properties"]["dataset"]["properties"]["max_expansion"]["default"])


def _unsafe_reason(info: zipfile.ZipInfo, target: Path) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if not name or "\x00" in name:
        return "has an empty or NUL-containing name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "contains '..'"
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is a special file (device, FIFO or socket)"
    base = target.resolve()
    full = (target / name).resolve()
    if full != base and base not in full.parents:
        return "resolves outside the target directory"
    return None


def _unsafe_entries(infos: list[zipfile.ZipInfo], target: Path) -> list[str]:
    """Every entry that must not be unpacked, with the reason: unsafe names and kinds, entries
    that repeat another, paths that are both a file and a directory."""
    bad, files, dirs = [], set(), set()
    for info in infos:
        reason = _unsafe_reason(info, target)
        if reason:
            bad.append(f"{info.filename!r} {reason}")
            continue
        norm = info.filename.replace("\\", "/").strip("/")
        parts = [p for p in norm.split("/") if p not in ("", ".")]
        key = "/".join(parts)
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if info.is_dir():
            dirs.add(key)
        elif key in files:
            bad.append(f"{info.filename!r} appears twice")
        else:
            files.add(key)
    return bad + [f"{f!r} is both a file and a directory" for f in sorted(files & dirs)]


def _expansion_problem(archive: Path, infos: list[zipfile.ZipInfo], limit: float) -> str | None:
    """Why the archive expands suspiciously (a zip bomb), naming the worst entry; else None."""
    files = [i for i in infos if not i.is_dir()]
    if not files:
        return None
    worst = max(files, key=lambda i: i.file_size / max(i.compress_size, 1))
    ratio = worst.file_size / max(worst.compress_size, 1)
    if worst.file_size > EXPANSION_MIN_BYTES and ratio > limit:
        return (f"entry {worst.filename!r} expands {ratio:.0f}x ({worst.compress_size} -> "
                f"{worst.file_size} bytes)")
    total = sum(i.file_size for i in files)
    size = max(archive.stat().st_size, 1)
    if total > EXPANSION_MIN_BYTES and total / size > limit:
        return (f"the archive expands {total / size:.0f}x ({size} -> {total} bytes; most: "
                f"entry {worst.filename!r}, {ratio:.0f}x)")
    return None


def _check_free_space(archive: Path, infos: list[zipfile.ZipInfo], target: Path) -> int:
    """The unpacked size; raise naming the first entry that would not fit."""
    need = sum(i.file_size for i in infos)
    free = shutil.disk_usage(target.parent).free
    if need > free:
        running, first = 0, infos[-1]
        for info in infos:
            running += info.file_size
            if running > free:
                first = info
                break
        raise CnnvisError(
            f"{archive}: needs {need} bytes unpacked but {target.parent} has {free} "
            f"free (entry {first.filename!r} would not fit); nothing was extracted"
        )
    return need


def _check_archive(archive: Path, infos: list[zipfile.ZipInfo], target: Path,
                   max_expansion: float) -> int:
    """Refuse the whole archive before anything is written; return its unpacked size."""
    bad = _unsafe_entries(infos, target)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CnnvisError(
            f"{archive}: refusing to extract: entry {'; entry '.join(bad[:5])}{more}; "
            "nothing was extracted"
        )
    problem = _expansion_problem(archive, infos, max_expansion)
    if problem:
        raise CnnvisError(
            f"{archive}: refusing to extract: {problem}, more than the limit of "
            f"{max_expansion:g}x (dataset.max_expansion); nothing was extracted"
        )
    return _check_free_space(archive, infos, target)


def _unpack_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path, target: Path,
                  bar) -> None:
    """One entry; it may not unpack to more than its declared size."""
    dest = target / info.filename
    try:
        if info.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with zf.open(info) as src, open(dest, "xb") as out:
            while block := src.read(1 << 20):
                written += len(block)
                if written > info.file_size:
                    raise CnnvisError(
                        f"{archive}: entry {info.filename!r} unpacks to more "
                        f"than its declared {info.file_size} bytes; refused"
                    )
                out.write(block)
                bar.update(len(block))
    except OSError as e:
        if out_of_space(e):
            raise CnnvisError(
                f"{archive}: ran out of space unpacking entry {info.filename!r} "
                f"into {target.parent} ({e.strerror}); the partial extraction "
                "was removed: free space and run again"
            ) from None
        raise CnnvisError(
            f"{archive}: cannot unpack entry {info.filename!r} ({e.strerror or e})"
        ) from None


def extract_zip_safely(archive: Path, target: Path, *, progress: bool = False,
                       max_expansion: float | None = None) -> None:
    """Unpack `archive` into `target` (which must not exist yet).

    Every entry is checked first; if any is absolute, contains `..`, is a symlink or special
    file, or repeats another entry, or the archive expands more than `max_expansion` times its
    size (a zip bomb), or needs more than the free space, the whole archive is refused and
    nothing is written. An entry that unpacks to more than its declared size, or a disk that
    fills up anyway, stops the extraction naming the entry (the caller removes `target`).
    """
    archive, target = Path(archive), Path(target)
    if max_expansion is None:
        max_expansion = default_max_expansion()
    if target.exists():
        raise CnnvisError(f"{target}: already exists; will not extract over it")
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            need = _check_archive(archive, infos, target, max_expansion)
            target.mkdir()
            with tqdm(total=need, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"unpack {archive.name}", disable=not progress, leave=False) as bar:
                for info in infos:
                    _unpack_entry(zf, info, archive, target, bar)
    except zipfile.BadZipFile as e:
        raise CnnvisError(f"{archive}: not a valid zip archive ({e})") from None


def dataset_root(extracted: Path, url: str) -> Path:
    """The extracted dataset's top directory: the folder itself or its single subfolder."""
    if (extracted / "index.csv").is_file():
        return extracted
    entries = [p for p in extracted.iterdir() if p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "index.csv").is_file():
        return entries[0]
    raise CnnvisError(
        f"{url}: the archive holds no Broden dataset (no index.csv at its top level or in its "
        "single top-level folder)"
    )
