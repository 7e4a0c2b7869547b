"""Receipts: the small per-run JSON files the workflow's rules output instead of the shared
entries under a data root (data/entries.py), each with a `kind`.

- write_receipt(path, kind, **fields): written only when its content changes (so that Snakemake
  sees no new input when nothing changed).
- read_receipt(path, kind): its fields; CnnvisError naming the file when it is missing, not JSON
  or of another kind.
"""

from __future__ import annotations

import json
from pathlib import Path

from cnnvis_pipeline.data.manifest import write_if_changed
from cnnvis_pipeline.errors import CnnvisError


def write_receipt(path: str | Path, kind: str, **fields) -> Path:
    write_if_changed(path, json.dumps({"kind": kind, **fields}, indent=1, sort_keys=True) + "\n")
    return Path(path)


def read_receipt(path: str | Path, kind: str) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CnnvisError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise CnnvisError(f"{path}: not a {kind} receipt ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        raise CnnvisError(f"{path}: not a {kind} receipt")
    return data
