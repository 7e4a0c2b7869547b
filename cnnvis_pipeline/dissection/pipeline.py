"""The dissection stages as file-to-file steps (what the workflow's rules run), and in-process.

A `spec` is one resolved model entry (cnnvis_pipeline.config.model_specs) plus `name` and the
`dissection` settings (quantile, iou_threshold, batch_size, device, precision, top_k).

- run_extract: shard -> directory with float16 activations, histograms and per-image maxima.
- run_thresholds: merged histograms of all shards -> <out>/<layer>/thresholds.parquet.
- run_tally: one shard's activations + thresholds -> tally .npz (one ConceptTally per layer).
- run_tables: merged tallies -> <out>/<layer>/{iou,units,top_images}.parquet and detectors.png.
- run_layers: thresholds + tally + tables of a layer in one step from all shards' extractions
  (the workflow's layer_tables job).
- dissect(...): all of the above in one process (no intermediate files unless asked); the
  benchmark and users without Snakemake call this. Same functions, same results.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from cnnvis_pipeline.config import spec_digest, with_defaults
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
    top_image_columns,
    unit_columns,
)
from cnnvis_pipeline.dissection.stores import ActivationStore
from cnnvis_pipeline.dissection.tally import ConceptTally, tally_shard
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir, atomic_file
from cnnvis_pipeline.models.check import check_built
from cnnvis_pipeline.models.input import pick_device
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.tables import provenance, write_table

log = logging.getLogger(__name__)


def settings(spec: dict) -> dict:
    """The spec's `dissection` settings, with the schema's defaults for what it leaves out."""
    return with_defaults("dissection", spec.get("dissection"))


def _config_digest(spec: dict) -> str:
    """Digest of what determines the tables (not the device, batch size or shard count)."""
    s = settings(spec)
    keep = {k: v for k, v in spec.items() if k not in ("dissection", "checkpoint")}
    keep["dissection"] = {k: s[k] for k in ("quantile", "iou_threshold", "precision", "top_k",
                                            "statistics")}
    return spec_digest(keep)


def _prov(spec: dict, ds: PreparedDataset, info: dict | None = None) -> dict:
    extra = {"model": spec["name"]}
    if (info or {}).get("precision"):  # the precision the extraction actually used
        extra["precision"] = info["precision"]
    return provenance(config_digest=_config_digest(spec), dataset_digest=ds.digest,
                      checkpoint_sha256=(info or {}).get("checkpoint_sha256"), extra=extra)


def run_extract(spec: dict, prepared: str | Path, shard: int, shards: int, out: str | Path,
                *, progress: bool = True) -> Path:
    s = settings(spec)
    ds = PreparedDataset(prepared)
    model, info = build_model(spec["name"], spec)
    check_built(model, spec, ds)  # every layer/unit problem at once, before the first batch
    device = pick_device(s["device"])
    used = set_precision(s["precision"], device)
    idx = shard_indices(len(ds), shards, shard)
    out = Path(out)
    # stale=True: a temporary sibling of a killed attempt may hold gigabytes of activations.
    with atomic_dir(out, stale=True) as tmp:
        stores, hists, maxima = extract_shard(
            model, spec["layers"], ds, idx, input_size=spec.get("input_size"), mean=spec["mean"],
            std=spec["std"], device=device, batch_size=int(s["batch_size"]), out_dir=tmp,
            precision=s["precision"], model_name=spec["name"], progress=progress,
            quantile=float(s["quantile"]), layouts=spec.get("layouts"),
        )
        for layer in spec["layers"]:
            hists[layer].save(tmp / f"hist_{layer}.npz")
            np.save(tmp / f"maxima_{layer}.npy", maxima[layer])
        (tmp / "info.json").write_text(json.dumps({
            "shard": shard, "shards": shards, "start": int(idx[0]) if len(idx) else 0,
            "stop": int(idx[-1]) + 1 if len(idx) else 0, "checkpoint_sha256": info["checkpoint_sha256"],
            "precision": used,
            "shapes": {k: list(v.shape) for k, v in stores.items()},
        }, indent=1, sort_keys=True))
        del stores
    return out


def _merged_histograms(spec: dict, extract_dirs: list[Path]) -> dict[str, StoredHistogram]:
    merged: dict[str, StoredHistogram] = {}
    for d in extract_dirs:
        for layer in spec["layers"]:
            h = StoredHistogram.load(Path(d) / f"hist_{layer}.npz")
            if layer in merged:
                try:  # shards stored in other coordinates do not merge
                    merged[layer].merge(h)
                except CnnvisError as e:
                    raise CnnvisError(f"{spec['name']} {layer}: {d}: {e}") from None
            else:
                merged[layer] = h
    return merged


def _threshold_columns(spec, layer, thresholds):
    q = settings(spec)["quantile"]
    return {
        "model": [spec["name"]] * len(thresholds), "layer": [layer] * len(thresholds),
        "unit": np.arange(len(thresholds), dtype=np.int32), "quantile": [float(q)] * len(thresholds),
        "threshold": thresholds,
    }


def _only_layers(spec: dict, layers: list | None) -> dict:
    if not layers:
        return spec
    unknown = [x for x in layers if x not in spec["layers"]]
    if unknown:
        raise CnnvisError(f"{spec['name']}: layers {unknown} are not among {spec['layers']}")
    return dict(spec, layers=list(layers))


def run_thresholds(spec: dict, prepared: str | Path, extract_dirs: list, out_dir: str | Path,
                   layers: list | None = None) -> None:
    digest_spec, spec = spec, _only_layers(spec, layers)
    ds = PreparedDataset(prepared)
    q = float(settings(spec)["quantile"])
    ckpt = json.loads((Path(extract_dirs[0]) / "info.json").read_text())
    for layer, hist in _merged_histograms(spec, [Path(d) for d in extract_dirs]).items():
        t = unit_thresholds(hist, q)
        write_table("thresholds", _threshold_columns(spec, layer, t),
                    Path(out_dir) / layer / "thresholds.parquet",
                    _prov(digest_spec, ds, ckpt))


def _read_thresholds(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["threshold"]).column("threshold").to_numpy()


def run_tally(spec: dict, prepared: str | Path, extract_dir: str | Path, thresholds_dir: str | Path,
              out: str | Path, *, progress: bool = True) -> Path:
    s = settings(spec)
    ds = PreparedDataset(prepared)
    device = pick_device(s["device"])
    extract_dir = Path(extract_dir)
    info = json.loads((extract_dir / "info.json").read_text())
    idx = np.arange(info["start"], info["stop"], dtype=np.int64)
    states = {}
    for layer in spec["layers"]:
        store = ActivationStore.open(extract_dir / f"acts_{layer}.npy")
        t = _read_thresholds(Path(thresholds_dir) / layer / "thresholds.parquet")
        stats = records.new_stats(ds, s["statistics"])
        tally = tally_shard(ds, idx, store, t, device=device, batch_size=int(s["batch_size"]),
                            desc=f"tally {spec['name']} {layer}", progress=progress, stats=stats)
        for k, v in {**tally.state(), **(stats.state() if stats else {})}.items():
            states[f"{layer}/{k}"] = v
    out = Path(out)
    with atomic_file(out, suffix=".npz") as tmp:  # np.savez adds .npz to any other name
        np.savez(tmp, **states)
    return out


def layer_significance(spec: dict, ds, tally, stats) -> dict | None:
    """The significance of one layer's tested pairs (None when statistics are disabled)."""
    s = settings(spec)
    if stats is None:
        return None
    return significance.significance(tally, stats, ds, s["statistics"], float(s["iou_threshold"]))


