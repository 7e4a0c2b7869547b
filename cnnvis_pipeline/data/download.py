"""Download, verify and unpack a Broden-format dataset into a shared data root (`resources/`).

- fetch_dataset(spec, data_root): the config's `dataset` mapping to a complete dataset directory,
  `data_root/<name>`; does nothing when that directory is already complete.
- resolve_source(spec): which URL, directory name and checksum(s) a spec means.
- extract_zip_safely(archive, target): unpack a zip, refusing the whole archive (before writing
  anything) if any entry would land outside `target`, if it expands more than `max_expansion`
  times (default 100x: a zip bomb) or needs more than the free space (naming the entry).
- is_complete(path): whether a dataset directory carries the completion marker.

Specs: `{download: broden1_224}` (also broden1_227, broden1_384: the official URLs; only
broden1_224 has a pinned md5, the others need `sha256:` or `md5:`), optionally with `url:` or
`mirror:` to fetch the same archive elsewhere; or `{url: ..., sha256: ...}` / `{url: ..., md5: ...}`
for any Broden-format zip, with an optional `name:` for the directory (default: the URL's file
stem and 8 hex digits of the URL's hash, as in config.dataset_name). A checksum given in the spec
replaces the pinned one. A `file://` URL (url: or mirror:) copies an archive already on this
machine (an offline node), verified like a download.

The archive is streamed by pooch with a downloader that resumes `<name>.zip.part` with an HTTP Range
request, is verified against the checksum, then unpacked into a hidden temporary directory that
gets the `.complete` marker and is renamed into place in one step: a killed or failed run never
leaves a directory that looks complete. A lock file serialises concurrent runs on one dataset.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from cnnvis_pipeline.errors import CnnvisError, check_name

try:  # POSIX only; elsewhere concurrent runs are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

OFFICIAL_BASE = "http://netdissect.csail.mit.edu/data"
KNOWN_DATASETS: dict[str, dict[str, str | None]] = {
    "broden1_224": {"md5": "be13c292eaef3300da03f8d0e48eab1c"},
    "broden1_227": {"md5": None},
    "broden1_384": {"md5": None},
}
COMPLETE_MARKER = ".complete"
CHUNK_SIZE = 1 << 16  # bytes per read while streaming
EXPANSION_MIN_BYTES = 1 << 20  # smaller unpacked sizes are never a bomb (a tiny CSV may be 100x)
RETRY_WAIT = 2.0  # seconds; the n-th retry waits n times this
_HEX = {"md5": re.compile(r"^[0-9a-f]{32}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}


@dataclass(frozen=True)
class DatasetSource:
    name: str  # directory name under the data root
    url: str
    md5: str | None = None
    sha256: str | None = None

    @property
    def checksums(self) -> dict[str, str]:
        return {alg: h for alg, h in (("sha256", self.sha256), ("md5", self.md5)) if h}


def resolve_source(spec: dict) -> DatasetSource:
    """Check a `dataset` spec and say what to fetch; raise CnnvisError naming the bad key."""
    if not isinstance(spec, dict):
        raise CnnvisError(f"dataset: expected a mapping, got {type(spec).__name__}")
    for key in ("download", "url", "mirror", "name", "md5", "sha256"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise CnnvisError(f"dataset.{key}: expected a string, got {spec[key]!r}")
    url, mirror = spec.get("url"), spec.get("mirror")
    if url and mirror and url != mirror:
        raise CnnvisError("dataset: give either url: or mirror:, not both")
    url = url or mirror
    checksums = {}
    for alg in ("md5", "sha256"):
        value = spec.get(alg)
        if value:
            value = value.strip().lower()
            if not _HEX[alg].match(value):
                digits = 32 if alg == "md5" else 64
                raise CnnvisError(f"dataset.{alg}: {value!r} is not {digits} hex digits")
            checksums[alg] = value
    known = spec.get("download")
    if known:
        if known not in KNOWN_DATASETS:
            raise CnnvisError(
                f"dataset.download: unknown dataset {known!r}; known: {', '.join(KNOWN_DATASETS)}"
                " (for any other Broden-format zip give url: and sha256: or md5:)"
            )
        name = check_name("dataset", spec.get("name") or known, where="dataset.name")
        official = f"{OFFICIAL_BASE}/{known}.zip"
        url = url or official
        if not checksums:
            pinned = KNOWN_DATASETS[known]["md5"]
            if not pinned:
                raise CnnvisError(
                    f"dataset: no checksum is pinned for {known}; give sha256: or md5: "
                    f"(--sha256/--md5) of {url}, from a copy you trust, so it can be verified"
                )
            checksums["md5"] = pinned
    elif url:
        name = check_name("dataset", spec.get("name") or default_name(url), where="dataset.name")
        if not checksums:
            raise CnnvisError(
                f"dataset: url {url} needs sha256: or md5: so the download can be verified"
            )
    else:
        raise CnnvisError(
            f"dataset: give download: ({', '.join(KNOWN_DATASETS)}) or url: with sha256: or md5:"
        )
    parts = urlsplit(url)
    key = "mirror" if mirror and not spec.get("url") else "url"
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise CnnvisError(
                f"dataset.{key}: {url!r}: a file URL names a local path, file:///abs/path.zip"
            )
    elif parts.scheme not in ("http", "https") or not parts.netloc:
        raise CnnvisError(
            f"dataset.{key}: {url!r} must be an http://, https:// or file:// URL"
        )
    return DatasetSource(name=name, url=url, **checksums)


def default_name(url: str) -> str:
    """Directory name of a `url:` dataset without `name:`: `<file stem>-<8 hex of the URL>`.

    The same rule as cnnvis_pipeline.config.dataset_name, so the CLI and the workflow agree.
    """
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(url.split("?")[0]).stem)[:40] or "dataset"
    canonical = json.dumps(url, sort_keys=True, separators=(",", ":"))
    return f"{stem}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def file_hashes(path: Path) -> dict[str, str]:
    """md5 and sha256 of a file, in one pass."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _checksum_mismatch(src: DatasetSource, actual: dict[str, str]) -> str | None:
    for alg, expected in src.checksums.items():
        if actual[alg] != expected:
            return (
                f"{src.url}: {alg} checksum mismatch: expected {expected}, got {actual[alg]}; "
                "the download was deleted (a corrupt transfer, a changed file, or a wrong "
                "checksum in the config)"
            )
    return None


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
        problem = _checksum_mismatch(self.src, self.hashes)
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
                if not _out_of_space(e):
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
            if not _out_of_space(e):
                raise CnnvisError(f"{src.url}: cannot copy {path} ({e.strerror or e})") from None
            raise CnnvisError(
                f"{src.url}: ran out of space copying to {part} ({e.strerror}); the partial "
                "file was removed: free space (or set data_root elsewhere) and run again"
            ) from None
        hashes = file_hashes(part)
        problem = _checksum_mismatch(src, hashes)
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
            problem = _checksum_mismatch(src, hashes)  # pooch checked one; check them all
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
            alternatives = (
                "give dataset.mirror: with another host's URL, or, on a machine without network, "
                f"copy {src.name}.zip here and give mirror: file:///path/to/{src.name}.zip, or "
                "unpack it and give dataset.path: (the directory) instead of download:/url:"
            )
            if kept:
                raise CnnvisError(
                    f"{src.url}: download interrupted ({reason}); {kept} bytes kept in {part}: "
                    f"run the same command again to resume; or {alternatives}"
                )
            raise CnnvisError(
                f"{src.url}: download failed after {retries + 1} attempt(s) ({reason}); "
                f"nothing was downloaded. To get the dataset anyway, {alternatives}"
            )
        wait = RETRY_WAIT * (attempt + 1)
        log.warning("%s: %s; resuming from byte %d in %.0f s", src.url, reason, kept, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


# -- extraction ---------------------------------------------------------------------------------
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


def default_max_expansion() -> float:
    """`dataset.max_expansion`'s default, from the schema (the only place with defaults)."""
    from cnnvis_pipeline.config import load_schema

    return float(load_schema()["properties"]["dataset"]["properties"]["max_expansion"]["default"])


def _out_of_space(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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
            bad += [f"{f!r} is both a file and a directory" for f in sorted(files & dirs)]
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
            target.mkdir()
            with tqdm(
                total=need,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"unpack {archive.name}",
                disable=not progress,
                leave=False,
            ) as bar:
                for info in infos:
                    dest = target / info.filename
                    try:
                        if info.is_dir():
                            dest.mkdir(parents=True, exist_ok=True)
                            continue
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
                        if _out_of_space(e):
                            raise CnnvisError(
                                f"{archive}: ran out of space unpacking entry {info.filename!r} "
                                f"into {target.parent} ({e.strerror}); the partial extraction "
                                "was removed: free space and run again"
                            ) from None
                        raise CnnvisError(
                            f"{archive}: cannot unpack entry {info.filename!r} ({e.strerror or e})"
                        ) from None
    except zipfile.BadZipFile as e:
        raise CnnvisError(f"{archive}: not a valid zip archive ({e})") from None


def _dataset_root(extracted: Path, url: str) -> Path:
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


# -- the whole thing ----------------------------------------------------------------------------
@contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _already_done(dest: Path, src: DatasetSource) -> bool:
    """True if `dest` is a complete download of this archive; raise if it is something else."""
    if not dest.exists() and not dest.is_symlink():
        return False
    marker = dest / COMPLETE_MARKER
    if not marker.is_file():
        raise CnnvisError(
            f"{dest}: exists but is not a complete download (no {COMPLETE_MARKER} marker); "
            "remove it, or set another dataset name"
        )
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    for alg, expected in src.checksums.items():
        have = recorded.get(alg) if isinstance(recorded, dict) else None
        if have and have != expected:
            raise CnnvisError(
                f"{dest}: holds a dataset from an archive with {alg} {have}, but the config asks "
                f"for {expected}; remove it, or set another dataset name"
            )
    return True


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
    with _locked(data_root / f".{src.name}.lock"):
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
            root = _dataset_root(tmp, src.url)
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
