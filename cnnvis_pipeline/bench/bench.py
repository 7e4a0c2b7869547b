"""Benchmark of the dissection at broden1_224 scale on a synthetic Broden-format dataset.

    python -m cnnvis_pipeline.bench --images 1000 --size 224 --device cpu [--layers layer3 layer4]
        [--batch-size B] [--cache DIR] [--precision fp32|bf16] [--no-forward]

1. Generates (once; cached under benchmarks/cache/ or --cache) a Broden-format dataset with
   cnnvis_pipeline.bench.bigsynth (about 1,200 labels, six categories, layered part planes,
   image-level scene and texture) and prepares it with data.prepared.prepare_dataset (in parallel)
   (prepare_dataset in parallel slices).
   Generation and preparation times are reported apart and excluded from the figures.
2. Builds torchvision ResNet-18 with seeded random weights.
3. Times, over the same images and batches: the reads alone (load), the input pipeline and
   forward pass up to the last layer with nothing kept (forward), and the whole dissection by
   pipeline.dissect (extraction, exact thresholds, IoU tally: the code the workflow runs).
4. Prints images/s, peak resident memory of the dissection (the process's high-water mark reset
   before it, where Linux allows), peak GPU memory, and, as its last line, one JSON object.

Imports only numpy, torch, torchvision, pandas, pyarrow, tqdm, pillow (and psutil if present).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cnnvis_pipeline.bench.common import (
    DEFAULT_CACHE,
    PeakRSS,
    current_rss_mb,
    device_name,
    ensure_dataset,
)
from cnnvis_pipeline.bench.common import log as _log
from cnnvis_pipeline.bench.measures import activation_bytes, detectors_per_layer, verify_on_cpu


@dataclass
class _Bench:
    """What the timed parts of one benchmark run share."""

    args: argparse.Namespace
    cache: Path
    data: dict
    device: object
    ds: object
    model: object
    layers: list[str]
    batch_size: int
    precision: str
    common: dict
    idx: object
    keep: bool = False
    scratch: Path | None = None
    act_bytes: int = 0
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = len(self.ds)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _setup(args) -> _Bench:
    """The dataset (generated and prepared unless cached), the device and the seeded model."""
    cache = Path(args.cache or DEFAULT_CACHE)
    data = ensure_dataset(cache, args.images, args.size, args.seed, args.workers)

    import numpy as np
    import torch
    import torchvision

    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models import IMAGENET_MEAN, IMAGENET_STD
    from cnnvis_pipeline.models.input import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    precision = args.precision or ("bf16" if cuda else "fp32")
    batch_size = args.batch_size or (512 if cuda else 64)
    ds = PreparedDataset(data["prepared"])
    torch.manual_seed(args.seed)
    model = torchvision.models.get_model(args.arch, weights=None).eval()
    common = {"input_size": None, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "device": device,
              "batch_size": batch_size, "precision": precision, "model_name": args.arch}
    b = _Bench(args, cache, data, device, ds, model, list(args.layers), batch_size, precision,
               common, np.arange(len(ds), dtype=np.int64))
    _log(f"device {device} ({device_name(device)}), {b.n} images, layers {b.layers}, "
         f"batch {batch_size}, precision {precision}")
    return b


def _time_loads(b: _Bench) -> tuple[float, float]:
    """Warm up (not timed: kernels, cuDNN autotuning at the full and the last batch size, the
    page cache), then time the reads of the images alone and of the planes alone."""
    from cnnvis_pipeline.dissection.extract import forward_only
    from cnnvis_pipeline.dissection.stores import load_only

    forward_only(b.model, b.layers, b.ds, b.idx[: min(b.n, 2 * b.batch_size)], **b.common)
    if b.n % b.batch_size and b.n > b.batch_size:
        forward_only(b.model, b.layers, b.ds, b.idx[: b.n % b.batch_size], **b.common)
    load_only(b.ds, b.idx, batch_size=b.batch_size, fields=("images", "planes"), device=b.device)
    b.sync()
    times = []
    for name in ("images", "planes"):
        t = time.perf_counter()
        load_only(b.ds, b.idx, batch_size=b.batch_size, fields=(name,), device=b.device)
        times.append(time.perf_counter() - t)
        _log(f"load ({name}):  {times[-1]:8.2f} s  {b.n / times[-1]:9.1f} images/s")
    return times[0], times[1]


def _time_forward(b: _Bench) -> tuple[float, float]:
    """Wall and process CPU seconds of the forward pass up to the last layer, nothing kept."""
    from cnnvis_pipeline.dissection.extract import forward_only

    b.sync()
    t, c = time.perf_counter(), time.process_time()
    forward_only(b.model, b.layers, b.ds, b.idx, progress=b.args.progress, **b.common)
    b.sync()
    return time.perf_counter() - t, time.process_time() - c


def _dissect_spec(b: _Bench, statistics: bool) -> dict:
    from cnnvis_pipeline.models import IMAGENET_MEAN, IMAGENET_STD

    return {"name": b.args.arch, "layers": b.layers, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "input_size": None,
            "resources": {"batch_size": b.batch_size, "device": str(b.device)},
            "dissection": {"precision": b.precision, "quantile": b.args.quantile,
                           "statistics": {"enabled": statistics}}}


def _time_dissect(b: _Bench, spec: dict) -> tuple[float, float, dict, PeakRSS]:
    """Wall and CPU seconds, result and peak memory of one pipeline.dissect."""
    import torch

    from cnnvis_pipeline.dissection import pipeline
    from cnnvis_pipeline.settings import Job

    if b.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(b.device)
    try:
        with PeakRSS() as rss:
            b.sync()
            t, c = time.perf_counter(), time.process_time()
            result = pipeline.dissect(Job.from_spec(spec), b.ds, keep_on_device=b.keep,
                                      scratch=b.scratch, progress=b.args.progress, model=b.model)
            b.sync()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        shutil.rmtree(b.scratch, ignore_errors=True)
    return wall, cpu, result, rss


def _rounds(b: _Bench) -> tuple[list, list, list, float]:
    """Forward and dissection alternate `--repeat` times (on a shared machine the fastest of
    each is the figure least disturbed by other work); returns the forward, dissection and
    no-statistics dissection timings and the forward pass's peak GPU memory."""
    import torch

    args = b.args
    spec = _dissect_spec(b, args.statistics != "off")
    forwards, dissects, plains = [], [], []
    peak_gpu_forward = 0.0
    for k in range(max(1, args.repeat)):
        note = f"  (round {k + 1})" if args.repeat > 1 else ""
        if not args.no_forward:
            if b.cuda:
                torch.cuda.reset_peak_memory_stats(b.device)
            forwards.append(_time_forward(b))
            if b.cuda:
                peak_gpu_forward = torch.cuda.max_memory_allocated(b.device) / 2**20
            _log(f"forward:        {forwards[-1][0]:8.2f} s  {b.n / forwards[-1][0]:9.1f} "
                 f"images/s{note}")
        dissects.append(_time_dissect(b, spec))
        if note:
            _log(f"dissect:        {dissects[-1][0]:8.2f} s{note}")
        if args.statistics == "compare":
            plains.append(_time_dissect(b, _dissect_spec(b, False)))
            _log(f"dissect, no statistics: {plains[-1][0]:8.2f} s  (round {k + 1})")
    return forwards, dissects, plains, peak_gpu_forward


