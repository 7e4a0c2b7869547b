"""The one way the project writes a file or a directory: under a temporary name, renamed when
complete, so that an interrupted run never leaves a half-written output that looks valid.

- atomic_file(path, suffix=""): a context manager yielding a temporary sibling path
  (`.<name>.tmp-<pid><suffix>`) to write; on success it replaces `path`, on failure it is removed.
  `suffix` keeps the extension that a writer insists on (np.savez adds `.npz`, matplotlib reads
  the format from it).
- write_text(path, text) / write_bytes(path, data): atomic_file for a whole text or byte string.
- save_figure(fig, path): a matplotlib figure as PNG without time stamps (same inputs, same
  bytes), through atomic_file.
- atomic_dir(out, stale=False): the same for a directory: yields an empty temporary sibling
  directory, renamed to `out` (replacing an incomplete leftover) when the block completes.
  `stale=True` first removes temporary siblings of earlier, killed attempts (they may hold
  gigabytes; Snakemake runs one job per output at a time).
- all_or_none(): every file that atomic_file completes inside the block is removed again when the
  block fails, so that a job with several outputs leaves none of them looking complete.
- WriteError: the OSError of a write that failed for a reason of the file system (no space,
  quota, read-only, permissions); its filename is the output's own path, not the temporary one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

# errno -> what the user reads ("no space left on device writing <path>")
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_groups: list[list[Path]] = []  # the open all_or_none blocks, innermost last


class WriteError(OSError):
    """Writing an output failed for a reason of the file system (WRITE_ERRORS)."""


def error_number(e: OSError) -> int | None:
    """The errno of an OSError; pyarrow's carry it only in the text (`[errno 28] ...`)."""
    if e.errno:
        return e.errno
    m = re.search(r"\[errno (\d+)\]", str(e), re.I)
    return int(m.group(1)) if m else None


def write_error(e: OSError, path: str | Path) -> WriteError | None:
    """A WriteError naming `path` for a file-system refusal, else None."""
    code = error_number(e)
    if code not in WRITE_ERRORS:
        return None
    return WriteError(code, WRITE_ERRORS[code], str(path))


def error_line(e: OSError) -> str | None:
    """One line for a file-system refusal ("no space left on device writing PATH (N bytes free)
    ..."), else None (a bug or another kind of failure, left to its traceback)."""
    code = error_number(e)
    if code not in WRITE_ERRORS:
        return None
    path = e.filename or "an output"
    verb = "accessing" if code in (errno.EACCES, errno.EPERM) and not isinstance(
        e, WriteError) else "writing"
    line = f"{WRITE_ERRORS[code]} {verb} {path}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(Path(path).parent if e.filename else ".").free
            line += f" ({free} bytes free): free space (or run elsewhere) and run again"
        except OSError:
            line += ": free space (or run elsewhere) and run again"
    elif code == errno.EROFS:
        line += ": the file system is mounted read-only: run in a writable --directory"
    else:
        line += ": this user may not write there: run in a writable --directory"
    return line


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    path = Path(path)
    tmp = _tmp_name(path, suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
        if _groups:
            _groups[-1].append(path)
    except OSError as e:
        mapped = write_error(e, path)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def all_or_none() -> Iterator[list[Path]]:
    """Outputs written (through atomic_file) inside the block are removed if the block fails."""
    written: list[Path] = []
    _groups.append(written)
    try:
        yield written
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    finally:
        _groups.pop()
        if _groups:
            _groups[-1].extend(written)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, stale: bool = False) -> Iterator[Path]:
    out = Path(out)
    if stale and out.parent.is_dir():
        for old in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
    tmp = _tmp_name(out)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = write_error(e, out) if isinstance(e, OSError) else None
        if mapped is None:
            raise
        raise mapped from None


def save_figure(fig, path: str | Path, **kw) -> Path:
    """A PNG without time stamps (same inputs, same bytes), written atomically."""
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, metadata={"Software": None, "Creation Time": None}, **kw)
    return Path(path)
