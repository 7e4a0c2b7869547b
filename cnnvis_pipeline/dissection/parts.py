"""A layer's units in parts: the workflow's jobs of a layer too large for one job.

- unit_bounds(units, parts, part): the units of part `part` of `parts` (consecutive ranges that
  differ by at most one unit; plan.layer_jobs splits alike).
- run_unit_part(job, prepared, extract_dirs, layer, part, parts, out): the job `layer_units`:
  pipeline.dissect_units on one range of the layer's units (only their histogram, activations,
  maxima and records are read or held), saved to one .npz (save_part).
- run_merge(job, prepared, part_files, out_dir): the job `layer_tables` of a layer in parts:
  the parts loaded (load_part), checked to be of one layer and one run and to cover its units
  once, and pipeline.finish_layer writes the layer's tables: the same bytes as in one part.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection import pipeline
from cnnvis_pipeline.dissection.significance import LABEL_KEYS, PAIR_KEYS
from cnnvis_pipeline.dissection.tally import ConceptTally
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_file
from cnnvis_pipeline.models.input import pick_device
from cnnvis_pipeline.settings import Job


def unit_bounds(units: int, parts: int, part: int) -> tuple[int, int]:
    """(first, stop) of part `part` of a layer's `units` split into `parts` consecutive ranges."""
    if not 0 <= part < parts <= units:
        raise CnnvisError(f"unit part {part} of {parts} is out of range for {units} units")
    return units * part // parts, units * (part + 1) // parts


def save_part(path: str | Path, p: pipeline.UnitPart, *, layer: str, units: int,
              prov: dict) -> None:
    """One unit part in one .npz: its units, tally, significance (no per-image records: the
    layer-wide steps do not read them), top images and the tables' provenance."""
    arrays = {"first": np.array(p.first), "units": np.array(units), "layer": np.array(layer),
              "prov": np.array(json.dumps(prov, sort_keys=True)),
              "thresholds": p.thresholds, "top_index": p.top_images[0],
              "top_value": p.top_images[1], "seconds": np.array([p.tally_s, p.statistics_s])}
    arrays.update({f"tally_{k}": v for k, v in p.tally.state().items()})
    if p.significance is not None:
        arrays.update({f"sig_{k}": np.asarray(p.significance[k]) for k in PAIR_KEYS + LABEL_KEYS})
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_part(path: str | Path) -> tuple[pipeline.UnitPart, dict]:
    """(the part, {"layer", "units", "prov"}) of a file written by save_part."""
    try:
        with np.load(path) as z:
            a = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CnnvisError(f"{path}: not a unit part ({e})") from None
    sig = None
    if "sig_unit" in a:
        sig = {k: a[f"sig_{k}"] for k in PAIR_KEYS + LABEL_KEYS}
    tally = ConceptTally.from_state({k[6:]: v for k, v in a.items() if k.startswith("tally_")})
    part = pipeline.UnitPart(int(a["first"]), a["thresholds"], tally, None, sig,
                             (a["top_index"], a["top_value"]), *map(float, a["seconds"]))
    return part, {"layer": str(a["layer"]), "units": int(a["units"]),
                  "prov": json.loads(str(a["prov"]))}


def run_unit_part(job: Job, prepared: str | Path, extract_dirs: list, layer: str, part: int,
                  parts: int, out: str | Path, *, progress: bool = True) -> Path:
    """Part `part` of `parts` of a layer's units, from every shard's extraction -> `out`."""
    if layer not in job.model["layers"]:
        raise CnnvisError(f"{job.name}: layer {layer} is not among {job.model['layers']}")
    ds = PreparedDataset(prepared)
    dirs, infos = pipeline.extractions(extract_dirs)
    units = int(infos[0]["shapes"][layer][1])
    first, stop = unit_bounds(units, parts, part)
    hist, shards, maxima = pipeline.layer_inputs(job, layer, dirs, infos, first, stop)
    p = pipeline.dissect_units(job, ds, layer, hist, shards, maxima, first=first,
                               device=pick_device(job.resources.device), progress=progress)
    save_part(out, p, layer=layer, units=units,
              prov=pipeline.table_provenance(job, ds, infos[0]))
    return Path(out)


def run_merge(job: Job, prepared: str | Path, part_files: list, out_dir: str | Path,
              layers: list | None = None) -> None:
    """A layer's tables from its unit parts (files of run_unit_part, in any order); `layers`:
    the layer they must be of (the command's --layers), when given."""
    loaded = sorted((load_part(f) + (f,) for f in part_files), key=lambda x: x[0].first)
    layer_set = {meta["layer"] for _, meta, _ in loaded}
    units = {meta["units"] for _, meta, _ in loaded}
    provs = {json.dumps(meta["prov"], sort_keys=True) for _, meta, _ in loaded}
    if len(layer_set) != 1 or len(units) != 1 or len(provs) != 1:
        raise CnnvisError(f"{job.name}: unit parts of different layers or runs: "
                          + ", ".join(map(str, part_files)))
    (layer,), (total,), (prov,) = layer_set, units, provs
    if layers and layer not in layers:
        raise CnnvisError(f"{job.name}: the unit parts are of layer {layer}, not of {layers}")
    covered = sum(len(p.thresholds) for p, _, _ in loaded)
    if covered != total:
        raise CnnvisError(f"{job.name} {layer}: the unit parts cover {covered} of {total} units")
    pipeline.finish_layer(job, PreparedDataset(prepared), layer, [p for p, _, _ in loaded],
                          out_dir=out_dir, prov=json.loads(prov))
