"""The first run at scale: validation and preparation of broden-big against the forward pass.

    python -m cnnvis_pipeline.bench.prepare --images 63305            # broden1_224's image count
    python -m cnnvis_pipeline.bench.prepare --images 2000 --forward-images 400

Generates the Broden-format directory once (cached, as the main benchmark does), then times what
a first run of the workflow pays before any model: `validate_broden` (the validate_dataset rule,
`--workers` threads) and `prepare_dataset` (the prepare_dataset rule) with `--workers` processes
and with 1, checking that both give the same bytes. The forward pass of ResNet-18 (seeded random
weights, up to layer4, the benchmark's input pipeline) is timed on the first `--forward-images`
prepared images (default: all) and its rate applied to the whole dataset when fewer are run; the
JSON of the last line says which. Prints figures; asserts nothing.

first_run(...) times validation and both preparations of a Broden directory (also for the main
benchmark's --first-run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tree_digest(directory: Path) -> str:
    """sha256 over the files of a directory (names and bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(directory).iterdir()):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(16 << 20):
                h.update(block)
    return h.hexdigest()


def first_run(broden: str | Path, scratch: Path, log=print, *, workers: int | None = None,
              keep: Path | None = None) -> dict:
    """What a first run pays before any model (the download aside), timed on the benchmark's
    Broden directory (into a scratch directory, removed afterwards): the validate_dataset rule's
    validate_broden and the prepare_dataset rule's prepare_dataset with `workers` processes (the
    rule's threads: the cores of a local run), and prepare_dataset with 1 process; the two
    prepared directories must be the same bytes (`prepare_identical`). `keep`: where the
    `workers` preparation stays (replaced if there), instead of being removed."""
    import shutil

    from cnnvis_pipeline.data.prepared import prepare_dataset
    from cnnvis_pipeline.data.validate import validate_broden

    workers = workers or os.cpu_count() or 1
    scratch = Path(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    times, digests = {}, {}
    try:
        t = time.perf_counter()
        problems = validate_broden(broden, progress=False, workers=workers)
        validate = time.perf_counter() - t
        if problems:
            raise RuntimeError(f"{broden}: {len(problems)} problems, first: {problems[0]}")
        for w in dict.fromkeys((workers, 1)):
            out = Path(keep) if keep is not None and w == workers else scratch / f"prepared-{w}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            prepare_dataset(broden, out, progress=False, workers=w)
            times[w] = time.perf_counter() - t
            digests[w] = _tree_digest(out)
            if out.parent == scratch:
                shutil.rmtree(out)  # one at a time on the disk
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"first run: validate {validate:.2f} s ({workers} threads), prepare {times[workers]:.2f} s "
        f"({workers} processes, as the workflow's rule), {times[1]:.2f} s (1 process); "
        f"same bytes: {digests[workers] == digests[1]}")
    return {"validate_s": round(validate, 3), "prepare_s": round(times[workers], 3),
            "prepare_workers": workers, "prepare_serial_s": round(times[1], 3),
            "prepare_identical": digests[workers] == digests[1]}


def main(argv=None) -> int:
    from cnnvis_pipeline.bench.common import DEFAULT_CACHE, dataset_dirs

    p = argparse.ArgumentParser(prog="python -m cnnvis_pipeline.bench.prepare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=63305)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help=f"dataset cache (default {DEFAULT_CACHE})")
    p.add_argument("--workers", type=int, default=None, help="default: CPUs")
    p.add_argument("--forward-images", type=int, default=None,
                   help="images of the timed forward pass (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import numpy as np

    from cnnvis_pipeline.bench.bigsynth import generate_broden_big

    workers = args.workers or os.cpu_count() or 1
    cache = Path(args.cache or DEFAULT_CACHE)
    broden, prepared = dataset_dirs(cache, args.images, args.size, args.seed)
    out = {"images": args.images, "size": args.size, "workers": workers, "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "gen_s": 0.0}
    if not (broden / "index.csv").is_file():
        broden.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        generate_broden_big(broden, args.images, args.size, seed=args.seed, workers=workers)
        out["gen_s"] = round(time.perf_counter() - t, 3)
        _log(f"generated {args.images} images in {out['gen_s']:.1f} s -> {broden}")
    files = sum(1 for _ in (broden / "images").rglob("*"))
    out["files"] = files

    first = first_run(broden, prepared.with_name(f"first-run-{os.getpid()}"), log=_log,
                      workers=workers, keep=prepared)
    out.update(first)
    out.update({f"prepare_{workers}_s": first["prepare_s"], "prepare_1_s": first["prepare_serial_s"],
                "prepare_ips": round(args.images / first["prepare_s"], 1),
                "validate_ips": round(args.images / first["validate_s"], 1)})
    out["prepared_bytes"] = sum(f.stat().st_size for f in prepared.iterdir())

    import torch
    import torchvision

    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.dissection.extract import forward_only
    from cnnvis_pipeline.models import IMAGENET_MEAN, IMAGENET_STD
    from cnnvis_pipeline.models.input import pick_device

    ds = PreparedDataset(prepared)
    k = min(len(ds), args.forward_images or len(ds))
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None).eval()
    common = {"input_size": None, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "device": device,
              "batch_size": args.batch_size, "precision": "fp32", "model_name": "resnet18"}
    forward_only(model, ["layer4"], ds, np.arange(min(k, 2 * args.batch_size)), **common)  # warm
    t = time.perf_counter()
    forward_only(model, ["layer4"], ds, np.arange(k), **common)
    fs = time.perf_counter() - t
    out.update({"forward_images": k, "forward_timed_s": round(fs, 3),
                "forward_ips": round(k / fs, 1), "device": str(device),
                "forward_s": round(fs * len(ds) / k, 3),
                "forward_extrapolated": k < len(ds)})
    out["prepare_over_forward"] = round(out["prepare_s"] / out["forward_s"], 3)
    out["first_run_over_forward"] = round((out["prepare_s"] + out["validate_s"]) / out["forward_s"],
                                          3)
    _log(f"forward (ResNet-18 to layer4, {device}): {k / fs:.1f} images/s on {k} images"
         + (f" -> {out['forward_s']:.0f} s for {len(ds)} (extrapolated)" if k < len(ds) else ""))
    _log(f"prepare / forward: {out['prepare_over_forward']:.3f}; validate + prepare / forward: "
         f"{out['first_run_over_forward']:.3f}; same bytes: {out['prepare_identical']}")
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
