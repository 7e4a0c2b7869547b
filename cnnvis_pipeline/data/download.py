"""Download, verify and unpack a Broden-format dataset into a shared data root (`resources/`).

- fetch_dataset(spec, data_root): the config's `dataset` mapping (data/source.py says what it
  means) to a complete dataset directory, `data_root/<name>`; does nothing when that directory is
  already complete.
- is_complete(path): whether a dataset directory carries the completion marker.
- check_recorded(dest, src): the entry's marker records an archive of the checksum(s) asked for.

The archive is streamed by pooch with a downloader that resumes `<name>.zip.part` with an HTTP Range
request, is verified against the checksum, then unpacked (data/archive.py) into a hidden temporary
directory that gets the `.complete` marker and is renamed into place in one step: a killed or
failed run never leaves a directory that looks complete. A `file://` URL copies an archive already
on this machine, verified like a download. The entry's lock (data/entries.py) serialises
concurrent runs on one dataset.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from cnnvis_pipeline.data.archive import (
    dataset_root,
    default_max_expansion,
    extract_zip_safely,
    out_of_space,
)
from cnnvis_pipeline.data.entries import entry_lock
from cnnvis_pipeline.data.source import (
    DatasetSource,
    checksum_mismatch,
    file_hashes,
    resolve_source,
)
from cnnvis_pipeline.errors import CnnvisError

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
CHUNK_SIZE = 1 << 16  # bytes per read while streaming
RETRY_WAIT = 2.0  # seconds; the n-th retry waits n times this


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


# -- download -----------------------------------------------------------------------------------
class _Interrupted(Exception):
    """The transfer stopped early; the .part file keeps what arrived."""


class ResumingDownloader:
    """A pooch downloader that appends to a persistent `.part` file using HTTP Range requests.

    pooch hands it a temporary file; the bytes go to `part` (which survives a failure), and only a
    complete transfer whose checksum matches is moved onto pooch's temporary file.
    """

    def __init__(self, part: Path, src: DatasetSource, *, progress: bool, timeout: float):
        self.part = part
        self.src = src
        self.progress = progress
        self.timeout = timeout
        self.hashes: dict[str, str] | None = None

    def __call__(self, url, output_file, pooch, check_only=False):
        import requests

        if check_only:
            r = requests.head(url, timeout=self.timeout, allow_redirects=True)
            return r.status_code == 200
        for fresh in (False, True):
            if fresh and self.part.exists():
                self.part.unlink()
            if self._fetch(requests, url):
                break
        else:  # pragma: no cover - _fetch with no .part always finishes or raises
            raise _Interrupted("the server's answers to a resumed request were inconsistent")
        self.hashes = file_hashes(self.part)
        problem = checksum_mismatch(self.src, self.hashes)
        if problem:
            self.part.unlink()
            raise CnnvisError(problem)
        os.replace(self.part, output_file)

    def _fetch(self, requests, url: str) -> bool:
        """One request; False if the partial file must be discarded and the fetch restarted."""
        offset = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as r:
            if offset and r.status_code == 416:  # nothing left to send: complete, or not ours
                return _content_range(r.headers.get("Content-Range"))[2] == offset
            if offset and r.status_code == 206:
                start, _, total = _content_range(r.headers.get("Content-Range"))
                if start != offset:
                    return False
                mode = "ab"
            elif r.status_code == 200:
                if offset:
                    log.info("%s: server ignored the Range request; starting again", url)
                offset, mode = 0, "wb"
                length = r.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            else:
                r.raise_for_status()
                raise CnnvisError(f"{url}: unexpected HTTP status {r.status_code}")
            bar = tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {self.src.name}",
                disable=not self.progress,
                leave=False,
            )
            try:
                with open(self.part, mode) as f:
                    for chunk in r.iter_content(chunk_size=CHUNK_SIZE):
                        f.write(chunk)
                        bar.update(len(chunk))
            except OSError as e:
                if not out_of_space(e):
                    raise
                got = self.part.stat().st_size if self.part.exists() else 0
                self.part.unlink(missing_ok=True)
                free = shutil.disk_usage(self.part.parent).free
                need = f" of {total}" if total else ""
                raise CnnvisError(
                    f"{url}: ran out of space downloading to {self.part} ({e.strerror}) after "
                    f"{got}{need} bytes, {free} bytes free; the partial file was removed: free "
                    "space (or set data_root elsewhere) and run again"
                ) from None
            finally:
                bar.close()
        size = self.part.stat().st_size
        if total is not None and size != total:
            raise _Interrupted(f"got {size} of {total} bytes")
        return True


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """`bytes a-b/total` or `bytes */total` -> (a, b, total); None for what is missing."""
    m = re.match(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", value or "")
    if not m:
        return None, None, None
    a, b, total = m.groups()
    return (
        int(a) if a else None,
        int(b) if b else None,
        int(total) if total and total != "*" else None,
    )


def _local_file(url: str) -> Path:
    from urllib.request import url2pathname

    return Path(url2pathname(urlsplit(url).path))


def _copy_local(src: DatasetSource, archive: Path, part: Path):
    """A `file://` archive: copied to `part`, verified, renamed to `archive`; return its hashes."""
    path = _local_file(src.url)
    if not path.is_file():
        raise CnnvisError(f"{src.url}: no such file {path} (dataset url:/mirror: file://...)")
    try:
        try:
            shutil.copyfile(path, part)
        except OSError as e:
            if not out_of_space(e):
                raise CnnvisError(f"{src.url}: cannot copy {path} ({e.strerror or e})") from None
            raise CnnvisError(
                f"{src.url}: ran out of space copying to {part} ({e.strerror}); the partial "
                "file was removed: free space (or set data_root elsewhere) and run again"
            ) from None
        hashes = file_hashes(part)
        problem = checksum_mismatch(src, hashes)
        if problem:
            raise CnnvisError(problem.replace("the download was deleted", "the copy was deleted"))
        os.replace(part, archive)
    finally:
        part.unlink(missing_ok=True)
    return archive, hashes


def _connection_reason(e: Exception, url: str) -> str:
    """`cannot connect to HOST (why)`, whole: requests' message nests urllib3's reprs."""
    text = str(e)
    m = (re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
         or re.search(r"(Name or service not known|Temporary failure in name resolution|"
                      r"Connection refused|Network is unreachable|No route to host|"
                      r"timed out)", text))
    why = m.group(1).strip().rstrip(".") if m else type(e).__name__
    host = urlsplit(url).netloc or url
    return f"cannot connect to {host}: {why}"


def _gave_up(src: DatasetSource, part: Path, kept: int, reason: str,
             attempts: int) -> CnnvisError:
    """The error after the last attempt: how to resume, and the other ways to the dataset."""
    alternatives = (
        "give dataset.mirror: with another host's URL, or, on a machine without network, "
        f"copy {src.name}.zip here and give mirror: file:///path/to/{src.name}.zip, or "
        "unpack it and give dataset.path: (the directory) instead of download:/url:"
    )
    if kept:
        return CnnvisError(
            f"{src.url}: download interrupted ({reason}); {kept} bytes kept in {part}: "
            f"run the same command again to resume; or {alternatives}"
        )
    return CnnvisError(
        f"{src.url}: download failed after {attempts} attempt(s) ({reason}); "
        f"nothing was downloaded. To get the dataset anyway, {alternatives}"
    )


def _download(src: DatasetSource, data_root: Path, *, progress, retries, timeout):
    """Fetch and verify `data_root/<name>.zip` (pooch keeps a verified copy); return its hashes."""
    archive = data_root / f"{src.name}.zip"
    part = data_root / f"{src.name}.zip.part"
    if urlsplit(src.url).scheme == "file":
        return _copy_local(src, archive, part)

    import pooch
    import requests

    alg, expected = next(iter(src.checksums.items()))
    for attempt in range(retries + 1):
        dl = ResumingDownloader(part, src, progress=progress, timeout=timeout)
        try:
            pooch.retrieve(
                src.url,
                known_hash=f"{alg}:{expected}",
                fname=archive.name,
                path=data_root,
                downloader=dl,
                progressbar=False,
            )
            hashes = dl.hashes or file_hashes(archive)
            problem = checksum_mismatch(src, hashes)  # pooch checked one; check them all
            if problem:
                archive.unlink()
                raise CnnvisError(problem)
            return archive, hashes
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if code < 500 or attempt == retries:
                raise CnnvisError(f"{src.url}: download failed: HTTP {code}") from None
            reason = f"HTTP {code}"
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            _Interrupted,
        ) as e:
            if isinstance(e, requests.exceptions.ChunkedEncodingError):
                reason = "the connection broke mid-transfer"
            elif isinstance(e, requests.Timeout):
                reason = f"no data for {timeout:g} s"
            elif isinstance(e, requests.ConnectionError):
                reason = _connection_reason(e, src.url)
            else:
                reason = str(e)
        except requests.RequestException as e:
            raise CnnvisError(f"{src.url}: download failed ({e})") from None
        except ValueError as e:  # pooch's own checksum check (ours runs first and is the same)
            raise CnnvisError(f"{src.url}: {e}") from None
        kept = part.stat().st_size if part.exists() else 0
        if attempt == retries:
            raise _gave_up(src, part, kept, reason, retries + 1)
        wait = RETRY_WAIT * (attempt + 1)
        log.warning("%s: %s; resuming from byte %d in %.0f s", src.url, reason, kept, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# -- the whole thing ----------------------------------------------------------------------------
def _already_done(dest: Path, src: DatasetSource) -> bool:
    """True if `dest` is a complete download of this archive; raise if it is something else."""
    if not dest.exists() and not dest.is_symlink():
        return False
    check_recorded(dest, src)
    return True


def check_recorded(dest: Path, src: DatasetSource) -> None:
    """Raise CnnvisError unless the dataset entry `dest` records (in its .complete marker) the
    download of an archive with the checksum(s) `src` asks for: an entry of another archive, of
    the generator, or without a record is never taken for this one."""
    marker = dest / COMPLETE_MARKER
    if not marker.is_file():
        raise CnnvisError(
            f"{dest}: exists but is not a complete download (no {COMPLETE_MARKER} marker); "
            "remove it, or set another dataset name"
        )
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    recorded = recorded if isinstance(recorded, dict) else {}
    wanted = ", ".join(f"{alg} {h}" for alg, h in src.checksums.items())
    if recorded.get("generator"):
        made = ", ".join(f"{k} {v}" for k, v in sorted(recorded.items()) if k != "generator")
        have = f"a {recorded['generator']} dataset ({made})"
    else:
        sums = ", ".join(f"{alg} {recorded[alg]}" for alg in ("sha256", "md5")
                         if isinstance(recorded.get(alg), str))
        have = f"the download of {recorded.get('url') or 'an unrecorded URL'} ({sums or 'no checksum recorded'})"
    same = [recorded.get(alg) == h for alg, h in src.checksums.items() if recorded.get(alg)]
    if not same or not all(same):
        raise CnnvisError(
            f"{dest}: holds {have}, but the config asks for the archive {src.url} ({wanted}); "
            "a dataset entry is never reused for another archive: set dataset.name to a new "
            f"name, or remove {dest}"
        )


def fetch_dataset(
    spec: dict,
    data_root: str | Path,
    *,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
    max_expansion: float | None = None,
) -> Path:
    """Make `data_root/<name>` a complete, verified Broden dataset directory and return its path.

    Does nothing if it already is one. A broken transfer is resumed (up to `retries` times here,
    and again by the next call); errors are CnnvisError naming the URL or file.
    """
    src = resolve_source(spec)
    if max_expansion is None:
        max_expansion = spec.get("max_expansion") or default_max_expansion()
    if isinstance(max_expansion, bool) or not isinstance(max_expansion, (int, float)) \
            or max_expansion < 1:
        raise CnnvisError(f"dataset.max_expansion: expected a number >= 1, got {max_expansion!r}")
    data_root = Path(data_root)
    dest = data_root / src.name
    if _already_done(dest, src):
        return dest
    data_root.mkdir(parents=True, exist_ok=True)
    with entry_lock(dest, what="this dataset"):
        if _already_done(dest, src):  # another process finished it while we waited
            return dest
        for stale in data_root.glob(f".{src.name}.extract-*"):
            shutil.rmtree(stale, ignore_errors=True)
        archive, hashes = _download(
            src, data_root, progress=progress, retries=retries, timeout=timeout
        )
        tmp = data_root / f".{src.name}.extract-{os.getpid()}"
        try:
            extract_zip_safely(archive, tmp, progress=progress, max_expansion=max_expansion)
            root = dataset_root(tmp, src.url)
            record = {"name": src.name, "url": src.url, **hashes, "completed": time.time()}
            (root / COMPLETE_MARKER).write_text(json.dumps(record, indent=1) + "\n")
            os.rename(root, dest)
        except CnnvisError:
            archive.unlink(missing_ok=True)  # verified but unusable: do not keep it around
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)
    log.info("%s: dataset ready (from %s)", dest, src.url)
    return dest
