"""Which archive a `dataset` spec means, and how to verify it.

- resolve_source(spec): the URL, directory name and checksum(s) of a spec (DatasetSource).
- default_name(url): the directory name of a `url:` dataset without `name:`.
- file_hashes(path), checksum_mismatch(src, hashes): verification of a fetched archive.

Specs: `{download: broden1_224}` (also broden1_227, broden1_384: the official URLs; only
broden1_224 has a pinned md5, the others need `sha256:` or `md5:`), optionally with `url:` or
`mirror:` to fetch the same archive elsewhere; or `{url: ..., sha256: ...}` / `{url: ..., md5: ...}`
for any Broden-format zip, with an optional `name:` for the directory (default: the URL's file
stem and 8 hex digits of the URL's hash, as in config.dataset_name). A checksum given in the spec
replaces the pinned one. A `file://` URL (url: or mirror:) names an archive already on this
machine (an offline node), verified like a download.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cnnvis_pipeline.errors import CnnvisError, check_name

OFFICIAL_BASE = "http://netdissect.csail.mit.edu/data"
KNOWN_DATASETS: dict[str, dict[str, str | None]] = {
    "broden1_224": {"md5": "be13c292eaef3300da03f8d0e48eab1c"},
    "broden1_227": {"md5": None},
    "broden1_384": {"md5": None},
}
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
    _check_types(spec)
    url, mirror = spec.get("url"), spec.get("mirror")
    if url and mirror and url != mirror:
        raise CnnvisError("dataset: give either url: or mirror:, not both")
    url = url or mirror
    checksums = _spec_checksums(spec)
    known = spec.get("download")
    if known:
        name, url = _known_source(spec, known, url, checksums)
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
    _check_url(url, "mirror" if mirror and not spec.get("url") else "url")
    return DatasetSource(name=name, url=url, **checksums)


def _check_types(spec) -> None:
    if not isinstance(spec, dict):
        raise CnnvisError(f"dataset: expected a mapping, got {type(spec).__name__}")
    for key in ("download", "url", "mirror", "name", "md5", "sha256"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise CnnvisError(f"dataset.{key}: expected a string, got {spec[key]!r}")


def _spec_checksums(spec: dict) -> dict[str, str]:
    """The checksums the spec gives, lower case, each checked for its number of hex digits."""
    checksums = {}
    for alg in ("md5", "sha256"):
        value = spec.get(alg)
        if value:
            value = value.strip().lower()
            if not _HEX[alg].match(value):
                digits = 32 if alg == "md5" else 64
                raise CnnvisError(f"dataset.{alg}: {value!r} is not {digits} hex digits")
            checksums[alg] = value
    return checksums


def _known_source(spec: dict, known: str, url: str | None,
                  checksums: dict[str, str]) -> tuple[str, str]:
    """(directory name, URL) of a `download:` spec; adds the pinned md5 to `checksums` when the
    spec gives none."""
    if known not in KNOWN_DATASETS:
        raise CnnvisError(
            f"dataset.download: unknown dataset {known!r}; known: {', '.join(KNOWN_DATASETS)}"
            " (for any other Broden-format zip give url: and sha256: or md5:)"
        )
    name = check_name("dataset", spec.get("name") or known, where="dataset.name")
    url = url or f"{OFFICIAL_BASE}/{known}.zip"
    if not checksums:
        pinned = KNOWN_DATASETS[known]["md5"]
        if not pinned:
            raise CnnvisError(
                f"dataset: no checksum is pinned for {known}; give sha256: or md5: "
                f"(--sha256/--md5) of {url}, from a copy you trust, so it can be verified"
            )
        checksums["md5"] = pinned
    return name, url


def _check_url(url: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise CnnvisError(
                f"dataset.{key}: {url!r}: a file URL names a local path, file:///abs/path.zip"
            )
    elif parts.scheme not in ("http", "https") or not parts.netloc:
        raise CnnvisError(
            f"dataset.{key}: {url!r} must be an http://, https:// or file:// URL"
        )


def default_name(url: str) -> str:
    """Directory name of a `url:` dataset without `name:`: `<file stem>-<8 hex of the URL>`.

    The same rule as cnnvis_pipeline.config.dataset_name, so the CLI and the workflow agree.
    """
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(url.split("?")[0]).stem)[:40] or "dataset"
    canonical = json.dumps(url, sort_keys=True, separators=(",", ":"))
    return f"{stem}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def file_hashes(path: Path) -> dict[str, str]:
    """md5 and sha256 of a file, in one pass."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def checksum_mismatch(src: DatasetSource, actual: dict[str, str]) -> str | None:
    """The message for the first checksum of `src` that `actual` does not match; else None."""
    for alg, expected in src.checksums.items():
        if actual[alg] != expected:
            return (
                f"{src.url}: {alg} checksum mismatch: expected {expected}, got {actual[alg]}; "
                "the download was deleted (a corrupt transfer, a changed file, or a wrong "
                "checksum in the config)"
            )
    return None
