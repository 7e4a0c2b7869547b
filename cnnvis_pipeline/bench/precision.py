"""Storage precision check: IoU under a positive scale and an offset of a layer, against float64.

For one layer of a model, the layer's output is replaced by `a * scale + offset` (a forward hook)
and dissected as the pipeline does (float16 in per-unit coordinates, `calibrate=True`) and as
plain float16 (`calibrate=False`, the storage before issue 10). A float64 reference (the layer's
float32 output in float64, exact quantiles, float64 bilinear upsampling) gives the IoUs that
every scale and offset must reproduce. Also the CPU time of the extraction pass both ways.

    python -m cnnvis_pipeline.bench.precision [--images 200] [--size 64] [--width 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CASES = [("scale 1e-7", 1e-7, 0.0), ("scale 1", 1.0, 0.0), ("scale 1e5", 1e5, 0.0),
         ("offset -50", 1.0, -50.0)]


def layer_outputs(model, layer, ds, spec, batch_size=64) -> np.ndarray:
    """float32 outputs of `layer` over the dataset (the extraction's input pipeline)."""
    from cnnvis_pipeline.models.hooks import LayerRecorder
    from cnnvis_pipeline.models.input import images_to_input

    outs = []
    with LayerRecorder(model, [layer], stop_after_last=True) as rec, torch.no_grad():
        for s in range(0, len(ds), batch_size):
            idx = np.arange(s, min(len(ds), s + batch_size))
            x = images_to_input(np.ascontiguousarray(ds.images[idx]), spec.get("input_size"),
                                spec["mean"], spec["std"], torch.device("cpu"))
            outs.append(rec.run(x)[layer].numpy())
    return np.concatenate(outs)


def reference_iou(acts: np.ndarray, ds, quantile: float):
    """float64 thresholds [U] and IoU [U, C] from the prepared arrays (masks upsampled in float64,
    > T_k; IoU over the images annotated for each concept's category)."""
    n, u = acts.shape[:2]
    vals = acts.astype(np.float64).transpose(1, 0, 2, 3).reshape(u, -1)
    t = np.quantile(vals, 1 - quantile, axis=1)
    sh, sw = ds.seg_size
    c = len(ds.concepts)
    inter = np.zeros((u, c), np.int64)
    union = np.zeros((u, c), np.int64)
    cat_of = np.asarray(ds.concept_category)
    labels = np.asarray(ds.concept_label)
    plane_cat = np.asarray(ds.plane_category)
    kinds = list(ds.category_kind)
    for i in range(n):
        up = F.interpolate(torch.from_numpy(acts[i:i + 1].astype(np.float64)), size=(sh, sw),
                           mode="bilinear", align_corners=False)[0].numpy()
        masks = up > t[:, None, None]
        planes = np.asarray(ds.planes[i]).astype(np.int64)
        present = np.asarray(ds.present[i])
        slots = set(int(v) for v in np.asarray(ds.slots[i]) if v >= 0)
        for k in range(c):
            cat = int(cat_of[k])
            if not present[cat]:
                continue
            if kinds[cat] == "image":
                lab = np.full((sh, sw), k in slots)
            else:
                ps = np.flatnonzero(plane_cat == cat)
                lab = (planes[ps] == labels[k]).any(axis=0) if len(ps) else np.zeros((sh, sw), bool)
            inter[:, k] += (masks & lab).sum(axis=(1, 2))
            union[:, k] += (masks | lab).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return t, iou


def transformed(model, layer, scale, offset):
    from cnnvis_pipeline.models.hooks import find_module

    return find_module(model, layer).register_forward_hook(
        lambda _m, _i, out: out * scale + offset)


def dissect_iou(model, layer, ds, spec, *, calibrate: bool, quantile: float):
    from cnnvis_pipeline.dissection import extract, tally

    idx = np.arange(len(ds))
    cpu = torch.device("cpu")
    c0 = time.process_time()
    stores, hists, _ = extract.extract_shard(
        model, [layer], ds, idx, input_size=spec.get("input_size"), mean=spec["mean"],
        std=spec["std"], device=cpu, batch_size=64, progress=False, quantile=quantile,
        calibrate=calibrate)
    c1 = time.process_time()
    t = extract.unit_thresholds(hists[layer], quantile)
    counts = tally.tally_shard(ds, idx, stores[layer], t, device=cpu, progress=False)
    iou, _, _ = counts.iou(ds.concept_category)
    return t, iou, c1 - c0


def compare(model, layer, ds, spec, quantile=0.005, calibrate=True):
    """Rows per case: max |dIoU| (all unit x concept pairs), top concepts equal, max relative
    threshold error, against the float64 reference of the unscaled layer."""
    ref_t, ref_iou = reference_iou(layer_outputs(model, layer, ds, spec), ds, quantile)
    rows = []
    for name, scale, offset in CASES:
        h = transformed(model, layer, scale, offset)
        try:
            t, iou, cpu_s = dissect_iou(model, layer, ds, spec, calibrate=calibrate,
                                        quantile=quantile)
        except Exception as e:  # plain float16 overflows at 1e5
            rows.append({"case": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        finally:
            h.remove()
        t_back = (t - offset) / scale
        spread = np.maximum(np.abs(ref_t), 1e-12)
        rows.append({
            "case": name, "max_abs_diou": float(np.abs(iou - ref_iou).max()),
            "top_iou_max_abs_diff": float(np.abs(iou.max(1) - ref_iou.max(1)).max()),
            "top_concepts_equal": bool((iou.argmax(1) == ref_iou.argmax(1)).all()),
            "detectors": int((iou.max(1) > 0.04).sum()),
            "reference_detectors": int((ref_iou.max(1) > 0.04).sum()),
            "max_rel_threshold_err": float(np.abs(t_back - ref_t).max() / spread.max()),
            "extract_cpu_s": round(cpu_s, 3),
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnnvis_pipeline.bench.precision")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--layer", default="features.relu3")
    p.add_argument("--checkpoint", default=None, help="synthnet state dict (default: random)")
    p.add_argument("--timing-images", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    from cnnvis_pipeline.data.prepared import PreparedDataset, prepare_dataset
    from cnnvis_pipeline.data.synth import generate_broden_synth
    from cnnvis_pipeline.models.registry import build_model

    spec = {"name": "synthnet", "arch": "synthnet", "kwargs": {"width": args.width}, "seed": 0,
            "checkpoint": args.checkpoint, "mean": [0.5] * 3, "std": [0.25] * 3, "layers": []}
    model, _ = build_model("synthnet", spec)
    out = {"layer": args.layer, "images": args.images, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        ds_dir = generate_broden_synth(Path(tmp) / "ds", n_images=args.images,
                                       image_size=args.size, seed=0)
        ds = PreparedDataset(prepare_dataset(ds_dir, Path(tmp) / "prep", progress=False))
        out["scaled"] = compare(model, args.layer, ds, spec, calibrate=True)
        out["plain_float16"] = compare(model, args.layer, ds, spec, calibrate=False)
        if args.timing_images:
            ds_dir = generate_broden_synth(Path(tmp) / "ds2", n_images=args.timing_images,
                                           image_size=args.size, seed=1)
            ds = PreparedDataset(prepare_dataset(ds_dir, Path(tmp) / "prep2", progress=False))
            times = {True: [], False: []}
            for _ in range(args.repeat):
                for cal in (False, True):
                    times[cal].append(dissect_iou(model, args.layer, ds, spec, calibrate=cal,
                                                  quantile=0.005)[2])
            out["timing"] = {"images": args.timing_images,
                             "extract_cpu_s_plain_float16": round(min(times[False]), 3),
                             "extract_cpu_s_scaled": round(min(times[True]), 3),
                             "runs_plain": [round(v, 3) for v in times[False]],
                             "runs_scaled": [round(v, 3) for v in times[True]]}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