def _statistics_figures(args, result: dict, dissect_s: float, dissect_cpu_s: float,
                        plains: list) -> dict:
    """Statistics time and FDR detectors; with --statistics compare, the dissection without
    statistics and the relative cost of the statistics."""
    figures = {}
    if args.statistics != "off":
        figures["statistics_s"] = result["statistics_s"]
        figures["detectors_fdr"] = {
            layer: int(sig["detector_fdr"][sig["rank"] == 0].sum())
            for layer, sig in result["significance"].items()}
        _log(f"statistics: tally {result['tally_s']:.2f} s (with the per-image records), "
             f"intervals + p-values {result['statistics_s']:.2f} s; FDR detectors "
             f"{figures['detectors_fdr']}")
    if plains:
        plain_s, plain_cpu_s, plain, _ = min(plains, key=lambda d: d[0])
        figures.update(dissect_nostats_s=plain_s, dissect_nostats_cpu_s=plain_cpu_s,
                       tally_nostats_s=plain["tally_s"],
                       statistics_cost=dissect_s / plain_s - 1,
                       statistics_cost_cpu=dissect_cpu_s / plain_cpu_s - 1)
        _log(f"dissect without statistics: {plain_s:.2f} s (tally {plain['tally_s']:.2f} s); "
             f"statistics add {100 * (dissect_s / plain_s - 1):.1f}% wall, "
             f"{100 * (dissect_cpu_s / plain_cpu_s - 1):.1f}% CPU time")
    return figures


