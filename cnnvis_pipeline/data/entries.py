"""Entries shared under a data root by concurrent runs: one lock per entry, receipts per run.

A data root (`{data_root}/datasets/<name>`, `validated/<name>-<digest>.txt`,
`prepared/<name>-<digest>/`) is shared by every run that names it, also by runs started at the
same moment. The rules are:

- every entry is made under its own lock (`entry_lock(entry)`: `.<entry name>.lock` beside it,
  an OS lock (flock) that the kernel releases when its holder dies, so a killed run never blocks
  later ones; a waiting run says whom it waits for);
- under the lock, an entry that is already complete for the same content is success, and a run
  only ever adds a complete entry by renaming a finished temporary directory into place, so
  nothing deletes a complete entry;
- the workflow's rules output small per-run receipts under results/ (which Snakemake may delete
  when a job fails), never the shared entries themselves.

- entry_lock(entry): the lock context manager.
- remove_stale_temporaries(entry): under the lock, temporary siblings of killed attempts.
- ensure_synth / ensure_validated / ensure_prepared: the dataset's entries, each complete once
  per content; check_synth: a dataset entry is the broden-synth dataset of given parameters; write_dataset_digest: the digest file (a receipt, data/receipts.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from cnnvis_pipeline.data.manifest import dataset_digest, write_if_changed
from cnnvis_pipeline.data.receipts import write_receipt
from cnnvis_pipeline.errors import CnnvisError

log = logging.getLogger(__name__)
WAIT_REPORT_S = 30.0  # how often a waiting run says it is still waiting


def lock_path(entry: str | Path) -> Path:
    entry = Path(entry)
    return entry.with_name(f".{entry.name}.lock")


@contextmanager
def entry_lock(entry: str | Path, *, what: str = "this entry") -> Iterator[Path]:
    """Hold the lock of `entry` (created beside it; the lock file itself stays)."""
    path = lock_path(entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnvisError(f"{path.parent}: cannot create the directory ({e.strerror})") from None
    lock = FileLock(str(path))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s: another run is making %s; waiting for it (a run that was killed "
                     "releases the lock)", path, what)
            waited = 0.0
            while True:
                try:
                    lock.acquire(timeout=WAIT_REPORT_S)
                    break
                except Timeout:
                    waited += WAIT_REPORT_S
                    log.info("%s: still waiting (%.0f s)", path, waited)
    except OSError as e:
        raise CnnvisError(f"{path}: cannot lock ({e.strerror or e})") from None
    try:
        yield path
    finally:
        lock.release()


def remove_stale_temporaries(entry: str | Path) -> None:
    """Remove `.<name>.tmp-*` siblings of `entry`: while its lock is held, they are leftovers
    of killed attempts (they may hold gigabytes). Call only while holding entry_lock(entry)."""
    entry = Path(entry)
    if entry.parent.is_dir():
        for old in entry.parent.glob(f".{entry.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)


# -- the dataset's entries ----------------------------------------------------------------------
SYNTH_MARKER = ".complete"


def entry_name(name: str, digest: str) -> str:
    """`<name>-<16 hex digits of the content digest>`: one entry per content."""
    return f"{name}-{digest[:16]}"


def dataset_digest_record(dataset: str | Path, *, manifest: str | Path | None) -> dict:
    """The content digest of a dataset directory (see manifest.dataset_digest), as the digest
    file holds it; raise CnnvisError when the directory is missing."""
    dataset = Path(dataset)
    if not dataset.is_dir():
        raise CnnvisError(f"{dataset}: dataset directory does not exist")
    try:
        d = dataset_digest(dataset, cache=manifest)
    except OSError as e:
        raise CnnvisError(f"{e.filename or dataset}: cannot read ({e.strerror or e})") from None
    return {"dataset": str(dataset), "digest": d["digest"], "files": d["files"],
            "bytes": d["bytes"]}


def write_dataset_digest(dataset: str | Path, out: str | Path, *,
                         manifest: str | Path | None) -> dict:
    """Write the digest file `out` (only when its content changes); return the record."""
    record = dataset_digest_record(dataset, manifest=manifest)
    write_receipt(out, "dataset-digest", **record)
    return record


def ensure_synth(out: str | Path, *, images: int, size: int, seed: int) -> Path:
    """`out` is a broden-synth dataset of these parameters: generated under its lock, or found
    complete (success); a directory of other parameters is an error, never overwritten."""
    from cnnvis_pipeline.data.synth import generate_broden_synth

    out = Path(out)
    want = {"generator": "broden-synth", "images": int(images), "size": int(size),
            "seed": int(seed)}
    with entry_lock(out, what="this broden-synth dataset"):
        if out.exists():
            check_synth(out, want)
            log.info("%s: already complete (broden-synth %s)", out, want)
            return out
        remove_stale_temporaries(out)
        work = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            ds = generate_broden_synth(work / "ds", n_images=images, image_size=size, seed=seed)
            (ds / SYNTH_MARKER).write_text(json.dumps(want, sort_keys=True) + "\n")
            os.rename(ds, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def check_synth(out: Path, want: dict) -> None:
    """Raise CnnvisError unless `out` is the broden-synth dataset of the parameters `want`."""
    marker = out / SYNTH_MARKER
    try:
        have = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        have = None
    except (OSError, ValueError):
        have = {}
    if have is None:  # made before markers existed: atomic, so complete; check what we can
        try:
            with (out / "index.csv").open(encoding="utf-8") as f:
                rows = sum(1 for _ in f) - 1
        except OSError:
            rows = -1
        if rows != want["images"]:
            raise CnnvisError(
                f"{out}: exists but is not a broden-synth dataset of {want['images']} images "
                f"(index.csv has {rows} rows); set another dataset name, or remove it"
            )
        return
    if have != want:
        raise CnnvisError(
            f"{out}: holds another dataset ({have}), not broden-synth {want}; set another "
            "dataset name (dataset.name), or remove it"
        )


def ensure_validated(dataset: str | Path, *, data_root: str | Path, name: str, digest: str,
                     workers: int | None = None, progress: bool = False):
    """Validate a dataset once per content: `{data_root}/validated/<name>-<digest>.txt` records
    a dataset that passed. Returns (problems, summary line)."""
    from cnnvis_pipeline.data.validate import summary_line, validation_report

    record = Path(data_root) / "validated" / f"{entry_name(name, digest)}.txt"
    with entry_lock(record, what="the validation of this dataset"):
        if record.is_file():
            return [], record.read_text(encoding="utf-8").strip()
        report = validation_report(dataset, progress=progress, workers=workers)
        if report.problems:
            return report.problems, ""
        line = summary_line(Path(dataset), report)
        write_if_changed(record, line + "\n")
    return [], line


def ensure_prepared(dataset: str | Path, out: str | Path, *, digest: str,
                    image_size: int | None = None, progress: bool = False,
                    workers: int = 1) -> Path:
    """`out` holds the prepared arrays of the dataset content `digest`: made under its lock, or
    found complete for the same digest (success). A complete entry of another content is an
    error; a complete entry is never removed."""
    from cnnvis_pipeline.data.prepared import prepare_dataset

    return ensure_prepared_entry(out, digest, lambda: prepare_dataset(
        dataset, out, image_size=image_size, progress=progress, digest=digest, workers=workers))


def ensure_prepared_entry(out: str | Path, digest: str, make) -> Path:
    """The shared prepared entry `out` for content `digest`, under its lock: found complete for
    the same digest (success), or made by `make()` (writing `out`) when absent. A complete
    entry of another content, or a directory without meta.json, is an error and is left as it
    is; stale temporaries of killed attempts are removed first."""
    out = Path(out)
    with entry_lock(out, what="the prepared arrays of this dataset"):
        meta = out / "meta.json"
        if meta.is_file():
            try:
                have = json.loads(meta.read_text(encoding="utf-8")).get("digest")
            except (OSError, ValueError, AttributeError):
                have = None
            if have == digest:
                log.info("%s: already prepared (dataset digest %s)", out, digest[:16])
                return out
            raise CnnvisError(
                f"{out}: holds the prepared arrays of other content (dataset digest "
                f"{str(have)[:16]}, not {digest[:16]}); choose another output, or remove it"
            )
        if out.exists():
            raise CnnvisError(
                f"{out}: exists but is not a prepared dataset (no meta.json); remove it"
            )
        remove_stale_temporaries(out)
        make()
    return out
