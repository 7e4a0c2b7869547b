"""The one owner of the Parquet schemas; every table the project writes goes through here.

- SCHEMAS: name -> pyarrow schema (iou, units, significance, sweep, thresholds, top_images,
  detectors, activation_max, inversion, formulas, ablation, adversarial,
  adversarial_concepts).
- category_colors(categories): the one colour of each category in every figure and page.
- write_table(name, columns, path, provenance): check columns against the schema, attach the
  provenance as Parquet key-value metadata, write atomically (fileio.atomic_file).
- read_provenance(path): the provenance dict of a written table.
- unique_detectors(units): the one detector count: distinct (category, label) pairs among the
  rows of a units table flagged `detector` (the paper's unique detectors).
- provenance(...): the provenance every table carries (package, torch and torchvision
  versions, config digest, dataset digest, checkpoint sha256); no wall-clock time, so the same
  inputs give byte-identical files.
- VIEW_ENTRIES, MANIFEST_SCHEMA: the declared schema (JSON Schema) of viz/manifest.json, what
  the visualise stage hands the report: per unit its card entry of every view, per view its
  layer entry; write_manifest(path, manifest) and read_manifest(path) check it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cnnvis_pipeline import __version__
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_file, write_text

S, I64, I32, F64, B = pa.string(), pa.int64(), pa.int32(), pa.float64(), pa.bool_()

SCHEMAS: dict[str, pa.Schema] = {
    "iou": pa.schema([
        ("model", S), ("layer", S), ("unit", I32), ("concept", S), ("label", I32),
        ("category", S), ("iou", F64), ("intersection", I64), ("union", I64),
    ]),
    "units": pa.schema([
        ("model", S), ("layer", S), ("unit", I32), ("threshold", F64), ("concept", S),
        ("label", I32), ("category", S), ("iou", F64), ("detector", B),
        ("iou_low", F64), ("iou_high", F64), ("p_value", F64), ("q_value", F64),
        ("detector_fdr", B), ("active_fraction", F64), ("activity", S),
    ]),
    "significance": pa.schema([
        ("model", S), ("layer", S), ("unit", I32), ("rank", I32), ("concept", S),
        ("category", S), ("iou", F64), ("iou_low", F64), ("iou_high", F64), ("p_value", F64),
        ("q_value", F64), ("detector", B), ("detector_fdr", B),
    ]),
    "sweep": pa.schema([
        ("model", S), ("layer", S), ("iou_threshold", F64), ("category", S), ("detectors", I32),
        ("unique_detectors", I32), ("detectors_fdr", I32), ("unique_detectors_fdr", I32),
    ]),
    "thresholds": pa.schema([
        ("model", S), ("layer", S), ("unit", I32), ("quantile", F64), ("threshold", F64),
    ]),
    "top_images": pa.schema([
        ("model", S), ("layer", S), ("unit", I32), ("rank", I32), ("image_index", I64),
        ("image", S), ("max_activation", F64),
    ]),
    "detectors": pa.schema([
        ("model", S), ("layer", S), ("category", S), ("units", I32), ("detectors", I32),
        ("unique_detectors", I32), ("detectors_fdr", I32), ("unique_detectors_fdr", I32),
    ]),
    "activation_max": pa.schema([
        ("model", S), ("layer", S), ("unit", I32), ("achieved_activation", F64),
        ("dataset_top_activation", F64), ("activation_ratio", F64),
    ]),
    "formulas": pa.schema([
        ("model", S), ("layer", S), ("unit", I32), ("formula", S), ("length", I32), ("iou", F64),
        ("intersection", I64), ("union", I64), ("single_concept", S), ("single_iou", F64),
        ("iou_low", F64), ("iou_high", F64), ("p_value", F64), ("q_value", F64),
        ("formula_detector", B),
    ]),
    "inversion": pa.schema([
        ("model", S), ("layer", S), ("image_index", I64), ("image", S), ("error", F64),
        ("normalized_error", F64), ("baseline", F64),
    ]),
    "ablation": pa.schema([
        ("model", S), ("layer", S), ("group", S), ("kind", S), ("unit", I32), ("units", S),
        ("concept", S), ("category", S), ("detector", B), ("class", S), ("class_index", I32),
        ("images", I32), ("metric", S), ("before", F64), ("after", F64), ("change", F64),
        ("change_low", F64), ("change_high", F64), ("rank", I32), ("related", B),
    ]),
    "adversarial": pa.schema([
        ("model", S), ("layer", S), ("attack", S), ("eps", F64), ("steps", I32), ("unit", I32),
        ("concept", S), ("category", S), ("detector", B), ("activation_clean", F64),
        ("activation_attacked", F64), ("activation_change", F64), ("iou_clean", F64),
        ("iou_attacked", F64), ("iou_change", F64), ("detector_attacked", B),
        ("flip_rate", F64),
    ]),
    "adversarial_concepts": pa.schema([
        ("model", S), ("layer", S), ("attack", S), ("eps", F64), ("steps", I32), ("concept", S),
        ("category", S), ("detectors", I32), ("detectors_lost", I32),
    ]),
}


# One colour per category, the same in every figure and page (Okabe-Ito; colour-blind safe).
# Categories beyond Broden's six take the extra colours in the order of their sorted names.
CATEGORY_COLORS = {"object": "#0072B2", "part": "#E69F00", "scene": "#009E73",
                   "material": "#CC79A7", "texture": "#56B4E9", "color": "#D55E00"}
_EXTRA_COLORS = ["#7F7F7F", "#8C564B", "#BCBD22", "#17BECF", "#9467BD", "#F0E442", "#2CA02C",
                 "#1F1F1F"]


def category_colors(categories) -> dict[str, str]:
    """category -> '#rrggbb' for the given categories (a dataset's category list)."""
    out = {c: CATEGORY_COLORS[c] for c in categories if c in CATEGORY_COLORS}
    others = sorted(c for c in set(categories) if c not in CATEGORY_COLORS)
    out.update({c: _EXTRA_COLORS[k % len(_EXTRA_COLORS)] for k, c in enumerate(others)})
    return {c: out[c] for c in categories}


def _torchvision_version() -> str:
    """torchvision.__version__ without importing torchvision where it is not loaded yet (its
    import pulls in torch._dynamo: seconds of start-up for every job that writes a table)."""
    import sys

    if "torchvision" not in sys.modules:
        import importlib.util
        import re

        try:
            spec = importlib.util.find_spec("torchvision")
            folder = Path(next(iter(spec.submodule_search_locations)))
            text = (folder / "version.py").read_text()
            m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
            if m:
                return m.group(1)
        except (AttributeError, ImportError, OSError, StopIteration, TypeError):
            pass
    import torchvision

    return torchvision.__version__


def provenance(*, config_digest: str, dataset_digest: str | None,
               checkpoint_sha256: str | None = None, extra: dict | None = None) -> dict:
    import torch

    out = {
        "cnnvis_pipeline_version": __version__,
        "torch_version": torch.__version__,
        "torchvision_version": _torchvision_version(),
        "config_digest": config_digest,
        "dataset_digest": dataset_digest,
        "checkpoint_sha256": checkpoint_sha256,
    }
    out.update(extra or {})
    return out


def write_table(name: str, columns: dict, path: str | Path, prov: dict) -> Path:
    schema = SCHEMAS[name]
    missing = set(schema.names) - set(columns)
    extra = set(columns) - set(schema.names)
    if missing or extra:
        raise ValueError(f"table {name}: missing columns {sorted(missing)}, unknown {sorted(extra)}")
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema})
    meta = {b"cnnvis.table": name.encode(), b"cnnvis.provenance": json.dumps(prov, sort_keys=True).encode()}
    table = table.replace_schema_metadata(meta)
    path = Path(path)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def read_provenance(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"cnnvis.provenance", b"{}"))


