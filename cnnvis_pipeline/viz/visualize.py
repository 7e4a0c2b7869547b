"""Visualise the selected units of one layer (the `visualize_layer` rule).

run_visualize(job, prepared, layer, layer_dir) reads the layer's dissection tables in
`layer_dir` (units, top_images, thresholds), selects the units (viz.selection.select_units:
`views.units` highest IoUs plus the model's `units:`), runs every view of viz.views.VIEWS in
turn and writes, next to the tables:

- viz/                      the views' PNGs and manifest.json: per unit its card entry of each
                            view (the selected units: every view; the layer's other detectors:
                            the views with `every_detector`, the top images), per view its
                            settings, note, layer entry and timings (tables.MANIFEST_SCHEMA,
                            checked when written and when read).
- the views' tables         activation_max.parquet, inversion.parquet (tables.SCHEMAS).

The views are described in their modules (viz/views/).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from cnnvis_pipeline.config import spec_digest
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir
from cnnvis_pipeline.models.input import pick_device
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.settings import Job
from cnnvis_pipeline.tables import (
    MANIFEST_VERSION,
    provenance,
    read_provenance,
    write_manifest,
    write_table,
)
from cnnvis_pipeline.viz.context import Clock, LayerContext
from cnnvis_pipeline.viz.selection import requested_units, select_units
from cnnvis_pipeline.viz.views import VIEWS

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; the {what} table of the dissection is needed")
    return pq.read_table(path).to_pandas()


def _card(ctx: LayerContext, u: int, requested: set[int], selected: bool) -> dict:
    return {"unit": int(u), "requested": int(u) in requested, "selected": selected,
            "dataset_top_activation": ctx.dataset_top(u), "views": {}}


def other_detectors(units: pd.DataFrame, selected: list[int]) -> list[int]:
    """The layer's detectors that are not selected, highest IoU first (ties: lower unit)."""
    det = units[units["detector"].astype(bool) & ~units["unit"].isin(selected)]
    det = det.sort_values(["iou", "unit"], ascending=[False, True])
    return [int(u) for u in det["unit"]]


def _provenance(ctx: LayerContext, layer_dir: Path, info: dict) -> dict:
    """What determines the views' tables: the dissection tables' config digest (the model and
    the dissection's settings) and the views' settings."""
    tables = read_provenance(layer_dir / "units.parquet").get("config_digest")
    return provenance(
        config_digest=spec_digest({
            "tables": tables, "units": ctx.job.views.units,
            "views": {v.name: v.settings(ctx.job.views) for v in VIEWS},
        }),
        dataset_digest=ctx.ds.digest, checkpoint_sha256=info.get("checkpoint_sha256"),
        extra={"model": ctx.name, "layer": ctx.layer},
    )


def _context(job: Job, prepared, layer: str, layer_dir: Path, model, device: torch.device,
             out: Path) -> LayerContext:
    thresholds = _read(layer_dir / "thresholds.parquet", "thresholds").sort_values("unit")
    return LayerContext(
        job=job, layer=layer, ds=PreparedDataset(prepared), model=model, device=device, out=out,
        units=_read(layer_dir / "units.parquet", "units").sort_values("unit"),
        top=_read(layer_dir / "top_images.parquet", "top_images"),
        thresholds=thresholds["threshold"].to_numpy(np.float64))


def _run_views(ctx: LayerContext, selected: list[int], requested: set[int]) -> tuple[dict, dict]:
    """The manifest and the views' tables (name -> columns). Every view runs for the selected
    units; a view with `every_detector` also for the layer's other detectors."""
    clock = Clock(ctx.device)
    ctx.selected = list(selected)
    others = other_detectors(ctx.units, selected)
    cards = {u: _card(ctx, u, requested, True) for u in selected}
    cards.update({u: _card(ctx, u, requested, False) for u in others})
    views, tables = {}, {}
    # The first torch.optim.Adam of a process imports torch._dynamo (seconds): not a view's cost.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    for k, view in enumerate(VIEWS):
        units = selected + others if view.every_detector else selected
        log.info("%s %s: view %d/%d, %s, %d units ...", ctx.name, ctx.layer, k + 1, len(VIEWS),
                 view.title, len(units))
        with clock.time(view.name):
            result = view.compute(ctx, units, ctx.job.views)
        for u, entry in result.cards.items():
            cards[u]["views"][view.name] = entry
        tables.update(result.tables)
        views[view.name] = {"title": view.title, "settings": view.settings(ctx.job.views),
                            "note": result.note, "layer": result.layer,
                            "seconds": clock.seconds[view.name],
                            "cpu_seconds": clock.cpu_seconds[view.name]}
        log.info("%s %s: view %d/%d, %s, done in %.1f s", ctx.name, ctx.layer, k + 1, len(VIEWS),
                 view.title, clock.seconds[view.name])
    manifest = {"version": MANIFEST_VERSION, "model": ctx.name, "layer": ctx.layer,
                "device": str(ctx.device), "threads": torch.get_num_threads(),
                "top_units": ctx.job.views.units, "order": [v.name for v in VIEWS],
                "units": [cards[u] for u in selected + others], "views": views}
    return manifest, tables


def run_visualize(job: Job, prepared: str | Path, layer: str, layer_dir: str | Path, *,
                  model=None, threads: int | None = None) -> dict:
    """Write viz/ and the views' tables for one layer; returns the manifest (also written as
    viz/manifest.json). `threads`: torch's CPU threads (default resources.threads)."""
    spec, name = job.model, job.name
    if layer not in spec["layers"]:
        raise CnnvisError(f"{name}: layer {layer!r} is not among {spec['layers']}")
    torch.set_num_threads(int(threads or job.resources.threads))
    layer_dir = Path(layer_dir)
    info = {"checkpoint_sha256": None}
    if model is None:
        model, info = build_model(name, spec)
    device = pick_device(job.resources.device)
    model = model.eval().to(device)
    with atomic_dir(layer_dir / "viz") as tmp:
        ctx = _context(job, prepared, layer, layer_dir, model, device, tmp)
        requested = requested_units(spec, layer)
        selected = select_units(ctx.units, job.views.units, requested, where=f"{name} {layer}")
        log.info("%s %s: visualising %d units on %s (and the top images of every other "
                 "detector)", name, layer, len(selected), ctx.device)
        manifest, tables = _run_views(ctx, selected, set(requested))
        write_manifest(tmp / "manifest.json", manifest)
        prov = _provenance(ctx, layer_dir, info)
        for table, rows in tables.items():
            write_table(table, rows, layer_dir / f"{table}.parquet", prov)
    return manifest
