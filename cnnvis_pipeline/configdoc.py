"""config/README.md, generated from the descriptions and defaults of the config schema.

    python -m cnnvis_pipeline.configdoc            # rewrite config/README.md
    python -m cnnvis_pipeline.configdoc --check    # exit 1 when it is out of date

`render(schema)` walks the schema: a section (an object with properties) becomes a heading with
its description and a table of its keys (key, default, meaning); nested sections follow as
their own headings. Every key must have a description (`undocumented(schema)` lists those that
do not). Imports neither torch nor any stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cnnvis_pipeline.config import SCHEMA_PATH, load_schema

README = Path(__file__).resolve().parents[1] / "config" / "README.md"
HEADER = ("<!-- Generated from workflow/schemas/config.schema.yaml by "
          "`python -m cnnvis_pipeline.configdoc`: edit the schema, not this file. -->")


def _entry(sub: dict) -> dict:
    """The object schema behind a key: its own, or that of its mapped values (models.<name>)."""
    if "properties" in sub:
        return sub
    extra = sub.get("additionalProperties")
    if isinstance(extra, dict) and "properties" in extra:
        return extra
    return {}


def _default(sub: dict) -> str:
    if "default" not in sub:
        return "required" if sub.get("_required") else "—"
    value = sub["default"]
    if value == {}:
        return "—"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _line(text: str | None) -> str:
    return " ".join(str(text or "").split()).replace("|", "\\|")


def _section(path: str, sub: dict, level: int, out: list[str]) -> None:
    entry = _entry(sub)
    title = path if entry is sub else f"{path}.<name>"
    out += [f"{'#' * level} `{title}`", ""]
    if sub.get("description"):
        out += [_line(sub["description"]), ""]
    if entry is not sub and entry.get("description"):
        out += [_line(entry["description"]), ""]
    required = set(entry.get("required", []))
    rows, nested = [], []
    for key, child in entry.get("properties", {}).items():
        if _entry(child) and key != "layers":
            nested.append((key, child))
            continue
        child = dict(child, _required=key in required)
        rows.append(f"| `{key}` | {_default(child)} | {_line(child.get('description'))} |")
    if rows:
        out += ["| key | default | meaning |", "|---|---|---|", *rows, ""]
    for key, child in nested:
        _section(f"{title}.{key}", child, min(level + 1, 4), out)


def render(schema: dict | None = None) -> str:
    schema = schema or load_schema(SCHEMA_PATH)
    out = [HEADER, "", f"# {schema.get('title', 'Configuration')}", "",
           _line(schema.get("description")), ""]
    for key, sub in schema["properties"].items():
        if _entry(sub):
            _section(key, sub, 2, out)
        else:
            out += [f"## `{key}` (default {_default(sub)})", "", _line(sub.get("description")), ""]
    return "\n".join(out).rstrip() + "\n"


def undocumented(schema: dict | None = None, prefix: str = "") -> list[str]:
    """Every key of the schema without a description (dotted paths)."""
    schema = schema or load_schema(SCHEMA_PATH)
    missing = []
    entry = _entry(schema) or schema
    for key, sub in entry.get("properties", {}).items():
        path = f"{prefix}{key}"
        if not sub.get("description"):
            missing.append(path)
        if _entry(sub):
            missing += undocumented(sub, f"{path}.")
    return missing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if README.read_text() != text:
            print(f"{README} is out of date: run python -m cnnvis_pipeline.configdoc",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(text)
    print(README)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