def _write_layer_tables(spec, ds, layer, tally, thresholds, maxima, out_dir, prov,
                        sig=None) -> pd.DataFrame:
    s = settings(spec)
    layer_dir = Path(out_dir) / layer
    write_table("iou", iou_columns(spec["name"], layer, tally, ds), layer_dir / "iou.parquet", prov)
    units = unit_columns(spec["name"], layer, tally, ds, thresholds, float(s["iou_threshold"]))
    units.update(significance.unit_significance_columns(sig, len(units["unit"])))
    log_activity(spec["name"], layer, units["activity"])
    write_table("units", units, layer_dir / "units.parquet", prov)
    write_table("significance", significance.significance_columns(spec["name"], layer, sig, ds),
                layer_dir / "significance.parquet", prov)
    sweep = significance.sweep_columns(spec["name"], layer, pd.DataFrame(units), ds.categories,
                                       float(s["statistics"]["fdr"]))
    write_table("sweep", sweep, layer_dir / "sweep.parquet", prov)
    plot_sweep(pd.DataFrame(sweep), layer_dir / "sweep.png", f"{spec['name']} {layer}",
               float(s["iou_threshold"]))
    write_table("top_images", top_image_columns(spec["name"], layer, maxima, ds, int(s["top_k"])),
                layer_dir / "top_images.parquet", prov)
    units_df = pd.DataFrame(units)
    plot_layer_detectors(units_df, layer_dir / "detectors.png", f"{spec['name']} {layer}",
                         ds.categories)
    return units_df


