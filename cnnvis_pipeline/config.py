"""The workflow's configuration: merging with the embedded default, and resolving names.

- merge_with_default(user, default): `dataset` and `models` given by the user replace the
  default's entirely; every other section is merged key by key (the user's values win).
- dataset_name(cfg), dataset_source_dir(cfg): the dataset's name and directory (its prepared
  arrays live in `{data_root}/prepared/<name>-<content digest>`, data/entries.py).
- model_specs(cfg): every model to dissect, with defaults filled in and checkpoint series
  expanded into one model per checkpoint (`<name>-<checkpoint stem>`).
- spec_digest(obj): sha256 of a canonical JSON encoding (the tables' config digest).
- check_schema(cfg): the config against workflow/schemas/config.schema.yaml, one line naming
  the bad key.
- with_defaults(section, value): one section (`dissection`, `views`, ...) checked against the
  schema and filled with the schema's defaults (cnnvis_pipeline.settings builds its dataclasses
  from these). The schema is the only place that holds defaults.
- MOVED: keys of earlier configs and where they are now (a clear error naming the new key).

Imports neither torch nor any stage, so that `snakemake -n` stays light.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from pathlib import Path

from cnnvis_pipeline.errors import SAFE_LAYER, SAFE_NAME, CnnvisError, check_name
from cnnvis_pipeline.models import IMAGENET_MEAN, IMAGENET_STD

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"

REPLACED_SECTIONS = ("dataset", "models")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def merge_with_default(user: dict, default: dict) -> dict:
    merged = _deep_merge(
        {k: v for k, v in default.items() if k not in REPLACED_SECTIONS},
        {k: v for k, v in user.items() if k not in REPLACED_SECTIONS},
    )
    for k in REPLACED_SECTIONS:
        merged[k] = copy.deepcopy(user[k] if k in user else default.get(k))
    return merged


# Keys of earlier configs: each is refused naming its new place (or why it is gone).
MOVED = {
    ("dissection", "shards"): "resources.shards",
    ("dissection", "batch_size"): "resources.batch_size",
    ("dissection", "device"): "resources.device",
    ("dissection", "keep_activations"): "resources.keep_activations",
    ("dissection", "statistics", "seed"): "seed (one seed at the top level)",
    ("dataset", "synth", "seed"): "seed (one seed at the top level)",
    ("reports",): "views (what is computed) and report (what the pages show)",
    ("reports", "top_units"): "views.units",
    ("reports", "top_images"): "report.top_images",
    ("reports", "threads"): "resources.threads",
    ("reports", "deconvnet"): "views.deconvnet",
    ("reports", "activation_max"): "views.activation_max",
    ("reports", "inversion"): "views.inversion",
    ("reports", "activation_max", "seed"): "seed (one seed at the top level)",
    ("reports", "inversion", "seed"): "seed (one seed at the top level)",
    ("reports", "inversion", "spread_images"): "REMOVED: the inversion's spread is always measured on 64 images",
    ("views", "activation_max", "seed"): "seed (one seed at the top level)",
    ("views", "inversion", "seed"): "seed (one seed at the top level)",
    ("views", "inversion", "spread_images"): "REMOVED: the inversion's spread is always measured on 64 images",
}


def _lookup(cfg, path):
    node = cfg
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def moved_keys(cfg: dict) -> list[str]:
    """One line per key of an earlier config, naming where it is now (the most specific key:
    `reports.top_units` rather than `reports`)."""
    found = [path for path in MOVED if _lookup(cfg, path) is not None]
    out = []
    for path in found:
        if any(len(o) > len(path) and o[:len(path)] == path for o in found):
            continue
        new, key = MOVED[path], ".".join(path)
        out.append(f"config: {key} is no longer a setting ({new.removeprefix('REMOVED: ')})"
                   if new.startswith("REMOVED: ") else f"config: {key} has moved: use {new}")
    models = cfg.get("models") if isinstance(cfg.get("models"), dict) else {}
    for name, m in models.items():
        if isinstance(m, dict) and isinstance(m.get("train"), dict) and "seed" in m["train"]:
            out.append(f"config: models.{name}.train.seed has moved: use seed (one seed at the "
                       "top level; a model's own `seed` sets only its random initialisation)")
    return out


def _key_path(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _schema_message(err) -> str:
    """One line for a jsonschema error: the dotted key and what is wrong with it."""
    key = _key_path(err.absolute_path)
    where = f"config: {key}" if key else "config"
    inst, val = err.instance, err.validator_value
    if err.validator == "additionalProperties" and isinstance(inst, dict):
        allowed = sorted(err.schema.get("properties") or {})
        extra = sorted(k for k in inst if k not in allowed)
        return f"{where}: unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(allowed)}"
    if err.validator == "oneOf":
        choices = [r["required"][0] for r in val if len(r.get("required", [])) == 1]
        given = [k for k in choices if isinstance(inst, dict) and k in inst]
        return f"{where}: give exactly one of {', '.join(choices)} (got {', '.join(given) or 'none'})"
    if err.validator == "pattern":
        kind = ("model name" if key == "models" else "name") if "propertyNames" in err.schema_path \
            else {SAFE_NAME.pattern: "name", SAFE_LAYER.pattern: "layer name"}.get(val, "value")
        safe = {
            SAFE_NAME.pattern: " (a safe name: 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit)",
            SAFE_LAYER.pattern: " (a safe layer name: dotted module names of letters, digits and '_', "
            "optionally @K for the K-th call of a re-used module)",
        }.get(val, "")
        return f"{where}: {kind} {inst!r} is not allowed: it must match {val}{safe}"
    if err.validator == "type":
        return f"{where}: expected {' or '.join(val) if isinstance(val, list) else val}, got {inst!r}"
    if err.validator == "enum":
        return f"{where}: {inst!r} is not one of {', '.join(map(str, val))}"
    return f"{where}: {err.message}"


@functools.cache
def load_schema(schema_path: str | Path = SCHEMA_PATH) -> dict:
    import yaml

    return yaml.safe_load(Path(schema_path).read_text())


def _filling_validator():
    """Draft 2020-12 that also fills in every `default:` of the properties it visits."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    properties = base.VALIDATORS["properties"]

    def fill(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from properties(validator, props, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill})


