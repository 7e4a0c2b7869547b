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
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from cnnvis_pipeline.config import spec_digest
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection import engine
from cnnvis_pipeline.dissection.results import (
    detector_counts,
    iou_columns,
    plot_layer_detectors,
    top_image_columns,
    unit_columns,
)
from cnnvis_pipeline.dissection.stats import ConceptTally, Float16Histogram
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.tables import provenance, write_table

log = logging.getLogger(__name__)

DISSECTION_DEFAULTS = {
    "quantile": 0.005,
    "iou_threshold": 0.04,
    "batch_size": 64,
    "device": "auto",
    "precision": "fp32",
    "top_k": 9,
}


def settings(spec: dict) -> dict:
    return {**DISSECTION_DEFAULTS, **(spec.get("dissection") or {})}


def _config_digest(spec: dict) -> str:
    """Digest of what determines the tables (not the device, batch size or shard count)."""
    s = settings(spec)
    keep = {k: v for k, v in spec.items() if k not in ("dissection", "checkpoint")}
    keep["dissection"] = {k: s[k] for k in ("quantile", "iou_threshold", "precision", "top_k")}
    return spec_digest(keep)


def _prov(spec: dict, ds: PreparedDataset, info: dict | None = None) -> dict:
    return provenance(
        config_digest=_config_digest(spec),
        dataset_digest=ds.digest,
        checkpoint_sha256=(info or {}).get("checkpoint_sha256"),
        extra={"model": spec["name"]},
    )


def _atomic_dir(out: Path) -> Path:
    # A temporary sibling of an earlier attempt is stale (that process was killed: Snakemake
    # runs one job per output at a time); remove it, it may hold gigabytes of activations.
    if out.parent.is_dir():
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    return tmp


def _publish_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def run_extract(spec: dict, prepared: str | Path, shard: int, shards: int, out: str | Path,
                *, progress: bool = True) -> Path:
    s = settings(spec)
    ds = PreparedDataset(prepared)
    model, info = build_model(spec["name"], spec)
    device = engine.pick_device(s["device"])
    idx = engine.shard_indices(len(ds), shards, shard)
    out = Path(out)
    tmp = _atomic_dir(out)
    try:
        stores, hists, maxima = engine.extract_shard(
            model, spec["layers"], ds, idx, input_size=spec.get("input_size"), mean=spec["mean"],
            std=spec["std"], device=device, batch_size=int(s["batch_size"]), out_dir=tmp,
            precision=s["precision"], model_name=spec["name"], progress=progress,
        )
        for layer in spec["layers"]:
            hists[layer].save(tmp / f"hist_{layer}.npz")
            np.save(tmp / f"maxima_{layer}.npy", maxima[layer])
        (tmp / "info.json").write_text(json.dumps({
            "shard": shard, "shards": shards, "start": int(idx[0]) if len(idx) else 0,
            "stop": int(idx[-1]) + 1 if len(idx) else 0, "checkpoint_sha256": info["checkpoint_sha256"],
            "shapes": {k: list(v.shape) for k, v in stores.items()},
        }, indent=1, sort_keys=True))
        del stores
        _publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _merged_histograms(spec: dict, extract_dirs: list[Path]) -> dict[str, Float16Histogram]:
    merged: dict[str, Float16Histogram] = {}
    for d in extract_dirs:
        for layer in spec["layers"]:
            h = Float16Histogram.load(Path(d) / f"hist_{layer}.npz")
            if layer in merged:
                merged[layer].merge(h)
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
    ckpt = json.loads((Path(extract_dirs[0]) / "info.json").read_text())["checkpoint_sha256"]
    for layer, hist in _merged_histograms(spec, [Path(d) for d in extract_dirs]).items():
        t = engine.unit_thresholds(hist, q)
        write_table("thresholds", _threshold_columns(spec, layer, t),
                    Path(out_dir) / layer / "thresholds.parquet",
                    _prov(digest_spec, ds, {"checkpoint_sha256": ckpt}))


def _read_thresholds(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["threshold"]).column("threshold").to_numpy()


def run_tally(spec: dict, prepared: str | Path, extract_dir: str | Path, thresholds_dir: str | Path,
              out: str | Path, *, progress: bool = True) -> Path:
    s = settings(spec)
    ds = PreparedDataset(prepared)
    device = engine.pick_device(s["device"])
    extract_dir = Path(extract_dir)
    info = json.loads((extract_dir / "info.json").read_text())
    idx = np.arange(info["start"], info["stop"], dtype=np.int64)
    states = {}
    for layer in spec["layers"]:
        store = engine.ActivationStore.open(extract_dir / f"acts_{layer}.npy")
        t = _read_thresholds(Path(thresholds_dir) / layer / "thresholds.parquet")
        tally = engine.tally_shard(ds, idx, store, t, device=device, batch_size=int(s["batch_size"]),
                                   desc=f"tally {spec['name']} {layer}", progress=progress)
        for k, v in tally.state().items():
            states[f"{layer}/{k}"] = v
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **states)
    os.replace(tmp, out)
    return out