def _merged(tallies) -> ConceptTally:
    """The sum of the tallies (merged in the order given)."""
    it = iter(tallies)
    tally = next(it)
    for t in it:
        tally.merge(t)
    return tally


def _tally_file_part(path, layer: str, stats: bool = False):
    """(ConceptTally, records.ImageStats or None) of `layer` in a tally file."""
    with np.load(path) as z:
        state = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{layer}/")}
    return ConceptTally.from_state(state), records.ImageStats.from_state(state) if stats else None


def _layer_maxima(spec: dict, ds: PreparedDataset, extract_dirs: list[Path],
                  layer: str) -> np.ndarray:
    """Each image's per-unit maximum of `layer`, over all shards in image order."""
    maxima = np.concatenate([np.load(d / f"maxima_{layer}.npy") for d in extract_dirs])
    if len(maxima) != len(ds):
        raise CnnvisError(f"{spec['name']}: shards cover {len(maxima)} of {len(ds)} images")
    return maxima


def run_tables(spec: dict, prepared: str | Path, tally_files: list, extract_dirs: list,
               out_dir: str | Path, layers: list | None = None) -> None:
    digest_spec, spec = spec, _only_layers(spec, layers)
    ds = PreparedDataset(prepared)
    extract_dirs = sorted((Path(d) for d in extract_dirs),
                          key=lambda d: json.loads((d / "info.json").read_text())["start"])
    prov = _prov(digest_spec, ds, json.loads((extract_dirs[0] / "info.json").read_text()))
    enabled = settings(spec)["statistics"]["enabled"]
    for layer in spec["layers"]:
        parts = [_tally_file_part(f, layer, enabled) for f in tally_files]
        tally = _merged(t for t, _ in parts)
        stats = _merged(st for _, st in parts) if enabled else None
        thresholds = _read_thresholds(Path(out_dir) / layer / "thresholds.parquet")
        _write_layer_tables(spec, ds, layer, tally, thresholds,
                            _layer_maxima(spec, ds, extract_dirs, layer), out_dir, prov,
                            layer_significance(spec, ds, tally, stats))


