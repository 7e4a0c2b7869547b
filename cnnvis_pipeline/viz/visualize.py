"""Visualise the selected units of one layer (the `visualize_layer` rule).

run_visualize(spec, prepared, layer, layer_dir, reports) reads the layer's dissection tables in
`layer_dir` (units, top_images, thresholds), selects the units (viz.selection.select_units) and
writes, next to them:

- viz/unit<U>_top.png       the unit's top-activating dataset images (top_images.parquet, highest
                            maximum activation first), everything outside its thresholded mask
                            darkened and the mask outlined. The maps come from one new forward
                            pass over those images: float32 (the layer's own values), bilinear
                            (align_corners=False) to the image size, > the unit's threshold.
- viz/unit<U>_am.png        activation maximisation (viz.activation_max, all units in
                            one batch, reports.activation_max.preset) with the model's mean/std,
                            fed at the dataset's input size (the model's input_size, else the
                            prepared images' size), as the dataset top was measured.
- viz/unit<U>_deconv.png    DeconvNet projections of the strongest activation in each top image
                            (bottom row) under the image patch cropped to that location's
                            receptive field (top row). A model whose ReLUs are not nn.ReLU
                            modules is refused by viz.deconvnet; the message goes to the manifest
                            (and the report) instead of failing the rule.
- viz/inversion_<k>_{original,reconstruction}.png   network inversion of fixed dataset images.
- viz/manifest.json         what the report needs: per unit the files and numbers, timings.
- activation_max.parquet    per unit: achieved_activation = the maximum of the unit's map on its
                            final AM image, dataset_top_activation = the highest maximum
                            activation among the unit's top images (the same statistic over
                            dataset images), activation_ratio = achieved / dataset top
                            (NaN when the dataset top is 0). The AM objective
                            itself (the mean of the map) is in the manifest and the report.
- inversion.parquet         per image: error = ||Phi(x*) - Phi0||^2 / ||Phi0||^2 (invert's),
                            normalized_error = ||Phi(x*) - Phi0||^2 / spread, where spread is the
                            mean over all n^2 ordered pairs (diagonal included) of the squared
                            distances between the representations of `inversion.spread_images`
                            dataset images (viz.representation_spread; the formula is
                            viz.NORMALIZED_ERROR_FORMULA, also in the manifest). lambda_tv is the
                            paper's for the layer's relative depth unless the config sets it
                            (reports.inversion.lambda_tv, .layers.<layer>.lambda_tv).

The inverted images are the first `inversion.images` images of the val split (all images when
the split is too small) whose representation at the layer is not all zeros.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from cnnvis_pipeline.config import spec_digest
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir
from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.input import (
    images_to_input,
    normalize,
    pick_device,
    resize,
    to_unit_float,
)
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.settings import Job
from cnnvis_pipeline.tables import provenance, write_table
from cnnvis_pipeline.viz import images as im
from cnnvis_pipeline.viz import inversion
from cnnvis_pipeline.viz.activation_max import activation_maximization
from cnnvis_pipeline.viz.deconvnet import deconvnet, receptive_field, strongest_locations
from cnnvis_pipeline.viz.selection import requested_units, select_units
from cnnvis_pipeline.viz.settings import inversion_weights, legacy_settings

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def unit_file(unit: int, view: str) -> str:
    return f"unit{unit:04d}_{view}.png"


@dataclass
class _Layer:
    """What every view of one layer works with."""

    spec: dict
    layer: str
    ds: PreparedDataset
    model: torch.nn.Module
    device: torch.device
    out: Path  # the temporary viz/ directory

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def norm(self) -> dict:
        return {"mean": self.spec["mean"], "std": self.spec["std"], "model_name": self.name,
                "layouts": self.spec.get("layouts")}

    def images(self, idx) -> torch.Tensor:
        """[N, 3, h, w] in [0, 1] as the model sees them before normalisation."""
        x = np.ascontiguousarray(self.ds.images[np.asarray(idx, np.int64)])
        return to_unit_float(x, self.spec.get("input_size"), self.device)


class _Clock:
    """Wall-clock and process CPU seconds of each view, synchronised with the device."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.timings: dict[str, float] = {}  # wall-clock seconds per view
        self.cpu_times: dict[str, float] = {}  # CPU seconds of this process (all threads)

    @contextmanager
    def time(self, key: str):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.sync()
        self.timings[key] = time.perf_counter() - t0
        self.cpu_times[key] = time.process_time() - c0


