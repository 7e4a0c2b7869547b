"""The dissection of one model: extraction per shard, then ONE per-layer function.

`dissect_layer(job, dataset, layer, histogram, shards, maxima)` turns a layer's merged
histogram and its stored activations (one or more shards, in image order) into its tables:
thresholds T_k, the tally (int64 sums, the same integers whatever the sharding), the significance
of the tested pairs and the tables and figures. It is `dissect_units` (a range of the layer's
units, everything that depends on those units only) then `finish_layer` (what needs all the
layer's units, from the parts in unit order, and the tables): the same bytes in any number of
unit parts. Both ways of running call it:

- the workflow: `run_extract` (job `extract_shard`: one shard's float16 activations, histograms
  and per-image maxima on disk), then `run_layers` (job `layer_tables`: every shard of a layer),
  or for a layer in unit parts parts.py's `run_unit_part` (job `layer_units`) per part and
  `run_merge` (job `layer_tables`);
- in one process: `dissect(job, dataset)`, what the benchmark, the tests and users without
  Snakemake call (activations on the device or in scratch files).

Every function takes the job's typed settings (cnnvis_pipeline.settings.Job) explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from cnnvis_pipeline.config import spec_digest
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection import records, significance
from cnnvis_pipeline.dissection.affine import StoredHistogram
from cnnvis_pipeline.dissection.extract import (
    extract_shard,
    set_precision,
    shard_indices,
    unit_thresholds,
)
from cnnvis_pipeline.dissection.figures import (
    plot_layer_detectors,
    plot_series,
    plot_summary,
    plot_sweep,
)
from cnnvis_pipeline.dissection.results import (
    detector_counts,
    iou_columns,
    log_activity,
    top_image_table,
    top_images,
    unit_columns,
)
from cnnvis_pipeline.dissection.stats import unit_state
from cnnvis_pipeline.dissection.stores import ActivationStore, read_columns
from cnnvis_pipeline.dissection.tally import ConceptTally, tally_shard
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir
from cnnvis_pipeline.models.check import check_built
from cnnvis_pipeline.models.input import pick_device
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.settings import Job
from cnnvis_pipeline.tables import provenance, write_table

log = logging.getLogger(__name__)


def config_digest(job: Job) -> str:
    """Digest of what determines the tables: the model entry (not its checkpoint path, whose
    content is the tables' checkpoint_sha256) and the dissection settings; not the resources."""
    model = {k: v for k, v in job.model.items() if k != "checkpoint"}
    return spec_digest({"model": model, "dissection": dataclasses.asdict(job.dissection)})


def table_provenance(job: Job, ds: PreparedDataset, info: dict | None = None) -> dict:
    """Every dissection table's provenance, with the dissection settings it was made with (the
    report reads them there)."""
    extra = {"model": job.name, "dissection": dataclasses.asdict(job.dissection)}
    for key in ("precision", "device"):  # what the extraction actually used
        if (info or {}).get(key):
            extra[key] = info[key]
    return provenance(config_digest=config_digest(job), dataset_digest=ds.digest,
                      checkpoint_sha256=(info or {}).get("checkpoint_sha256"), extra=extra)


def _only_layers(job: Job, layers: list | None) -> Job:
    if not layers:
        return job
    unknown = [x for x in layers if x not in job.model["layers"]]
    if unknown:
        raise CnnvisError(f"{job.name}: layers {unknown} are not among {job.model['layers']}")
    return dataclasses.replace(job, model=dict(job.model, layers=list(layers)))


# -- one layer --------------------------------------------------------------------------------------

@dataclass
class LayerResult:
    thresholds: np.ndarray
    tally: ConceptTally
    stats: records.ImageStats | None  # (the per-image records of a layer done in one part)
    significance: dict | None
    units: pd.DataFrame | None  # the units table (when tables were written)
    tally_s: float
    statistics_s: float


@dataclass
class UnitPart:
    """What a range of a layer's units gives before the layer-wide steps: units first..first +
    len(thresholds) - 1, their tally and records, significance.unit_part, top images (parts.py
    saves and loads it)."""
    first: int
    thresholds: np.ndarray
    tally: ConceptTally
    stats: records.ImageStats | None
    significance: dict | None
    top_images: tuple[np.ndarray, np.ndarray]  # results.top_images of the part's units
    tally_s: float = 0.0
    statistics_s: float = 0.0


# A shard of a layer's stored activations: (a context manager giving its store, the image
# indices it holds): contextlib.closing(ActivationStore.open(...)) for a shard on disk,
# contextlib.nullcontext(store) for one that stays in memory.
Shard = tuple[AbstractContextManager, np.ndarray]


def dissect_layer(job: Job, ds: PreparedDataset, layer: str, hist: StoredHistogram,
                  shards: list[Shard], maxima: np.ndarray, *, device: torch.device,
                  out_dir: str | Path | None = None, prov: dict | None = None,
                  progress: bool = True) -> LayerResult:
    """A layer's thresholds, tally, significance and (with `out_dir`) tables and figures: its
    units in one part (dissect_units), then the layer-wide steps (finish_layer)."""
    part = dissect_units(job, ds, layer, hist, shards, maxima, device=device, progress=progress)
    return finish_layer(job, ds, layer, [part], out_dir=out_dir, prov=prov)


def dissect_units(job: Job, ds: PreparedDataset, layer: str, hist: StoredHistogram,
                  shards: list[Shard], maxima: np.ndarray, *, first: int = 0,
                  device: torch.device, progress: bool = True) -> UnitPart:
    """Units first..first + hist.units - 1 of a layer: their thresholds (from `hist`, the
    merged histogram of those units), the tally of every shard in order (reading only their
    activations), their per-image records and significance.unit_part, and their top images
    (`maxima`: [images, those units])."""
    d = job.dissection
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    thresholds = unit_thresholds(hist, d.quantile)
    if len(maxima) != len(ds):
        raise CnnvisError(f"{job.name}: shards cover {len(maxima)} of {len(ds)} images")
    t0 = time.perf_counter()
    tally = stats = None
    stop = first + hist.units
    for k, (opened, idx) in enumerate(shards):
        part_stats = records.new_stats(ds, d.statistics)
        with opened as store, closing(store.unit_range(first, stop)) as units:
            part = tally_shard(ds, idx, units, thresholds, device=device,
                               batch_size=job.resources.batch_size, progress=progress,
                               desc=f"tally {job.name} {layer} shard {k}", stats=part_stats)
        if tally is None:
            tally, stats = part, part_stats
            continue
        # int64 sums and records merged in shard order, each shard's records freed once merged
        tally.merge(part)
        if stats is not None:
            stats.merge(part_stats)
        del part, part_stats
    sync()
    t1 = time.perf_counter()
    sig = None if stats is None else significance.unit_part(
        tally, stats, ds, d.statistics, d.iou_threshold, first)
    t2 = time.perf_counter()
    return UnitPart(first, thresholds, tally, stats, sig, top_images(maxima, d.top_k),
                    t1 - t0, t2 - t1)


def finish_layer(job: Job, ds: PreparedDataset, layer: str, parts: list[UnitPart], *,
                 out_dir: str | Path | None = None, prov: dict | None = None) -> LayerResult:
    """The layer from its unit parts (in unit order, together every unit once): what needs
    every unit (the BH q-values and detector_fdr over the layer, the sweep, the figures), and
    (with `out_dir`) the tables, the same bytes whatever the parts."""
    at = 0
    for p in parts:
        if p.first != at:
            raise CnnvisError(f"{job.name} {layer}: the unit parts start at {p.first}, not {at}")
        at += len(p.thresholds)
    tally = ConceptTally.concat([p.tally for p in parts])
    t0 = time.perf_counter()
    sig = None
    if parts[0].significance is not None:
        sig = significance.finish_layer([p.significance for p in parts],
                                        job.dissection.statistics)
    t1 = time.perf_counter()
    thresholds = np.concatenate([p.thresholds for p in parts])
    top = tuple(np.concatenate([p.top_images[i] for p in parts]) for i in (0, 1))
    units = None
    if out_dir is not None:
        units = _write_layer_tables(job, ds, layer, tally, thresholds, top,
                                    Path(out_dir) / layer, prov, sig)
    return LayerResult(thresholds, tally, parts[0].stats if len(parts) == 1 else None, sig,
                       units, sum(p.tally_s for p in parts),
                       sum(p.statistics_s for p in parts) + t1 - t0)


def _write_layer_tables(job: Job, ds, layer, tally, thresholds, top, layer_dir: Path, prov,
                        sig) -> pd.DataFrame:
    d, name, n = job.dissection, job.name, len(thresholds)
    write_table("thresholds", {
        "model": [name] * n, "layer": [layer] * n, "unit": np.arange(n, dtype=np.int32),
        "quantile": [d.quantile] * n, "threshold": thresholds,
    }, layer_dir / "thresholds.parquet", prov)
    write_table("iou", iou_columns(name, layer, tally, ds), layer_dir / "iou.parquet", prov)
    units = unit_columns(name, layer, tally, ds, thresholds, d.iou_threshold)
    units.update(significance.unit_significance_columns(sig, len(units["unit"])))
    log_activity(name, layer, units["activity"])
    write_table("units", units, layer_dir / "units.parquet", prov)
    write_table("significance", significance.significance_columns(name, layer, sig, ds),
                layer_dir / "significance.parquet", prov)
    sweep = significance.sweep_columns(name, layer, pd.DataFrame(units), ds.categories,
                                       d.statistics.fdr)
    write_table("sweep", sweep, layer_dir / "sweep.parquet", prov)
    plot_sweep(pd.DataFrame(sweep), layer_dir / "sweep.png", f"{name} {layer}", d.iou_threshold)
    write_table("top_images", top_image_table(name, layer, *top, ds),
                layer_dir / "top_images.parquet", prov)
    units_df = pd.DataFrame(units)
    plot_layer_detectors(units_df, layer_dir / "detectors.png", f"{name} {layer}", ds.categories)
    return units_df


# -- the workflow's jobs ----------------------------------------------------------------------------

def run_extract(job: Job, prepared: str | Path, shard: int, shards: int, out: str | Path,
                *, progress: bool = True) -> Path:
    """One shard's float16 activations, histograms and per-image maxima -> directory `out`."""
    spec = job.model
    ds = PreparedDataset(prepared)
    model, info = build_model(job.name, spec)
    check_built(model, spec, ds)  # every layer/unit problem at once, before the first batch
    device = pick_device(job.resources.device)
    used = set_precision(job.dissection.precision, device)
    idx = shard_indices(len(ds), shards, shard)
    out = Path(out)
    # stale=True: a temporary sibling of a killed attempt may hold gigabytes of activations.
    with atomic_dir(out, stale=True) as tmp:
        stores, hists, maxima = extract_shard(
            model, spec["layers"], ds, idx, input_size=spec.get("input_size"), mean=spec["mean"],
            std=spec["std"], device=device, batch_size=job.resources.batch_size, out_dir=tmp,
            precision=job.dissection.precision, model_name=job.name, progress=progress,
            quantile=job.dissection.quantile, layouts=spec.get("layouts"),
        )
        for layer in spec["layers"]:
            hists[layer].save(tmp / f"hist_{layer}.npz")
            np.save(tmp / f"maxima_{layer}.npy", maxima[layer])
        (tmp / "info.json").write_text(json.dumps({
            "shard": shard, "shards": shards, "start": int(idx[0]) if len(idx) else 0,
            "stop": int(idx[-1]) + 1 if len(idx) else 0, "checkpoint_sha256": info["checkpoint_sha256"],
            "precision": used, "device": str(device),
            "shapes": {k: list(v.shape) for k, v in stores.items()},
        }, indent=1, sort_keys=True))
        del stores
    return out


def extractions(extract_dirs: list) -> tuple[list[Path], list[dict]]:
    """The shards' extraction directories in image order, and their info.json."""
    dirs = sorted((Path(d) for d in extract_dirs),
                  key=lambda d: json.loads((d / "info.json").read_text())["start"])
    return dirs, [json.loads((d / "info.json").read_text()) for d in dirs]


def layer_inputs(job: Job, layer: str, dirs: list[Path], infos: list[dict], first: int = 0,
                 stop: int | None = None) -> tuple[StoredHistogram, list[Shard], np.ndarray]:
    """What dissect_units reads of units first..stop-1 (default: all) of a layer from every
    shard's extraction: their merged histogram, the shards' stores, their per-image maxima.
    Each read takes only those units (histograms and maxima a bounded chunk at a time)."""
    stop = infos[0]["shapes"][layer][1] if stop is None else stop
    merged = None
    for d in dirs:
        h = StoredHistogram.from_state(unit_state(d / f"hist_{layer}.npz", first, stop))
        if merged is None:
            merged = h
            continue
        try:  # shards stored in other coordinates do not merge
            merged.merge(h)
        except CnnvisError as e:
            raise CnnvisError(f"{job.name} {layer}: {d}: {e}") from None
    shards = [(closing(ActivationStore.open(d / f"acts_{layer}.npy")),
               np.arange(info["start"], info["stop"], dtype=np.int64))
              for d, info in zip(dirs, infos, strict=True)]
    maxima = np.concatenate([read_columns(d / f"maxima_{layer}.npy", first, stop) for d in dirs])
    return merged, shards, maxima


def run_layers(job: Job, prepared: str | Path, extract_dirs: list, out_dir: str | Path,
               layers: list | None = None, *, progress: bool = True) -> None:
    """The tables of each layer (`layers`, default all) from every shard's extraction: what the
    workflow's `layer_tables` job runs for a layer in one part (one read of the layer's
    activations, in shard order). A layer in unit parts: parts.py."""
    digest_job, job = job, _only_layers(job, layers)
    ds = PreparedDataset(prepared)
    device = pick_device(job.resources.device)
    dirs, infos = extractions(extract_dirs)
    prov = table_provenance(digest_job, ds, infos[0])
    for layer in job.model["layers"]:
        hist, shards, maxima = layer_inputs(job, layer, dirs, infos)
        dissect_layer(job, ds, layer, hist, shards, maxima, device=device, out_dir=out_dir,
                      prov=prov, progress=progress)


# -- in one process ---------------------------------------------------------------------------------

def dissect(job: Job, prepared: str | Path | PreparedDataset, out_dir: str | Path | None = None,
            *, keep_on_device: bool = True, scratch: str | Path | None = None,
            progress: bool = True, model=None) -> dict:
    """The whole dissection of one model in one process, through `dissect_layer`. Returns
    tallies, thresholds, maxima, units tables and timings (extract_s, tally_s, statistics_s).

    Activations stay on the device when `keep_on_device` (they must fit), else in memory-mapped
    files under `scratch`. Tables are written only when `out_dir` is given.
    """
    spec = job.model
    ds = prepared if isinstance(prepared, PreparedDataset) else PreparedDataset(prepared)
    info = {"checkpoint_sha256": None}
    if model is None:
        model, info = build_model(job.name, spec)
    device = pick_device(job.resources.device)
    info = dict(info, precision=set_precision(job.dissection.precision, device), device=str(device))
    idx = np.arange(len(ds), dtype=np.int64)
    if not keep_on_device:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    stores, hists, maxima = extract_shard(
        model, spec["layers"], ds, idx, input_size=spec.get("input_size"), mean=spec["mean"],
        std=spec["std"], device=device, batch_size=job.resources.batch_size,
        out_dir=None if keep_on_device else Path(scratch), precision=job.dissection.precision,
        model_name=job.name, progress=progress, quantile=job.dissection.quantile,
        layouts=spec.get("layouts"),
    )
    sync()
    extract_s = time.perf_counter() - t0
    prov = table_provenance(job, ds, info) if out_dir is not None else None
    results = {layer: dissect_layer(job, ds, layer, hists[layer], [(nullcontext(stores[layer]), idx)],
                                    maxima[layer], device=device, out_dir=out_dir, prov=prov,
                                    progress=progress)
               for layer in spec["layers"]}
    return {"tallies": {k: r.tally for k, r in results.items()},
            "thresholds": {k: r.thresholds for k, r in results.items()},
            "maxima": maxima,
            "units": {k: r.units for k, r in results.items() if r.units is not None},
            "significance": {k: r.significance for k, r in results.items()},
            "extract_s": extract_s, "tally_s": sum(r.tally_s for r in results.values()),
            "statistics_s": sum(r.statistics_s for r in results.values()),
            "precision": info["precision"]}


def run_summary(units_files: list, out: str | Path, figure: str | Path | None = None,
                series: dict | None = None, prepared: str | Path | None = None) -> pd.DataFrame:
    """detectors.parquet over all models and layers, the unique-detectors figure, and one
    figure per checkpoint series: `series` maps a series name to {"models": [model names in
    checkpoint order], "figure": path} (what the workflow's summary rule passes).
    `prepared`: the dataset, whose every category gets a row per model and layer (0 where no
    unit detects it); without it, the categories of the units' labels."""
    frames = [pq.read_table(f).to_pandas() for f in sorted(map(str, units_files))]
    units = pd.concat(frames, ignore_index=True)
    ds = PreparedDataset(prepared) if prepared is not None else None
    counts = detector_counts(units, ds.categories if ds is not None else None)
    nullable = ("model", "layer", "category", "detectors_fdr", "unique_detectors_fdr")
    write_table("detectors", {c: counts[c].to_numpy() if c not in nullable
                              else [None if pd.isna(v) else v for v in counts[c]]
                              for c in counts.columns}, out,
                provenance(config_digest=spec_digest(sorted(map(str, units_files))),
                           dataset_digest=ds.digest if ds is not None else None))
    if figure is not None:
        plot_summary(counts, figure)
    for name, entry in sorted((series or {}).items()):
        models = list(entry["models"])
        missing = [m for m in models if m not in set(counts["model"])]
        if missing:
            raise CnnvisError(f"series {name}: no units tables for models {missing}")
        plot_series(counts, name, models, entry["figure"])
    return counts