def run_layers(spec: dict, prepared: str | Path, extract_dirs: list, out_dir: str | Path,
               layers: list | None = None, *, progress: bool = True) -> None:
    """Thresholds, tally and tables of each layer in one step, from every shard's extraction.

    What the workflow's `layer_tables` job runs: the merged histograms give T_k
    (<layer>/thresholds.parquet), every shard's activations are tallied in shard order and the
    int64 sums merged (the same integers as per-shard tallies), then the tables are written.
    One job per layer instead of a thresholds job per layer, a tally job per shard and a tables
    job per layer: the layer's activations are read once, by one process.
    """
    digest_spec, spec = spec, _only_layers(spec, layers)
    s = settings(spec)
    ds = PreparedDataset(prepared)
    device = pick_device(s["device"])
    extract_dirs = sorted((Path(d) for d in extract_dirs),
                          key=lambda d: json.loads((d / "info.json").read_text())["start"])
    infos = [json.loads((d / "info.json").read_text()) for d in extract_dirs]
    prov = _prov(digest_spec, ds, infos[0])
    hists = _merged_histograms(spec, extract_dirs)
    q = float(s["quantile"])
    for layer in spec["layers"]:
        thresholds = unit_thresholds(hists[layer], q)
        write_table("thresholds", _threshold_columns(spec, layer, thresholds),
                    Path(out_dir) / layer / "thresholds.parquet", prov)
        def shard_tally(d: Path, info: dict, layer=layer, thresholds=thresholds):
            store = ActivationStore.open(d / f"acts_{layer}.npy")
            stats = records.new_stats(ds, s["statistics"])
            try:
                return tally_shard(ds, np.arange(info["start"], info["stop"], dtype=np.int64),
                                   store, thresholds, device=device,
                                   batch_size=int(s["batch_size"]), progress=progress,
                                   desc=f"tally {spec['name']} {layer} shard {info['shard']}",
                                   stats=stats), stats
            finally:
                store.close()

        parts = [shard_tally(d, info) for d, info in zip(extract_dirs, infos, strict=True)]
        tally = _merged(t for t, _ in parts)
        stats = _merged(st for _, st in parts) if parts[0][1] is not None else None
        _write_layer_tables(spec, ds, layer, tally, thresholds,
                            _layer_maxima(spec, ds, extract_dirs, layer), out_dir, prov,
                            layer_significance(spec, ds, tally, stats))


def dissect(spec: dict, prepared: str | Path | PreparedDataset, out_dir: str | Path | None = None,
            *, keep_on_device: bool = True, scratch: str | Path | None = None,
            progress: bool = True, model=None) -> dict:
    """The whole dissection of one model in one process. Returns tallies, thresholds and timings.

    Activations stay on the device when `keep_on_device` (they must fit), else in memory-mapped
    files under `scratch`. Tables are written only when `out_dir` is given.
    """
    s = settings(spec)
    ds = prepared if isinstance(prepared, PreparedDataset) else PreparedDataset(prepared)
    info = {"checkpoint_sha256": None}
    if model is None:
        model, info = build_model(spec["name"], spec)
    device = pick_device(s["device"])
    info = dict(info, precision=set_precision(s["precision"], device))
    idx = np.arange(len(ds), dtype=np.int64)
    if not keep_on_device:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    stores, hists, maxima = extract_shard(
        model, spec["layers"], ds, idx, input_size=spec.get("input_size"), mean=spec["mean"],
        std=spec["std"], device=device, batch_size=int(s["batch_size"]),
        out_dir=None if keep_on_device else Path(scratch), precision=s["precision"],
        model_name=spec["name"], progress=progress, quantile=float(s["quantile"]),
        layouts=spec.get("layouts"),
    )
    sync()
    t1 = time.perf_counter()
    thresholds = {k: unit_thresholds(h, float(s["quantile"])) for k, h in hists.items()}
    stats = {k: records.new_stats(ds, s["statistics"]) for k in spec["layers"]}
    tallies = {
        k: tally_shard(ds, idx, stores[k], thresholds[k], device=device,
                       batch_size=int(s["batch_size"]), progress=progress, stats=stats[k])
        for k in spec["layers"]
    }
    sync()
    t2 = time.perf_counter()
    sigs = {k: layer_significance(spec, ds, tallies[k], stats[k]) for k in spec["layers"]}
    t3 = time.perf_counter()
    units = {}
    if out_dir is not None:
        prov = _prov(spec, ds, info)
        for layer in spec["layers"]:
            write_table("thresholds", _threshold_columns(spec, layer, thresholds[layer]),
                        Path(out_dir) / layer / "thresholds.parquet", prov)
            units[layer] = _write_layer_tables(spec, ds, layer, tallies[layer], thresholds[layer],
                                               maxima[layer], out_dir, prov, sigs[layer])
    return {"tallies": tallies, "thresholds": thresholds, "maxima": maxima, "units": units,
            "significance": sigs, "extract_s": t1 - t0, "tally_s": t2 - t1,
            "statistics_s": t3 - t2, "precision": info["precision"]}


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
