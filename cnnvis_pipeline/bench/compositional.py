"""Benchmark of the compositional explanations (formulas.parquet's search) at broden1_224 shape.

    python -m cnnvis_pipeline.bench.compositional --images 2000 --device cpu --units 64
    python -m cnnvis_pipeline.bench.compositional --images 63305 --device cuda

Dataset: broden-big (the dissection benchmark's generator and cache: 224 px images, 112 x 112
segmentations, 1,376 concepts over six categories). Activations: torchvision ResNet-18 with
seeded random weights (as the dissection benchmark), one layer (default layer4, 512 units),
extracted once into the cache with the engine's extraction and thresholded at the exact
quantile. Timed, through the code the workflow runs (cnnvis_pipeline.dissection.compositional):
- concept masks: the bit-packed masks of every concept in every image where it is present,
- unit masks: the selected units' masks from the stored float16 activations (the tally's kernel),
- search: the beam search of every selected unit (default: max length 3, beam 5, as the
  reference's ResNet-18 run), with pruning; `--compare N` also runs the first N units without
  pruning (same formulas, checked) to give the pruning's gain.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cnnvis_pipeline.bench.common import DEFAULT_CACHE, ensure_dataset


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _activations(cache: Path, data: dict, layer: str, seed: int, device, batch_size: int,
                 quantile: float):
    """(ActivationStore, thresholds) of ResNet-18 (seeded random) on the dataset, cached."""
    import numpy as np
    import torch
    import torchvision

    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.dissection.extract import extract_shard, unit_thresholds
    from cnnvis_pipeline.dissection.stats import Float16Histogram
    from cnnvis_pipeline.dissection.stores import ActivationStore
    from cnnvis_pipeline.models import IMAGENET_MEAN, IMAGENET_STD

    ds = PreparedDataset(data["prepared"])
    out = Path(data["prepared"]).parent / f"acts-resnet18-seed{seed}-{layer}"
    acts, hist = out / f"acts_{layer}.npy", out / f"hist_{layer}.npz"
    if not hist.is_file():
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(weights=None).eval()
        t = time.perf_counter()
        _, hists, _ = extract_shard(
            model, [layer], ds, np.arange(len(ds)), input_size=None, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, device=device, batch_size=batch_size, out_dir=out,
            model_name="resnet18", progress=False)
        hists[layer].save(hist)
        _log(f"extracted {layer} of {len(ds)} images in {time.perf_counter() - t:.1f} s "
             "(not part of the compositional figures)")
    store = ActivationStore.open(acts)
    thresholds = unit_thresholds(Float16Histogram.load(hist), quantile)
    return ds, store, thresholds


def run(args) -> dict:
    import numpy as np
    import torch

    from cnnvis_pipeline.dissection import compositional as cp
    from cnnvis_pipeline.models.input import pick_device
    from cnnvis_pipeline.settings import Compositional

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cache = Path(args.cache or DEFAULT_CACHE)
    data = ensure_dataset(cache, args.images, 224, args.seed, args.workers)
    ds, store, thresholds = _activations(cache, data, args.layer, args.seed, device,
                                         args.batch_size, args.quantile)
    if args.search_threads:
        torch.set_num_threads(args.search_threads)
    n_units = store.shape[1]
    units = np.arange(min(args.units or n_units, n_units))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t = time.perf_counter()
    cm = cp.ConceptMasks(ds, device)
    sync()
    concepts_s = time.perf_counter() - t
    _log(f"concept masks: {concepts_s:.2f} s, {cm.rows.shape[0]} (image, concept) entries, "
         f"{cm.rows.numel() * 8 / 1e6:.0f} MB, {cm.groups} annotation groups")

    def batches():
        for i in range(0, store.shape[0], args.batch_size):
            yield i, store.read(i, min(store.shape[0], i + args.batch_size), device)

    t = time.perf_counter()
    masks = cp.unit_masks(batches(), thresholds, units, tuple(ds.seg_size), device)
    sync()
    units_s = time.perf_counter() - t
    active = np.array([len(m.images) for m in masks])
    _log(f"unit masks: {units_s:.2f} s for {len(units)} units (images per unit: mean "
         f"{active.mean():.0f}, max {active.max()})")

    settings = Compositional.parse({"max_length": args.max_length, "beam": args.beam})
    t = time.perf_counter()
    results, stats = cp.explain_units(cm, masks, settings, progress=args.progress)
    sync()
    search_s = time.perf_counter() - t
    lengths = np.bincount([b[0].length for b, _ in results], minlength=args.max_length + 1)
    gain = [b[0].iou - s.iou for b, s in results]
    _log(f"search: {search_s:.2f} s for {len(units)} units ({search_s / len(units):.3f} s/unit); "
         f"candidates {stats['candidates']}, evaluated exactly {stats['evaluated']} "
         f"({stats['evaluated'] / max(1, stats['candidates']):.2%}); formula overlaps "
         f"{stats['overlaps']} computed, {stats['overlap_hits']} cached")
    out = {
        "images": len(ds), "layer": args.layer, "units": len(units), "units_in_layer": n_units,
        "device": str(device), "max_length": args.max_length, "beam": args.beam,
        "concepts": cm.concepts, "entries": int(cm.rows.shape[0]),
        "concept_masks_mb": round(cm.rows.numel() * 8 / 1e6, 1),
        "concept_masks_s": round(concepts_s, 3), "unit_masks_s": round(units_s, 3),
        "search_s": round(search_s, 3), "search_s_per_unit": round(search_s / len(units), 4),
        "mean_unit_images": float(active.mean()), "candidates": stats["candidates"],
        "evaluated": stats["evaluated"], "overlaps": stats["overlaps"],
        "overlap_hits": stats["overlap_hits"], "lengths": lengths[1:].tolist(),
        "mean_iou_gain": float(np.mean(gain)),
        "layer_estimate_s": round(concepts_s + (units_s + search_s) * n_units / len(units), 1),
        "examples": [cp.formula_text(b[0].node, cm.text) for b, _ in results[:5]],
    }
    if args.compare:
        k = min(args.compare, len(units))
        t = time.perf_counter()
        plain, plain_stats = cp.explain_units(cm, masks[:k], settings, prune=False)
        out["unpruned_s_per_unit"] = round((time.perf_counter() - t) / k, 4)
        same = all([it.node for it in a[0]] == [it.node for it in b[0]]
                   for a, b in zip(plain, results[:k], strict=True))
        out["unpruned_same_beams"] = same
        out["unpruned_evaluated"] = plain_stats["evaluated"]
        _log(f"without pruning: {out['unpruned_s_per_unit']:.3f} s/unit on {k} units, same "
             f"beams: {same}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--layer", default="layer4")
    p.add_argument("--units", type=int, default=0, help="the first N units (0: all)")
    p.add_argument("--max-length", type=int, default=3)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--quantile", type=float, default=0.005)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--compare", type=int, default=0, help="also run N units without pruning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--search-threads", type=int, default=0,
                   help="torch threads after the extraction (0: as --threads)")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    print(json.dumps(run(parse_args(argv)), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
