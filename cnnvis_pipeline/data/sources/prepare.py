"""Validation and preparation of a source (`dataset` mapping), as shared entries.

- open_any(dataset, problems=None): the Source of a mapping: one of SOURCE_KINDS, or a Broden
  directory (`path`, or the `directory` a synth/download dataset was made in) with its options.
- validate_source(dataset, workers=, max_problems=): every problem at once, up to
  `max_problems` (then the list says it stopped): the structure (CSV, JSON, folders), then
  every image and annotation decoded on a thread pool, each error naming its file.
- ensure_source_validated / ensure_source_prepared: once per content under the data root,
  as data/entries.py does for a Broden directory (its locks; complete for the same digest is
  success; a complete entry is never removed).
- prepared_digest(dataset, digest): the digest a prepared entry is keyed by.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cnnvis_pipeline.data.entries import ensure_prepared_entry, entry_lock, entry_name
from cnnvis_pipeline.data.manifest import write_if_changed
from cnnvis_pipeline.data.sources import (
    open_source,
    options,
    options_digest,
    source_kind,
    source_paths,
)
from cnnvis_pipeline.errors import CnnvisError

log = logging.getLogger(__name__)
MAX_PROBLEMS = 200  # validation stops listing (and decoding) after this many problems


def open_any(dataset: dict, problems: list[str] | None = None, *, directory: str | None = None,
             predictions: list | None = None):
    if source_kind(dataset):
        return open_source(dataset, problems, predictions=predictions)
    from cnnvis_pipeline.data.sources.broden import BrodenSource

    root = dataset.get("path") or directory
    if not root:
        raise CnnvisError("config: dataset: no Broden directory to read")
    opts = options(dataset)
    return BrodenSource(root, split=opts.get("split"), limit=opts.get("limit"))


def prepared_digest(dataset: dict, digest: str) -> str:
    """A source's digest already holds its options; a Broden directory's gets them added."""
    return digest if source_kind(dataset) else options_digest(digest, options(dataset))


def _check_files(source, workers: int, room: int) -> list[str]:
    """Decode every image and annotation; the errors of the first `room` bad images, in order."""
    def check(i: int) -> str | None:
        try:
            source.read(i)
        except CnnvisError as e:
            return str(e)
        return None

    out: list[str] = []
    step = max(64, workers * 16)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for lo in range(0, len(source), step):
            out += [p for p in pool.map(check, range(lo, min(lo + step, len(source)))) if p]
            if len(out) >= room:
                return out[:room]
    return out


def validate_source(dataset: dict, *, workers: int | None = None,
                    max_problems: int = MAX_PROBLEMS) -> tuple[list[str], str]:
    """(problems, summary line): every problem up to `max_problems`, else a one-line summary."""
    problems: list[str] = []
    try:
        source = open_source(dataset, problems)
    except CnnvisError as e:
        return [str(e)], ""
    workers = workers or min(8, os.cpu_count() or 1)
    problems += _check_files(source, workers, max(0, max_problems - len(problems) + 1))
    if len(problems) > max_problems:
        problems = problems[:max_problems] + [
            f"(stopped after {max_problems} problems; fix these and validate again)"]
    if problems:
        return problems, ""
    splits = {s: source.splits.count(s) for s in sorted(set(source.splits))}
    line = (f"{source.kind}: OK: {len(source)} images "
            f"({', '.join(f'{v} {k}' for k, v in splits.items())}), {len(source.concepts)} "
            f"concepts, {len(source.categories)} categories")
    return [], line


def ensure_source_validated(dataset: dict, *, data_root: str | Path, name: str, digest: str,
                            workers: int | None = None) -> tuple[list[str], str]:
    record = Path(data_root) / "validated" / f"{entry_name(name, digest)}.txt"
    with entry_lock(record, what="the validation of this dataset"):
        if record.is_file():
            return [], record.read_text(encoding="utf-8").strip()
        problems, line = validate_source(dataset, workers=workers)
        if not problems:
            write_if_changed(record, line + "\n")
    return problems, line


def ensure_source_prepared(dataset: dict, out: str | Path, *, digest: str, workers: int = 1,
                           progress: bool = False, directory: str | None = None,
                           predictions: list | None = None) -> Path:
    """`out` holds the prepared arrays of `dataset` (content and options: `digest`)."""
    from cnnvis_pipeline.data.prepared import write_prepared

    def make():
        source = open_any(dataset, directory=directory, predictions=predictions)
        if source.kind == "segmenter" and source.predicted is None:
            raise CnnvisError("source-prepare: a segmenter's dataset needs --predictions "
                              "(the output of cnnvis segment)")
        kind = source_kind(dataset)
        origin = (f"{kind}: {source_paths(dataset)[0][1].resolve()}" if kind
                  else str(Path(dataset.get("path") or directory).resolve()))
        write_prepared(source, out, size=options(dataset).get("size"), digest=digest,
                       workers=workers, progress=progress, origin=origin)

    return ensure_prepared_entry(out, digest, make)
