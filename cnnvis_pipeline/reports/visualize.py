"""Visualise the selected units of one layer (the `visualize_layer` rule).

run_visualize(spec, prepared, layer, layer_dir, reports) reads the layer's dissection tables in
`layer_dir` (units, top_images, thresholds), selects the units (selection.select_units) and
writes, next to them:

- viz/unit<U>_top.png       the unit's top-activating dataset images (top_images.parquet, highest
                            maximum activation first), everything outside its thresholded mask
                            darkened and the mask outlined. The maps come from one new forward
                            pass over those images: float16 like the dissection, bilinear
                            (align_corners=False) to the image size, > the unit's threshold.
- viz/unit<U>_am.png        activation maximisation (viz.activation_maximization, all units in
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
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from cnnvis_pipeline.config import spec_digest
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection import engine
from cnnvis_pipeline.dissection.pipeline import settings as dissection_settings
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.reports import images as im
from cnnvis_pipeline.reports.selection import requested_units, select_units
from cnnvis_pipeline.reports.settings import inversion_weights, report_settings
from cnnvis_pipeline.tables import provenance, write_table
from cnnvis_pipeline.viz import (
    NORMALIZED_ERROR_FORMULA,
    activation_maximization,
    deconvnet,
    invert,
    layer_representation,
    paper_lambda_tv,
    receptive_field,
    relative_depth,
    representation_spread,
    strongest_locations,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def unit_file(unit: int, view: str) -> str:
    return f"unit{unit:04d}_{view}.png"


class _Clock:
    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.t = self.cpu = 0.0

    def __enter__(self):
        self.sync()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.t = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def _float_images(ds: PreparedDataset, idx, input_size, device) -> torch.Tensor:
    """[N, 3, h, w] in [0, 1] as the model sees them before normalisation (resized to
    input_size, bilinear, like engine.images_to_input)."""
    x = torch.from_numpy(np.ascontiguousarray(ds.images[np.asarray(idx, np.int64)]))
    x = x.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if input_size is not None and tuple(x.shape[-2:]) != tuple(input_size):
        x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def layer_activations(model, layer: str, ds: PreparedDataset, idx, spec: dict,
                      device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """float16 [N, U, h, w] activations of `layer` for dataset images `idx` (the dissection's
    input pipeline: engine.images_to_input)."""
    idx = np.asarray(idx, np.int64)
    outs = []
    with LayerRecorder(model, [layer], model_name=spec["name"], stop_after_last=True) as rec:
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            x = engine.images_to_input(np.ascontiguousarray(ds.images[part]),
                                       spec.get("input_size"), spec["mean"], spec["std"], device)
            outs.append(rec.run(x)[layer].to(torch.float16))
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


def _atomic_dir(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def run_visualize(spec: dict, prepared: str | Path, layer: str, layer_dir: str | Path,
                  reports: dict | None = None, *, model=None, threads: int | None = None) -> dict:
    """Write viz/, activation_max.parquet and inversion.parquet for one layer; returns the
    manifest (also written as viz/manifest.json)."""
    rs = report_settings(reports)
    if threads:
        torch.set_num_threads(int(threads))
    ds_settings = dissection_settings(spec)
    name = spec["name"]
    if layer not in spec["layers"]:
        raise CnnvisError(f"{name}: layer {layer!r} is not among {spec['layers']}")
    layer_dir = Path(layer_dir)
    ds = PreparedDataset(prepared)
    units_df = _read(layer_dir / "units.parquet", "units").sort_values("unit")
    top_df = _read(layer_dir / "top_images.parquet", "top_images")
    thresholds = _read(layer_dir / "thresholds.parquet", "thresholds").sort_values("unit")
    thr = thresholds["threshold"].to_numpy(np.float64)
    selected = select_units(units_df, int(rs["top_units"]), requested_units(spec, layer),
                            where=f"{name} {layer}")
    requested = set(requested_units(spec, layer))
    info = {"checkpoint_sha256": None}
    if model is None:
        model, info = build_model(name, spec)
    device = engine.pick_device(ds_settings["device"])
    model = model.eval().to(device)
    mean, std, input_size = spec["mean"], spec["std"], spec.get("input_size")
    k_show = int(rs["top_images"])
    timings: dict[str, float] = {}  # wall-clock seconds per view
    cpu_times: dict[str, float] = {}  # CPU seconds of this process (all threads) per view
    out_dir = layer_dir / "viz"
    tmp = _atomic_dir(out_dir)
    log.info("%s %s: visualising %d units on %s", name, layer, len(selected), device)
    try:
        # --- top images with their masks: one forward pass over the few images needed ---
        tops = {u: top_df[top_df["unit"] == u].sort_values("rank").head(k_show) for u in selected}
        needed = np.unique(np.concatenate([t["image_index"].to_numpy(np.int64) for t in tops.values()]
                                          + [np.zeros(0, np.int64)]))
        pos = {int(i): k for k, i in enumerate(needed)}
        units_by_id = units_df.set_index("unit")
        cards: dict[int, dict] = {}
        max_check = 0.0
        with _Clock(device) as c:
            acts = (layer_activations(model, layer, ds, needed, spec, device,
                                      int(ds_settings["batch_size"]))
                    if len(needed) else None)
            ih, iw = ds.images.shape[1:3]
            for u in selected:
                t = tops[u]
                rows = [pos[int(i)] for i in t["image_index"]]
                card = {
                    "unit": int(u),
                    "requested": int(u) in requested,
                    "concept": str(units_by_id.loc[u, "concept"]),
                    "category": str(units_by_id.loc[u, "category"]),
                    "iou": float(units_by_id.loc[u, "iou"]),
                    "detector": bool(units_by_id.loc[u, "detector"]),
                    "threshold": float(thr[u]),
                    "top_images": t["image"].tolist(),
                    "top_image_index": [int(i) for i in t["image_index"]],
                    "top_max_activation": [float(v) for v in t["max_activation"]],
                    "dataset_top_activation": float(top_df.loc[top_df["unit"] == u,
                                                               "max_activation"].max()),
                }
                if rows:
                    a = acts[rows, u : u + 1].float()
                    recomputed = a.amax(dim=(1, 2, 3)).cpu().numpy().astype(np.float64)
                    max_check = max(max_check, float(np.abs(recomputed - t["max_activation"]
                                                            .to_numpy()).max()))
                    up = F.interpolate(a, size=(ih, iw), mode="bilinear", align_corners=False)
                    masks = (up[:, 0] > float(thr[u])).cpu().numpy()
                    tiles = [im.mask_overlay(np.asarray(ds.images[i]), m)
                             for i, m in zip(t["image_index"], masks, strict=True)]
                    card["mask_fraction"] = [float(m.mean()) for m in masks]
                    im.save_png(im.strip(tiles), tmp / unit_file(u, "top"))
                    card["top_file"] = unit_file(u, "top")
                cards[u] = card
            del acts
        timings["top_images_s"] = c.t
        cpu_times["top_images_s"] = c.cpu

        # --- activation maximisation, all selected units in one batch ---
        am = rs["activation_max"]
        # The first torch.optim.Adam of a process imports torch._dynamo (seconds): not the
        # visualisation's cost, so it happens before the clock starts.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
        # AM images are judged as the dataset is: at the dataset's input size.
        am_input = tuple(input_size) if input_size is not None else (int(ih), int(iw))
        with _Clock(device) as c:
            am_images, am_acts = activation_maximization(
                model, layer, selected, steps=int(am["steps"]), size=int(am["size"]),
                lr=float(am["lr"]), seed=int(am["seed"]), device=device, input_size=am_input,
                mean=mean, std=std, preset=str(am["preset"]), model_name=name,
            )
        timings["activation_max_s"] = c.t
        cpu_times["activation_max_s"] = c.cpu
        with torch.no_grad():
            x = am_images.to(device)
            if tuple(x.shape[-2:]) != am_input:
                x = F.interpolate(x, size=am_input, mode="bilinear", align_corners=False)
            x = (x - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(
                std, device=device).view(1, 3, 1, 1)
            with LayerRecorder(model, [layer], model_name=name, stop_after_last=True) as rec:
                a = rec.run(x)[layer]
            am_max = a[torch.arange(len(selected)), torch.tensor(selected)].amax(dim=(1, 2)).cpu()
        am_rows = {"model": [], "layer": [], "unit": [], "achieved_activation": [],
                   "dataset_top_activation": [], "activation_ratio": []}
        for i, u in enumerate(selected):
            im.save_png(am_images[i], tmp / unit_file(u, "am"))
            achieved = float(am_max[i])  # like top_images' max_activation: max over the map
            top = cards[u]["dataset_top_activation"]
            ratio = achieved / top if top > 0 else float("nan")
            cards[u].update(am_file=unit_file(u, "am"), am_activation=float(am_acts[i]),
                            am_max_activation=achieved, am_ratio=ratio)
            for key, v in (("model", name), ("layer", layer), ("unit", u),
                           ("achieved_activation", achieved), ("dataset_top_activation", top),
                           ("activation_ratio", ratio)):
                am_rows[key].append(v)

        # --- DeconvNet projections next to the receptive-field patches ---
        deconv_error = None
        rf_cache: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        with _Clock(device) as c:
            if not rs["deconvnet"]:
                deconv_error = "DeconvNet projections are switched off (reports.deconvnet: false)"
            for u in selected:
                idx = cards[u]["top_image_index"]
                if deconv_error is not None or not idx:
                    continue
                x = _float_images(ds, idx, input_size, device)
                try:
                    proj = deconvnet(model, layer, u, x, mean=mean, std=std, model_name=name)
                except CnnvisError as e:
                    deconv_error = str(e)
                    log.warning("%s", e)
                    continue
                _v, ys, xs = strongest_locations(model, layer, u, x, mean=mean, std=std,
                                                 model_name=name)
                hw = tuple(x.shape[-2:])
                patches, projections, boxes = [], [], []
                for j in range(len(idx)):
                    key = (int(ys[j]), int(xs[j]))
                    if key not in rf_cache:
                        rf_cache[key] = receptive_field(model, layer, hw, *key, model_name=name,
                                                        device=device)
                    t0, l0, b0, r0 = rf_cache[key]
                    boxes.append([t0, l0, b0, r0])
                    patches.append(im.to_uint8(x[j, :, t0:b0, l0:r0]))
                    p = proj[j, :, t0:b0, l0:r0].detach().cpu().numpy().transpose(1, 2, 0)
                    projections.append(im.signed_to_image(p))
                th = max(p.shape[0] for p in patches)
                tw = max(p.shape[1] for p in patches)
                tiles = ([im.pad_to(p, th, tw) for p in patches]
                         + [im.pad_to(p, th, tw) for p in projections])
                im.save_png(im.strip(tiles, rows=2), tmp / unit_file(u, "deconv"))
                cards[u].update(deconv_file=unit_file(u, "deconv"), receptive_fields=boxes)
        timings["deconvnet_s"] = c.t
        cpu_times["deconvnet_s"] = c.cpu

        # --- network inversion of fixed dataset images ---
        inv = rs["inversion"]
        inv_rows = {"model": [], "layer": [], "image_index": [], "image": [], "error": [],
                    "normalized_error": []}
        inversions = []
        inversion_error = None
        inversion_info = {}
        n_inv = int(inv["images"])
        with _Clock(device) as c:
            if n_inv > 0:
                cand = inversion_candidates(ds)
                spread_idx = cand[: max(2, int(inv["spread_images"]))]
                chosen: list[int] = []
                for start in range(0, len(cand), 64):
                    part = cand[start : start + 64]
                    phi = layer_representation(model, layer, _float_images(ds, part, input_size,
                                                                           device),
                                               mean=mean, std=std, model_name=name)
                    nonzero = phi.flatten(1).abs().amax(dim=1) > 0
                    chosen += [int(i) for i, ok in zip(part, nonzero.tolist(), strict=True) if ok]
                    if len(chosen) >= n_inv:
                        break
                chosen = chosen[:n_inv]
                if not chosen:
                    inversion_error = f"{name}: layer {layer!r} is all zeros for every image"
                else:
                    x0 = _float_images(ds, chosen, input_size, device)
                    lambda_tv, lambda_alpha = inversion_weights(rs, layer)
                    depth = relative_depth(model, layer, x0, mean=mean, std=std, model_name=name)
                    if lambda_tv is None:
                        lambda_tv = paper_lambda_tv(depth)
                    inversion_info = {"relative_depth": depth, "lambda_tv": lambda_tv,
                                      "lambda_alpha": lambda_alpha}
                    recon, errors = invert(model, layer, x0, steps=int(inv["steps"]),
                                           lr=float(inv["lr"]), lambda_tv=lambda_tv,
                                           lambda_alpha=lambda_alpha, seed=int(inv["seed"]),
                                           mean=mean, std=std, model_name=name)
                    phi0 = layer_representation(model, layer, x0, mean=mean, std=std,
                                                model_name=name).flatten(1).double()
                    norm2 = phi0.pow(2).sum(dim=1).cpu().numpy()
                    spread = (representation_spread(model, layer,
                                                    _float_images(ds, spread_idx, input_size,
                                                                  device),
                                                    mean=mean, std=std, model_name=name)
                              if len(spread_idx) >= 2 else float("nan"))
                    names = ds.meta["images"]
                    for k, i in enumerate(chosen):
                        err = float(errors[k])
                        nerr = err * float(norm2[k]) / spread if spread > 0 else float("nan")
                        orig, rec_f = f"inversion_{k}_original.png", f"inversion_{k}_reconstruction.png"
                        im.save_png(x0[k], tmp / orig)
                        im.save_png(recon[k], tmp / rec_f)
                        inversions.append({"image_index": i, "image": names[i], "error": err,
                                           "normalized_error": nerr, "original_file": orig,
                                           "reconstruction_file": rec_f})
                        for key, v in (("model", name), ("layer", layer), ("image_index", i),
                                       ("image", names[i]), ("error", err),
                                       ("normalized_error", nerr)):
                            inv_rows[key].append(v)
        timings["inversion_s"] = c.t
        cpu_times["inversion_s"] = c.cpu

        manifest = {
            "version": MANIFEST_VERSION,
            "model": name,
            "layer": layer,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "settings": rs,
            "units": [cards[u] for u in selected],
            "deconv_error": deconv_error,
            "inversion": inversions,
            "inversion_error": inversion_error,
            # The report's labels and the formula of normalized_error (viz.inversion).
            "inversion_settings": inversion_info,
            "inversion_labels": {"original": "original", "reconstruction": "reconstruction"},
            "normalized_error_formula": NORMALIZED_ERROR_FORMULA,
            "top_images_max_abs_diff": max_check,
            "timings": timings,
            "cpu_times": cpu_times,
            "per_unit_s": {
                "activation_max": timings["activation_max_s"] / max(1, len(selected)),
                "deconvnet": (timings["deconvnet_s"] / max(1, len(selected))
                              if deconv_error is None else None),
                "inversion_per_image": timings["inversion_s"] / max(1, len(inversions)),
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        prov = provenance(
            config_digest=spec_digest({
                "spec": {k: v for k, v in spec.items() if k not in ("dissection", "checkpoint")},
                "quantile": ds_settings["quantile"], "top_k": ds_settings["top_k"],
                "reports": {k: v for k, v in rs.items() if k != "threads"},
            }),
            dataset_digest=ds.digest, checkpoint_sha256=info.get("checkpoint_sha256"),
            extra={"model": name, "layer": layer},
        )
        write_table("activation_max", am_rows, layer_dir / "activation_max.parquet", prov)
        write_table("inversion", inv_rows, layer_dir / "inversion.parquet", prov)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s %s: top images %.1fs, AM %.1fs, deconv %.1fs, inversion %.1fs", name, layer,
             timings["top_images_s"], timings["activation_max_s"], timings["deconvnet_s"],
             timings["inversion_s"])
    return manifest