def _workflow_settings(b: _Bench) -> dict:
    return {"batch_size": b.batch_size, "device": b.device.type, "precision": b.precision,
            "quantile": b.args.quantile, "shards": b.args.shards}


def _first_run_figures(b: _Bench, forward_s: float, cores: int) -> dict:
    """Validation and preparation as the workflow's rules run them, against the forward pass."""
    from cnnvis_pipeline.bench.prepare import first_run

    first = first_run(b.data["broden"], Path(b.args.scratch or b.cache)
                      / f"first-run-{os.getpid()}", log=_log, workers=cores)
    first["prepare_ips"] = round(b.n / first["prepare_s"], 1)
    first["prepare_serial_ips"] = round(b.n / first["prepare_serial_s"], 1)
    first["validate_ips"] = round(b.n / first["validate_s"], 1)
    if forward_s == forward_s:
        first["prepare_over_forward"] = round(first["prepare_s"] / forward_s, 3)
        first["first_run_over_forward"] = round(
            (first["prepare_s"] + first["validate_s"]) / forward_s, 3)
        _log(f"prepare / forward: {first['prepare_over_forward']:.3f}; validate + prepare "
             f"/ forward: {first['first_run_over_forward']:.3f}")
    return first


def _workflow_figures(b: _Bench, forward_s: float) -> dict:
    """--workflow, --first-run and --bulk: the dissection through the Snakemake workflow."""
    args = b.args
    if not (args.workflow or args.first_run or args.bulk):
        return {}
    from cnnvis_pipeline.bench import workflow as bench_workflow

    cores = args.cores or os.cpu_count() or 1
    figures = {}
    if args.workflow:
        work = Path(args.scratch or b.cache) / f"workflow-{os.getpid()}"
        try:
            figures.update(bench_workflow.compare(
                b.data["broden"], b.data["prepared"], work, b.layers, _workflow_settings(b),
                cores=cores, repeat=args.repeat, log=_log))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.first_run:
        figures.update(_first_run_figures(b, forward_s, cores))
    if args.bulk:
        work = Path(args.scratch or b.cache) / f"bulk-{os.getpid()}"
        try:
            figures.update(bench_workflow.bulk(
                b.data["broden"], b.data["prepared"], work, b.layers, _workflow_settings(b),
                counts=args.bulk, cores=cores, archs=args.bulk_archs, log=_log))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return figures


def _r(x, k=3):
    return None if x != x else round(float(x), k)