def _write_layer_tables(spec, ds, layer, tally, thresholds, maxima, out_dir, prov) -> pd.DataFrame:
    s = settings(spec)
    layer_dir = Path(out_dir) / layer
    write_table("iou", iou_columns(spec["name"], layer, tally, ds), layer_dir / "iou.parquet", prov)
    units = unit_columns(spec["name"], layer, tally, ds, thresholds, float(s["iou_threshold"]))
    write_table("units", units, layer_dir / "units.parquet", prov)
    write_table("top_images", top_image_columns(spec["name"], layer, maxima, ds, int(s["top_k"])),
                layer_dir / "top_images.parquet", prov)
    units_df = pd.DataFrame(units)
    plot_layer_detectors(units_df, layer_dir / "detectors.png", f"{spec['name']} {layer}",
                         ds.categories)
    return units_df


def run_tables(spec: dict, prepared: str | Path, tally_files: list, extract_dirs: list,
               out_dir: str | Path, layers: list | None = None) -> None:
    digest_spec, spec = spec, _only_layers(spec, layers)
    ds = PreparedDataset(prepared)
    extract_dirs = sorted((Path(d) for d in extract_dirs),
                          key=lambda d: json.loads((d / "info.json").read_text())["start"])
    ckpt = json.loads((extract_dirs[0] / "info.json").read_text())["checkpoint_sha256"]
    prov = _prov(digest_spec, ds, {"checkpoint_sha256": ckpt})
    for layer in spec["layers"]:
        tally = None
        for f in tally_files:
            with np.load(f) as z:
                t = ConceptTally.from_state({k.split("/", 1)[1]: z[k] for k in z.files
                                             if k.startswith(f"{layer}/")})
            if tally is None:
                tally = t
            else:
                tally.merge(t)
        maxima = np.concatenate([np.load(d / f"maxima_{layer}.npy") for d in extract_dirs])
        if len(maxima) != len(ds):
            raise CnnvisError(f"{spec['name']}: shards cover {len(maxima)} of {len(ds)} images")
        thresholds = _read_thresholds(Path(out_dir) / layer / "thresholds.parquet")
        _write_layer_tables(spec, ds, layer, tally, thresholds, maxima, out_dir, prov)


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
    device = engine.pick_device(s["device"])
    extract_dirs = sorted((Path(d) for d in extract_dirs),
                          key=lambda d: json.loads((d / "info.json").read_text())["start"])
    infos = [json.loads((d / "info.json").read_text()) for d in extract_dirs]
    prov = _prov(digest_spec, ds, {"checkpoint_sha256": infos[0]["checkpoint_sha256"]})
    hists = _merged_histograms(spec, extract_dirs)
    q = float(s["quantile"])
    for layer in spec["layers"]:
        thresholds = engine.unit_thresholds(hists[layer], q)
        write_table("thresholds", _threshold_columns(spec, layer, thresholds),
                    Path(out_dir) / layer / "thresholds.parquet", prov)
        tally = None
        for d, info in zip(extract_dirs, infos, strict=True):
            store = engine.ActivationStore.open(d / f"acts_{layer}.npy")
            idx = np.arange(info["start"], info["stop"], dtype=np.int64)
            t = engine.tally_shard(ds, idx, store, thresholds, device=device,
                                   batch_size=int(s["batch_size"]),
                                   desc=f"tally {spec['name']} {layer} shard {info['shard']}",
                                   progress=progress)
            store.close()
            if tally is None:
                tally = t
            else:
                tally.merge(t)
        maxima = np.concatenate([np.load(d / f"maxima_{layer}.npy") for d in extract_dirs])
        if len(maxima) != len(ds):
            raise CnnvisError(f"{spec['name']}: shards cover {len(maxima)} of {len(ds)} images")
        _write_layer_tables(spec, ds, layer, tally, thresholds, maxima, out_dir, prov)


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
    device = engine.pick_device(s["device"])
    idx = np.arange(len(ds), dtype=np.int64)
    if not keep_on_device:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    stores, hists, maxima = engine.extract_shard(
        model, spec["layers"], ds, idx, input_size=spec.get("input_size"), mean=spec["mean"],
        std=spec["std"], device=device, batch_size=int(s["batch_size"]),
        out_dir=None if keep_on_device else Path(scratch), precision=s["precision"],
        model_name=spec["name"], progress=progress,
    )
    sync()
    t1 = time.perf_counter()
    thresholds = {k: engine.unit_thresholds(h, float(s["quantile"])) for k, h in hists.items()}
    tallies = {
        k: engine.tally_shard(ds, idx, stores[k], thresholds[k], device=device,
                              batch_size=int(s["batch_size"]), progress=progress)
        for k in spec["layers"]
    }
    sync()
    t2 = time.perf_counter()
    units = {}
    if out_dir is not None:
        prov = _prov(spec, ds, info)
        for layer in spec["layers"]:
            write_table("thresholds", _threshold_columns(spec, layer, thresholds[layer]),
                        Path(out_dir) / layer / "thresholds.parquet", prov)
            units[layer] = _write_layer_tables(spec, ds, layer, tallies[layer], thresholds[layer],
                                               maxima[layer], out_dir, prov)
    return {"tallies": tallies, "thresholds": thresholds, "maxima": maxima, "units": units,
            "extract_s": t1 - t0, "tally_s": t2 - t1}