def unique_detectors(units) -> int:
    """Distinct (category, label) pairs among the rows of a units table (a DataFrame) whose
    `detector` is true: the unique detectors of those units."""
    det = units[units["detector"].astype(bool)]
    return int(det[["category", "label"]].drop_duplicates().shape[0])


# -- the views' manifest (viz/manifest.json) --------------------------------------------------

MANIFEST_VERSION = 3
_NUM = {"type": ["number", "null"]}
_INT = {"type": "integer"}
_PNG = {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+\.png$"}  # a file in viz/


def _obj(required: dict, optional: dict | None = None) -> dict:
    return {"type": "object", "required": sorted(required), "additionalProperties": False,
            "properties": {**required, **(optional or {})}}


def _list(item: dict) -> dict:
    return {"type": "array", "items": item}


_EMPTY = _obj({})
# Per view: "card", the entry of one unit's card (absent: the view has none), and "layer", the
# entry of the layer. Keys ending in `file` / `files` name PNGs in viz/ (the report embeds them).
VIEW_ENTRIES: dict[str, dict] = {
    "top_images": {
        "card": _obj({"files": _list(_PNG), "images": _list({"type": "string"}),
                      "image_index": _list(_INT), "max_activation": _list(_NUM),
                      "mask_fraction": _list({"type": "number"})}),
        "layer": _obj({"max_abs_diff": _NUM}),
    },
    "activation_max": {
        "card": _obj({"file": _PNG, "objective": _NUM, "achieved": _NUM, "dataset_top": _NUM,
                      "ratio": _NUM}),
        "layer": _EMPTY,
    },
    "deconvnet": {
        "card": _obj({"file": _PNG, "receptive_fields": _list(_list(_INT))}),
        "layer": _EMPTY,
    },
    "inversion": {
        "layer": _obj({"images": _list(_obj({
            "image_index": _INT, "image": {"type": "string"}, "error": _NUM,
            "normalized_error": _NUM, "original_file": _PNG, "reconstruction_file": _PNG},
            {"baseline": _NUM})),
            "normalized_error_formula": {"type": "string"}},
            {"baseline_formula": {"type": "string"},
             "weights": _obj({"relative_depth": _NUM, "lambda_tv": _NUM,
                              "lambda_alpha": _NUM})}),  # the weights used (none inverted: absent)
    },
}

MANIFEST_SCHEMA: dict = _obj({
    "version": {"const": MANIFEST_VERSION},
    "model": {"type": "string"}, "layer": {"type": "string"}, "device": {"type": "string"},
    "threads": _INT,
    "top_units": _INT,  # views.units: the highest-IoU units selected (then the requested ones)
    "order": _list({"enum": sorted(VIEW_ENTRIES)}),
    # selected: every view (the top IoUs and the requested units); not selected: another
    # detector of the layer, with the views that cover every detector (the top images)
    "units": _list(_obj({
        "unit": _INT, "requested": {"type": "boolean"}, "selected": {"type": "boolean"},
        "dataset_top_activation": _NUM,
        "views": {"type": "object", "additionalProperties": False,
                  "properties": {k: v["card"] for k, v in VIEW_ENTRIES.items() if "card" in v}},
    })),
    "views": {"type": "object", "additionalProperties": False, "properties": {
        k: _obj({"title": {"type": "string"}, "settings": {"type": "object"},
                 "note": {"type": ["string", "null"]}, "layer": v["layer"],
                 "seconds": {"type": "number"}, "cpu_seconds": {"type": "number"}})
        for k, v in VIEW_ENTRIES.items()}},
})


def check_manifest(manifest: dict, where: str | Path) -> dict:
    """`manifest` when it follows MANIFEST_SCHEMA, else CnnvisError naming `where` and every
    problem (its key path and what is wrong)."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(MANIFEST_SCHEMA).iter_errors(manifest),
                    key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                 for e in errors[:10]]
        raise CnnvisError(f"{where}: not a views manifest of version {MANIFEST_VERSION} "
                          f"(rerun the visualize step): " + "; ".join(lines))
    return manifest


def write_manifest(path: str | Path, manifest: dict) -> Path:
    check_manifest(manifest, path)
    return write_text(path, json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False))


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; run the visualize step of this layer")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CnnvisError(f"{path}: not JSON ({e})") from None
    return check_manifest(manifest, path)
