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
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _tmp_name(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig, path: str | Path, **kw) -> Path:
    """A PNG without time stamps (same inputs, same bytes), written atomically."""
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, metadata={"Software": None, "Creation Time": None}, **kw)
    return Path(path)