def _raise_all(errors: list) -> None:
    """One line per problem, each naming its key (one problem: one short line)."""
    if not errors:
        return
    errors.sort(key=lambda e: (len(e.absolute_path) == 0, [str(p) for p in e.absolute_path],
                               e.validator != "additionalProperties"))
    _raise_problems([_schema_message(e) for e in errors])


def with_defaults(section: str, value: dict | None, schema_path: str | Path = SCHEMA_PATH) -> dict:
    """A copy of config section `section` with the schema's defaults filled in; a value that
    breaks the schema raises CnnvisError naming its key (`config: reports.top_units: ...`)."""
    sub = load_schema(schema_path)["properties"][section]
    cfg = {section: copy.deepcopy(value) if value is not None else {}}
    wrapper = {"type": "object", "properties": {section: sub}}
    _raise_all(list(_filling_validator()(wrapper).iter_errors(cfg)))
    return cfg[section]


def check_schema(cfg: dict, schema_path: str | Path = SCHEMA_PATH) -> None:
    """Raise CnnvisError listing every config key that breaks the JSON schema: one line per
    problem, each naming its key (one problem: one short line).

    (Snakemake's validate() prints the whole schema and stops at the first problem; the workflow
    calls this first.)
    """
    import jsonschema

    moved = moved_keys(cfg)
    if moved:
        _raise_problems(moved)
    schema = load_schema(schema_path)
    _raise_all(list(jsonschema.Draft202012Validator(schema).iter_errors(cfg)))