def run_summary(units_files: list, out: str | Path, figure: str | Path | None = None,
                series: dict | None = None) -> pd.DataFrame:
    """detectors.parquet over all models and layers, the unique-detectors figure, and one
    figure per checkpoint series: `series` maps a series name to {"models": [model names in
    checkpoint order], "figure": path} (what the workflow's summary rule passes)."""
    frames = [pq.read_table(f).to_pandas() for f in sorted(map(str, units_files))]
    units = pd.concat(frames, ignore_index=True)
    cats = None
    counts = detector_counts(units, cats)
    write_table("detectors", {c: counts[c].to_numpy() if c not in ("model", "layer", "category")
                              else counts[c].tolist() for c in counts.columns}, out,
                provenance(config_digest=spec_digest(sorted(map(str, units_files))),
                           dataset_digest=None))
    if figure is not None:
        plot_summary(counts, figure)
    for name, entry in sorted((series or {}).items()):
        models = list(entry["models"])
        missing = [m for m in models if m not in set(counts["model"])]
        if missing:
            raise CnnvisError(f"series {name}: no units tables for models {missing}")
        plot_series(counts, name, models, entry["figure"])
    return counts


def _savefig(fig, path: str | Path, **kw) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None, "Creation Time": None}, **kw)


def plot_summary(counts: pd.DataFrame, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = counts.assign(where=counts["model"] + "\n" + counts["layer"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * data["where"].nunique() + 2), 4))
    if data["unique_detectors"].sum() > 0:
        totals = data.groupby("where", sort=False)["unique_detectors"].sum()
        bottom = pd.Series(0, index=totals.index)
        palette = sns.color_palette("tab10", data["category"].nunique())
        for color, (cat, g) in zip(palette, data.groupby("category", sort=True), strict=False):
            vals = g.set_index("where")["unique_detectors"].reindex(totals.index, fill_value=0)
            ax.bar(totals.index, vals, bottom=bottom, label=cat, color=color)
            bottom += vals
        ax.legend(title="category", fontsize=8)
    ax.set_ylabel("unique detectors")
    ax.set_title("Unique detectors per category, by model and layer")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)


def series_counts(counts: pd.DataFrame, name: str, models: list[str]) -> pd.DataFrame:
    """The rows of `counts` for one checkpoint series, with `checkpoint` (index in the series)
    and `checkpoint_name` (the checkpoint's stem: the model name without `<series>-`)."""
    index = {m: k for k, m in enumerate(models)}
    data = counts[counts["model"].isin(index)].copy()
    data["checkpoint"] = data["model"].map(index).astype(int)
    prefix = f"{name}-"
    data["checkpoint_name"] = [m[len(prefix):] if m.startswith(prefix) else m for m in data["model"]]
    return data.sort_values(["layer", "checkpoint", "category"]).reset_index(drop=True)


def plot_series(counts: pd.DataFrame, name: str, models: list[str], path: str | Path) -> None:
    """Unique detectors over training: x = checkpoint index in the series, y = unique detectors,
    hue = category, one panel per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = series_counts(counts, name, models)
    layers = sorted(data["layer"].unique())
    categories = sorted(data["category"].unique())
    ticks = sorted(set(data["checkpoint"]))
    labels = dict(zip(data["checkpoint"], data["checkpoint_name"], strict=False))
    cols = min(len(layers), 4)
    grid = sns.relplot(
        data=data, x="checkpoint", y="unique_detectors", hue="category", hue_order=categories,
        col="layer", col_order=layers, col_wrap=cols if len(layers) > cols else None,
        kind="line", marker="o", height=3.2, aspect=1.2, palette="tab10",
        facet_kws={"sharey": True},
    )
    from matplotlib.ticker import MaxNLocator

    top = max(1, int(data["unique_detectors"].max()) if len(data) else 1)
    for ax in grid.axes.flat:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{k}\n{labels[k]}" for k in ticks], fontsize=8)
        ax.set_ylim(-0.05 * top, top * 1.08)  # counts: integer ticks, zero lines visible
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    grid.set_axis_labels("checkpoint (index in the series)", "unique detectors")
    grid.set_titles(col_template="{col_name}")
    grid.figure.suptitle(f"Unique detectors over training: {name}", y=1.02)
    _savefig(grid.figure, path, bbox_inches="tight")
    plt.close(grid.figure)