def run(args) -> dict:
    import torch

    b = _setup(args)
    load_s, load_planes_s = _time_loads(b)
    b.act_bytes = activation_bytes(b.model, b.layers, args.size, b.n)
    b.keep = args.keep_on_device
    if b.keep is None:
        b.keep = b.cuda and b.act_bytes < 0.6 * torch.cuda.mem_get_info(b.device)[0]
    b.scratch = Path(args.scratch or b.cache / f"scratch-{os.getpid()}")
    rss_before = current_rss_mb()
    forwards, dissects, plains, peak_gpu_forward = _rounds(b)
    forward_s, forward_cpu_s = min(forwards) if forwards else (float("nan"), float("nan"))
    dissect_s, dissect_cpu_s, result, _ = min(dissects, key=lambda d: d[0])
    peak_rss = max(d[3].peak_mb for d in dissects)
    rss_method = dissects[0][3].method
    peak_gpu = torch.cuda.max_memory_allocated(b.device) / 2**20 if b.cuda else 0.0
    detectors = detectors_per_layer(result, b.ds)
    n = b.n
    _log(f"dissect:        {dissect_s:8.2f} s  {n / dissect_s:9.1f} images/s  "
         f"(extract {result['extract_s']:.2f} s, thresholds + tally {result['tally_s']:.2f} s)")
    ratio = dissect_s / forward_s if forward_s == forward_s else float("nan")
    ratio_cpu = dissect_cpu_s / forward_cpu_s if forward_s == forward_s else float("nan")
    _log(f"whole / forward: {ratio:.3f} (process CPU time: {dissect_cpu_s:.1f} s / "
         f"{forward_cpu_s:.1f} s = {ratio_cpu:.3f})")
    _log(f"peak RSS (dissect): {peak_rss:.0f} MB ({rss_method}; {rss_before:.0f} MB "
         f"before); peak GPU memory: {peak_gpu:.0f} MB; activations "
         f"{b.act_bytes / 2**20:.0f} MB {'on the device' if b.keep else 'in files'}")
    _log(f"detectors (IoU > 0.04): {detectors}")
    stats_figures = _statistics_figures(args, result, dissect_s, dissect_cpu_s, plains)
    verified = None
    if args.verify and b.device.type != "cpu":
        t = time.perf_counter()
        verified = verify_on_cpu(b.model, b.layers, b.ds, args.verify, b.common)
        _log(f"{b.device.type} tally == cpu tally on the first {min(args.verify, n)} images: "
             f"{verified} ({time.perf_counter() - t:.1f} s)")
    workflow = _workflow_figures(b, forward_s)
    return {**workflow,
        "images": n, "size": args.size, "layers": b.layers, "device": b.device.type,
        "device_name": device_name(b.device), "batch_size": b.batch_size,
        "precision": b.precision, "load_s": _r(load_s), "load_planes_s": _r(load_planes_s),
        "forward_s": _r(forward_s), "dissect_s": _r(dissect_s),
        "extract_s": _r(result["extract_s"]), "forward_cpu_s": _r(forward_cpu_s),
        "dissect_cpu_s": _r(dissect_cpu_s), "ratio_cpu": _r(ratio_cpu),
        "rss_before_mb": _r(rss_before, 1), "tally_s": _r(result["tally_s"]), "ratio": _r(ratio),
        "load_ips": _r(n / load_s, 1), "forward_ips": _r(n / forward_s, 1),
        "dissect_ips": _r(n / dissect_s, 1), "peak_rss_mb": _r(peak_rss, 1),
        "rss_method": rss_method, "forward_runs_s": [_r(f[0]) for f in forwards],
        "dissect_runs_s": [_r(d[0]) for d in dissects], "peak_gpu_mb": _r(peak_gpu, 1),
        "peak_gpu_forward_mb": _r(peak_gpu_forward, 1), "keep_on_device": bool(b.keep),
        "activation_mb": _r(b.act_bytes / 2**20, 1), "detectors": detectors,
        "verified": verified, "gen_s": _r(b.data["gen_s"]), "prep_s": _r(b.data["prep_s"]),
        "cached": b.data["cached"], "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "statistics": args.statistics,
        **{k: _r(v) if isinstance(v, float) else v for k, v in stats_figures.items()},
    }

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cnnvis_pipeline.bench", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=224, help="image size (segmentations: half)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--cache", default=None, help=f"dataset cache (default {DEFAULT_CACHE})")
    p.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    p.add_argument("--arch", default="resnet18",
                   help="torchvision architecture, seeded random weights (not with --workflow)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (cpu), 512 (cuda)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--quantile", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes for generation")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--scratch", default=None, help="activation files when not on the device")
    p.add_argument("--keep-on-device", dest="keep_on_device", action="store_true", default=None)
    p.add_argument("--no-keep-on-device", dest="keep_on_device", action="store_false")
    p.add_argument("--no-forward", action="store_true", help="skip the forward-only pass")
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate forward and dissection this many times; report the fastest")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--workflow", action="store_true",
                   help="also run the dissection through the Snakemake workflow (tables only) "
                        "beside pipeline.dissect with tables, alternately, --repeat times")
    p.add_argument("--shards", type=int, default=2, help="workflow shards (default 2)")
    p.add_argument("--cores", type=int, default=None, help="snakemake --cores (default: CPUs)")
    p.add_argument("--first-run", action="store_true",
                   help="also time validation and the preparation (the workflow's rules; with --cores "
                        "processes, and with 1) of the dataset, against the forward pass")
    p.add_argument("--bulk", type=int, nargs="+", default=None, metavar="N",
                   help="bulk audits through the workflow: one run per N, N models x --layers")
    p.add_argument("--bulk-archs", nargs="+", default=None, metavar="ARCH",
                   help="torchvision architectures of the bulk runs, in turn (default resnet18)")
    p.add_argument("--statistics", choices=["on", "off", "compare"], default="on",
                   help="dissection.statistics (default on, as in the workflow); compare: also "
                        "time the dissection without them in every round, and report the cost")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="also tally the first N images on the device and on the CPU from the "
                        "same activations and check that the integers agree")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.images < 1 or args.size < 8 or args.size % 2:
        print("bench: --images must be >= 1 and --size an even number >= 8", file=sys.stderr)
        return 2
    out = run(args)
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0