@torch.no_grad()
def layer_activations(model, layer: str, ds: PreparedDataset, idx, spec: dict,
                      device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """float32 [N, U, h, w] activations of `layer` for dataset images `idx` (the dissection's
    input pipeline: models.input.images_to_input)."""
    idx = np.asarray(idx, np.int64)
    outs = []
    with LayerRecorder(model, [layer], model_name=spec["name"], stop_after_last=True,
                       layouts=spec.get("layouts")) as rec:
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            x = images_to_input(np.ascontiguousarray(ds.images[part]),
                                spec.get("input_size"), spec["mean"], spec["std"], device)
            outs.append(rec.run(x)[layer].float())
    return torch.cat(outs)


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; the {what} table of the dissection is needed")
    return pq.read_table(path).to_pandas()


def inversion_candidates(ds: PreparedDataset) -> np.ndarray:
    splits = np.asarray(ds.meta["splits"])
    val = np.flatnonzero(splits == "val")
    rest = np.flatnonzero(splits != "val")
    return np.concatenate([val, rest]).astype(np.int64)


def _columns(*names: str) -> dict[str, list]:
    return {n: [] for n in names}


def _append(rows: dict[str, list], **values) -> None:
    for key, v in values.items():
        rows[key].append(v)


# -- the views -----------------------------------------------------------------------------------

def _card(u: int, units_by_id: pd.DataFrame, top: pd.DataFrame, top_df: pd.DataFrame,
          thr: np.ndarray, requested: set[int]) -> dict:
    return {
        "unit": int(u),
        "requested": int(u) in requested,
        "concept": str(units_by_id.loc[u, "concept"]),
        "category": str(units_by_id.loc[u, "category"]),
        "iou": float(units_by_id.loc[u, "iou"]),
        "detector": bool(units_by_id.loc[u, "detector"]),
        "threshold": float(thr[u]),
        "top_images": top["image"].tolist(),
        "top_image_index": [int(i) for i in top["image_index"]],
        "top_max_activation": [float(v) for v in top["max_activation"]],
        "dataset_top_activation": float(top_df.loc[top_df["unit"] == u, "max_activation"].max()),
    }


def top_images_view(L: _Layer, selected: list[int], units_df: pd.DataFrame,
                    top_df: pd.DataFrame, thr: np.ndarray, requested: set[int], k_show: int,
                    batch_size: int) -> tuple[dict[int, dict], float]:
    """The unit cards, and viz/unit<U>_top.png: the top images with the unit's mask, from one
    forward pass over the few images needed. Returns the cards and the largest difference
    between the recomputed and the tabled maxima."""
    tops = {u: top_df[top_df["unit"] == u].sort_values("rank").head(k_show) for u in selected}
    needed = np.unique(np.concatenate([t["image_index"].to_numpy(np.int64) for t in tops.values()]
                                      + [np.zeros(0, np.int64)]))
    pos = {int(i): k for k, i in enumerate(needed)}
    units_by_id = units_df.set_index("unit")
    cards: dict[int, dict] = {}
    max_check = 0.0
    acts = (layer_activations(L.model, L.layer, L.ds, needed, L.spec, L.device, batch_size)
            if len(needed) else None)
    ih, iw = L.ds.images.shape[1:3]
    for u in selected:
        t = tops[u]
        rows = [pos[int(i)] for i in t["image_index"]]
        card = cards[u] = _card(u, units_by_id, t, top_df, thr, requested)
        if not rows:
            continue
        a = acts[rows, u : u + 1].float()
        recomputed = a.amax(dim=(1, 2, 3)).cpu().numpy().astype(np.float64)
        max_check = max(max_check, float(np.abs(recomputed - t["max_activation"].to_numpy()).max()))
        up = F.interpolate(a, size=(ih, iw), mode="bilinear", align_corners=False)
        masks = (up[:, 0] > float(thr[u])).cpu().numpy()
        tiles = [im.mask_overlay(np.asarray(L.ds.images[i]), m)
                 for i, m in zip(t["image_index"], masks, strict=True)]
        card["mask_fraction"] = [float(m.mean()) for m in masks]
        im.save_png(im.strip(tiles), L.out / unit_file(u, "top"))
        card["top_file"] = unit_file(u, "top")
    return cards, max_check


def _am_input_size(L: _Layer) -> tuple[int, int]:
    """AM images are judged as the dataset is: at the dataset's input size (the model's
    input_size, else the prepared images' size)."""
    size = L.spec.get("input_size")
    return tuple(size) if size is not None else tuple(int(v) for v in L.ds.images.shape[1:3])


def _activation_max_images(L: _Layer, selected: list[int], am: dict, clock: _Clock):
    # The first torch.optim.Adam of a process imports torch._dynamo (seconds): not the
    # visualisation's cost, so it happens before the clock starts.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with clock.time("activation_max_s"):
        return activation_maximization(
            L.model, L.layer, selected, steps=int(am["steps"]), size=int(am["size"]),
            lr=float(am["lr"]), seed=int(am["seed"]), device=L.device,
            input_size=_am_input_size(L), preset=str(am["preset"]), **L.norm,
        )


@torch.no_grad()
def _map_maxima(L: _Layer, images: torch.Tensor, selected: list[int]) -> torch.Tensor:
    """Each selected unit's maximum over its map on its own image (as top_images' maxima)."""
    x = normalize(resize(images.to(L.device), _am_input_size(L)), L.spec["mean"],
                  L.spec["std"])
    with LayerRecorder(L.model, [L.layer], model_name=L.name, stop_after_last=True,
                       layouts=L.spec.get("layouts")) as rec:
        a = rec.run(x)[L.layer]
    return a[torch.arange(len(selected)), torch.tensor(selected)].amax(dim=(1, 2)).cpu()


def activation_max_view(L: _Layer, selected: list[int], cards: dict[int, dict], am: dict,
                        clock: _Clock) -> dict[str, list]:
    """viz/unit<U>_am.png (all selected units in one batch) and the activation_max rows."""
    am_images, am_acts = _activation_max_images(L, selected, am, clock)
    am_max = _map_maxima(L, am_images, selected)
    rows = _columns("model", "layer", "unit", "achieved_activation", "dataset_top_activation",
                    "activation_ratio")
    for i, u in enumerate(selected):
        im.save_png(am_images[i], L.out / unit_file(u, "am"))
        achieved = float(am_max[i])  # like top_images' max_activation: max over the map
        top = cards[u]["dataset_top_activation"]
        ratio = achieved / top if top > 0 else float("nan")
        cards[u].update(am_file=unit_file(u, "am"), am_activation=float(am_acts[i]),
                        am_max_activation=achieved, am_ratio=ratio)
        _append(rows, model=L.name, layer=L.layer, unit=u, achieved_activation=achieved,
                dataset_top_activation=top, activation_ratio=ratio)
    return rows


def _deconv_tiles(L: _Layer, x: torch.Tensor, proj: torch.Tensor, ys, xs, rf_cache: dict):
    hw = tuple(x.shape[-2:])
    patches, projections, boxes = [], [], []
    for j in range(len(x)):
        key = (int(ys[j]), int(xs[j]))
        if key not in rf_cache:
            rf_cache[key] = receptive_field(L.model, L.layer, hw, *key, model_name=L.name,
                                            layouts=L.spec.get("layouts"), device=L.device)
        t0, l0, b0, r0 = rf_cache[key]
        boxes.append([t0, l0, b0, r0])
        patches.append(im.to_uint8(x[j, :, t0:b0, l0:r0]))
        p = proj[j, :, t0:b0, l0:r0].detach().cpu().numpy().transpose(1, 2, 0)
        projections.append(im.signed_to_image(p))
    th = max(p.shape[0] for p in patches)
    tw = max(p.shape[1] for p in patches)
    tiles = [im.pad_to(p, th, tw) for p in patches] + [im.pad_to(p, th, tw) for p in projections]
    return im.strip(tiles, rows=2), boxes


def deconvnet_view(L: _Layer, selected: list[int], cards: dict[int, dict],
                   enabled: bool) -> str | None:
    """viz/unit<U>_deconv.png: receptive-field patches over DeconvNet projections. Returns why
    there are none (switched off, or the model refused), else None."""
    if not enabled:
        return "DeconvNet projections are switched off (reports.deconvnet: false)"
    rf_cache: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    for u in selected:
        idx = cards[u]["top_image_index"]
        if not idx:
            continue
        x = L.images(idx)
        try:
            proj = deconvnet(L.model, L.layer, u, x, **L.norm)
        except CnnvisError as e:
            log.warning("%s", e)
            return str(e)
        _v, ys, xs = strongest_locations(L.model, L.layer, u, x, **L.norm)
        strip, boxes = _deconv_tiles(L, x, proj, ys, xs, rf_cache)
        im.save_png(strip, L.out / unit_file(u, "deconv"))
        cards[u].update(deconv_file=unit_file(u, "deconv"), receptive_fields=boxes)
    return None


def _nonzero_images(L: _Layer, cand: np.ndarray, n: int) -> list[int]:
    """The first n candidates whose representation at the layer is not all zeros."""
    chosen: list[int] = []
    for start in range(0, len(cand), 64):
        part = cand[start : start + 64]
        phi = inversion.layer_representation(L.model, L.layer, L.images(part), **L.norm)
        nonzero = phi.flatten(1).abs().amax(dim=1) > 0
        chosen += [int(i) for i, ok in zip(part, nonzero.tolist(), strict=True) if ok]
        if len(chosen) >= n:
            break
    return chosen[:n]


def _inversion_weights(L: _Layer, rs: dict, x0: torch.Tensor) -> dict:
    """The weights of the inversion of this layer: the config's, else the paper's TV weight for
    the layer's relative depth (what the manifest records)."""
    lambda_tv, lambda_alpha = inversion_weights(rs, L.layer)
    depth = inversion.relative_depth(L.model, L.layer, x0, mean=L.spec["mean"], std=L.spec["std"],
                                     model_name=L.name)
    if lambda_tv is None:
        lambda_tv = inversion.paper_lambda_tv(depth)
    return {"relative_depth": depth, "lambda_tv": lambda_tv, "lambda_alpha": lambda_alpha}


def inversion_view(L: _Layer, rs: dict) -> tuple[list[dict], dict[str, list], str | None, dict]:
    """viz/inversion_<k>_{original,reconstruction}.png and the inversion rows; returns the
    manifest entries, the rows, why there are none (or None) and the weights used."""
    inv = rs["inversion"]
    rows = _columns("model", "layer", "image_index", "image", "error", "normalized_error")
    n_inv = int(inv["images"])
    if n_inv <= 0:
        return [], rows, None, {}
    cand = inversion_candidates(L.ds)
    spread_idx = cand[: max(2, int(inv["spread_images"]))]
    chosen = _nonzero_images(L, cand, n_inv)
    if not chosen:
        return [], rows, f"{L.name}: layer {L.layer!r} is all zeros for every image", {}
    x0 = L.images(chosen)
    weights = _inversion_weights(L, rs, x0)
    recon, errors = inversion.invert(L.model, L.layer, x0, steps=int(inv["steps"]),
                                     lr=float(inv["lr"]), lambda_tv=weights["lambda_tv"],
                                     lambda_alpha=weights["lambda_alpha"], seed=int(inv["seed"]),
                                     **L.norm)
    phi0 = inversion.layer_representation(L.model, L.layer, x0, **L.norm).flatten(1).double()
    norm2 = phi0.pow(2).sum(dim=1).cpu().numpy()
    spread = (inversion.representation_spread(L.model, L.layer, L.images(spread_idx), **L.norm)
              if len(spread_idx) >= 2 else float("nan"))
    names = L.ds.meta["images"]
    entries = []
    for k, i in enumerate(chosen):
        err = float(errors[k])
        nerr = err * float(norm2[k]) / spread if spread > 0 else float("nan")
        orig, rec_f = f"inversion_{k}_original.png", f"inversion_{k}_reconstruction.png"
        im.save_png(x0[k], L.out / orig)
        im.save_png(recon[k], L.out / rec_f)
        entries.append({"image_index": i, "image": names[i], "error": err,
                        "normalized_error": nerr, "original_file": orig,
                        "reconstruction_file": rec_f})
        _append(rows, model=L.name, layer=L.layer, image_index=i, image=names[i], error=err,
                normalized_error=nerr)
    return entries, rows, None, weights


# -- the stage -----------------------------------------------------------------------------------

def _manifest(L: _Layer, rs: dict, cards: list[dict], deconv_error, inversions: list[dict],
              inversion_error, inversion_info: dict, max_check: float, clock: _Clock) -> dict:
    t, n = clock.timings, max(1, len(cards))
    return {
        "version": MANIFEST_VERSION,
        "model": L.name,
        "layer": L.layer,
        "device": str(L.device),
        "threads": torch.get_num_threads(),
        "settings": rs,
        "units": cards,
        "deconv_error": deconv_error,
        "inversion": inversions,
        "inversion_error": inversion_error,
        # The report's labels and the formula of normalized_error (viz.inversion).
        "inversion_settings": inversion_info,
        "inversion_labels": {"original": "original", "reconstruction": "reconstruction"},
        "normalized_error_formula": inversion.NORMALIZED_ERROR_FORMULA,
        "top_images_max_abs_diff": max_check,
        "timings": t,
        "cpu_times": clock.cpu_times,
        "per_unit_s": {
            "activation_max": t["activation_max_s"] / n,
            "deconvnet": t["deconvnet_s"] / n if deconv_error is None else None,
            "inversion_per_image": t["inversion_s"] / max(1, len(inversions)),
        },
    }


def _provenance(L: _Layer, rs: dict, job: Job, info: dict) -> dict:
    return provenance(
        config_digest=spec_digest({
            "spec": {k: v for k, v in L.spec.items() if k != "checkpoint"},
            "quantile": job.dissection.quantile, "top_k": job.dissection.top_k,
            "reports": {k: v for k, v in rs.items() if k != "threads"},
        }),
        dataset_digest=L.ds.digest, checkpoint_sha256=info.get("checkpoint_sha256"),
        extra={"model": L.name, "layer": L.layer},
    )


def run_visualize(job: Job, prepared: str | Path, layer: str, layer_dir: str | Path, *,
                  model=None, threads: int | None = None) -> dict:
    """Write viz/, activation_max.parquet and inversion.parquet for one layer; returns the
    manifest (also written as viz/manifest.json)."""
    rs = legacy_settings(job)
    if threads:
        torch.set_num_threads(int(threads))
    spec = job.model
    name = job.name
    if layer not in spec["layers"]:
        raise CnnvisError(f"{name}: layer {layer!r} is not among {spec['layers']}")
    layer_dir = Path(layer_dir)
    ds = PreparedDataset(prepared)
    units_df = _read(layer_dir / "units.parquet", "units").sort_values("unit")
    top_df = _read(layer_dir / "top_images.parquet", "top_images")
    thresholds = _read(layer_dir / "thresholds.parquet", "thresholds").sort_values("unit")
    thr = thresholds["threshold"].to_numpy(np.float64)
    requested = requested_units(spec, layer)
    selected = select_units(units_df, int(rs["top_units"]), requested, where=f"{name} {layer}")
    info = {"checkpoint_sha256": None}
    if model is None:
        model, info = build_model(name, spec)
    device = pick_device(job.resources.device)
    model = model.eval().to(device)
    clock = _Clock(device)
    log.info("%s %s: visualising %d units on %s", name, layer, len(selected), device)
    with atomic_dir(layer_dir / "viz") as tmp:
        L = _Layer(spec, layer, ds, model, device, tmp)
        with clock.time("top_images_s"):
            cards, max_check = top_images_view(L, selected, units_df, top_df, thr,
                                               set(requested), int(rs["top_images"]),
                                               job.resources.batch_size)
        am_rows = activation_max_view(L, selected, cards, rs["activation_max"], clock)
        with clock.time("deconvnet_s"):
            deconv_error = deconvnet_view(L, selected, cards, bool(rs["deconvnet"]))
        with clock.time("inversion_s"):
            inversions, inv_rows, inversion_error, inversion_info = inversion_view(L, rs)
        manifest = _manifest(L, rs, [cards[u] for u in selected], deconv_error, inversions,
                             inversion_error, inversion_info, max_check, clock)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        prov = _provenance(L, rs, job, info)
        write_table("activation_max", am_rows, layer_dir / "activation_max.parquet", prov)
        write_table("inversion", inv_rows, layer_dir / "inversion.parquet", prov)
    t = clock.timings
    log.info("%s %s: top images %.1fs, AM %.1fs, deconv %.1fs, inversion %.1fs", name, layer,
             t["top_images_s"], t["activation_max_s"], t["deconvnet_s"], t["inversion_s"])
    return manifest
