"""What the workflow checks of its models at parse time (`snakemake -n`), without torch.

The synthnet and torchvision entries are checked when the Snakefile is read
(models.check.check_architectures: the architecture without weights, run on one zero image);
a factory entry is left to its jobs (its module is the user's code). This module decides what
is checked, on which input size, and whether a check already passed, without importing torch.

- input_size(cfg, spec): [H, W] of a model's input when it is known without the data: its
  `input_size`, else the synthetic dataset's size, else the size a known download names
  (`broden1_224`); None when only the dataset's images tell.
- parse_time_entries(cfg, models): {config name: (spec, input size)} of the entries checked at
  parse time (a checkpoint series once, under its own name).
- unit_problems(spec, shapes): `units:` ids beyond their layer's channels ({layer: [C, H, W]});
  also for a factory model at parse time, from the layer shapes the resource plan measured.
- check_key(entries): sha256 of what such a check depends on (the entries, the torch and
  torchvision versions, the model room's source), so that a passed check is not rerun.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata
from pathlib import Path


def input_size(cfg: dict, spec: dict) -> list[int] | None:
    if spec.get("input_size"):
        return [int(v) for v in spec["input_size"]]
    ds = cfg.get("dataset") or {}
    if "synth" in ds:
        size = int((ds["synth"] or {}).get("size", 64))
        return [size, size]
    known = re.fullmatch(r"broden1_([0-9]+)", str(ds.get("download") or ""))
    if known and not ds.get("url"):
        return [int(known.group(1))] * 2
    return None


def parse_time_entries(cfg: dict, models: dict[str, dict]) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for name, spec in models.items():
        if not spec.get("factory"):
            out.setdefault(spec.get("series") or name, (spec, input_size(cfg, spec)))
    return out


def check_key(entries: dict) -> str:
    versions = {}
    for dist in ("torch", "torchvision"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    sources = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
               for f in sorted(Path(__file__).resolve().parent.glob("*.py"))}
    text = json.dumps([entries, versions, sources], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def unit_problems(spec: dict, shapes: dict) -> list[str]:
    """`units:` ids beyond their layer's channels, and `units:` layers that are not listed (a
    listed layer without a shape has a problem of its own)."""
    problems = []
    for layer, units in sorted((spec.get("units") or {}).items()):
        if layer not in shapes:
            if layer not in spec.get("layers", []):
                problems.append(f"units.{layer}: not among the model's layers")
            continue
        bad = [u for u in units if not 0 <= int(u) < shapes[layer][0]]
        if bad:
            problems.append(f"units.{layer}: {bad} out of range (the layer has units 0.."
                            f"{shapes[layer][0] - 1})")
    return problems