def spec_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_name(cfg: dict) -> str:
    ds = cfg["dataset"]
    if ds.get("name"):
        return check_name("dataset", ds["name"], where="config: dataset.name")
    if "synth" in ds:
        s = ds["synth"] or {}
        return f"broden-synth-{s.get('images', 1000)}x{s.get('size', 64)}-seed{cfg.get('seed', 0)}"
    if ds.get("download"):
        return check_name("dataset", ds["download"], where="config: dataset.download")
    if ds.get("url"):
        stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(str(ds["url"]).split("?")[0]).stem)[:40] or "dataset"
        return f"{stem}-{spec_digest(ds['url'])[:8]}"
    if ds.get("path"):
        p = Path(ds["path"])
        stem = re.sub(r"[^A-Za-z0-9_-]", "-", p.resolve().name)[:40] or "dataset"
        return f"{stem}-{spec_digest(str(p.resolve()))[:8]}"
    for kind in SOURCE_KINDS:
        if ds.get(kind):
            return _source_name(kind, ds[kind])
    raise CnnvisError("config: dataset needs one of synth, path, download, url, "
                      + ", ".join(SOURCE_KINDS))


# The dataset sources besides Broden (data/sources/; the same tuple as its SOURCE_KINDS).
SOURCE_KINDS = ("ade20k", "coco_panoptic", "masks", "concepts", "segmenter")


def _absolute_paths(value):
    """A source's spec with every path made absolute (what names it)."""
    if isinstance(value, str):
        return str(Path(value).resolve())
    if isinstance(value, dict):
        return {k: _absolute_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_paths(v) for v in value]
    return value


def _source_name(kind: str, value) -> str:
    """`<kind>-<the main folder's name>-<8 hex digits of the resolved spec>`."""
    first = value
    while isinstance(first, (dict, list)) and first:
        first = next(iter(first.values())) if isinstance(first, dict) else first[0]
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(str(first)).resolve().name)[:30] if isinstance(
        first, str) else ""
    return f"{kind}-{stem or 'data'}-{spec_digest(_absolute_paths(value))[:8]}"


def dataset_source_dir(cfg: dict) -> str:
    """The Broden-format directory the workflow reads (made by synth/download, or the user's);
    "" for a source of data/sources/ (read where it is)."""
    ds, root = cfg["dataset"], cfg.get("data_root", "resources")
    if ds.get("path"):
        return str(ds["path"])
    if any(ds.get(kind) for kind in SOURCE_KINDS):  # read in place (data/sources/)
        return ""
    return f"{root}/datasets/{dataset_name(cfg)}"


def _checkpoint_stem(path: str, where: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(path).stem).strip("-")
    if not stem:
        raise CnnvisError(f"{where}: cannot derive a model name from checkpoint {path!r}")
    return stem


def _raise_problems(problems: list[str]) -> None:
    """One line per problem (one problem: one short line), as for the schema's problems."""
    problems = list(dict.fromkeys(problems))
    if len(problems) == 1:
        raise CnnvisError(problems[0])
    if problems:
        raise CnnvisError(f"{len(problems)} problems:\n" + "\n".join(f"  {m}" for m in problems))


def model_specs(cfg: dict) -> dict[str, dict]:
    """Every model to dissect (checkpoint series expanded), defaults filled in. Every problem of
    every model is reported at once (one CnnvisError, one line per problem)."""
    models = cfg.get("models") or {}
    if not isinstance(models, dict) or not models:
        raise CnnvisError("config: models must map at least one model name to its settings")
    out: dict[str, dict] = {}
    problems: list[str] = []
    for name, m in models.items():
        spec = _model_spec(name, m, models, out, problems, int(cfg.get("seed", 0)))
        if spec is not None and not m.get("checkpoints"):
            out[name] = dict(spec, series=None, series_index=None)
    problems += _case_collisions(out)
    _raise_problems(problems)
    return out


def _case_collisions(models: dict) -> list[str]:
    """Model names are directory names (results/<model>/): two that differ only in case are one
    directory on a case-insensitive file system (macOS, Windows, some network shares)."""
    first: dict[str, str] = {}
    out = []
    for name in models:
        other = first.setdefault(name.lower(), name)
        if other != name:
            out.append(f"config: models: model names {other!r} and {name!r} differ only in case; "
                       "their results would collide on a case-insensitive file system: rename one")
    return out


def _name_ok(kind: str, value, at: str, problems: list[str]) -> bool:
    try:
        check_name(kind, value, where=at)
        return True
    except CnnvisError as e:
        problems.append(str(e))
        return False


def _checked_layers(m: dict, where: str, problems: list[str]) -> list:
    layers = m.get("layers")
    if not isinstance(layers, list) or not layers:
        problems.append(f"{where}.layers: list at least one layer (dotted module names)")
        layers = []
    for layer in layers:
        _name_ok("layer", layer, f"{where}.layers", problems)
    if len(set(map(str, layers))) != len(layers):
        problems.append(f"{where}.layers: a layer is listed twice")
    stray = [k for k in (m.get("layouts") or {}) if k not in layers]
    if stray:
        problems.append(f"{where}.layouts: {', '.join(map(repr, stray))} not among the "
                        f"model's layers")
    return list(layers)


def _resolved(m: dict, layers: list, seed: int) -> dict:
    """A model entry with every optional key resolved (defaults: ImageNet's mean and std, the
    run's seed)."""
    return {
        "arch": m.get("arch"), "torchvision": m.get("torchvision"), "factory": m.get("factory"),
        "weights": m.get("weights"), "kwargs": m.get("kwargs") or {},
        "checkpoint": m.get("checkpoint"), "layers": layers,
        "layouts": dict(m.get("layouts") or {}),
        "mean": list(m.get("mean") or IMAGENET_MEAN), "std": list(m.get("std") or IMAGENET_STD),
        "input_size": m.get("input_size"), "seed": int(m.get("seed", seed)),
        "train": m.get("train"), "units": m.get("units") or [],
    }


def _spec_problems(spec: dict, m: dict, where: str) -> list[str]:
    problems = []
    if len(spec["mean"]) != 3 or len(spec["std"]) != 3 or min(spec["std"]) <= 0:
        problems.append(f"{where}: mean and std must be 3 numbers each, std > 0")
    if spec["train"] and spec["arch"] != "synthnet":
        problems.append(f"{where}.train: only the built-in arch synthnet can be trained")
    if spec["train"] and (spec["checkpoint"] or m.get("checkpoints")):
        problems.append(f"{where}: give either train or checkpoint(s), not both")
    if m.get("checkpoints") and spec["checkpoint"]:
        problems.append(f"{where}: give either checkpoint or checkpoints, not both")
    return problems


def _add_series(name: str, spec: dict, series: list, models: dict, out: dict,
                problems: list[str]) -> None:
    """One model per checkpoint of a series, `<name>-<checkpoint stem>`, added to `out`."""
    where = f"config: models.{name}"
    for k, ckpt in enumerate(series):
        try:
            sub = f"{name}-{_checkpoint_stem(str(ckpt), where)}"
        except CnnvisError as e:
            problems.append(str(e))
            continue
        if not _name_ok("model", sub, f"{where}.checkpoints[{k}]", problems):
            continue
        if sub in out or sub in models:
            problems.append(f"{where}.checkpoints[{k}]: model name {sub!r} is taken twice")
            continue
        out[sub] = dict(spec, checkpoint=str(ckpt), series=name, series_index=k)


def _model_spec(name, m, models: dict, out: dict, problems: list[str],
                seed: int = 0) -> dict | None:
    """The spec of model `name` (its series members added to `out`), or None when a problem
    (appended to `problems`) leaves nothing to build it from."""
    where = f"config: models.{name}"
    if not _name_ok("model", name, "config: models", problems):
        return None
    if not isinstance(m, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    spec = _resolved(m, _checked_layers(m, where, problems), seed)
    problems += _spec_problems(spec, m, where)
    if m.get("checkpoints"):
        _add_series(name, spec, m["checkpoints"], models, out, problems)
    elif name in out:
        problems.append(f"{where}: model name {name!r} is taken twice")
        return None
    return spec
