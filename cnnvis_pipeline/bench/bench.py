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
import threading
import time
from pathlib import Path

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "benchmarks" / "cache"


def _log(msg: str) -> None:
    print(msg, flush=True)


# -- memory --------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return 0.0


class PeakRSS:
    """Peak resident memory over a block: the kernel's high-water mark (reset at the start when
    /proc/self/clear_refs allows it), or else the largest of samples taken every 20 ms."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._reset = False

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, _current_rss_mb())

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            self._reset = False
        self.peak_mb = _current_rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _current_rss_mb())
        hwm = _status_kb("VmHWM")
        if self._reset and hwm is not None:
            self.peak_mb = max(self.peak_mb, hwm / 1024)

    @property
    def method(self) -> str:
        return "VmHWM reset" if self._reset else "sampled"


# -- dataset -------------------------------------------------------------------------------------

def dataset_dirs(cache: Path, images: int, size: int, seed: int) -> tuple[Path, Path]:
    from cnnvis_pipeline.bench.bigsynth import VERSION

    root = Path(cache) / f"broden-big-v{VERSION}-n{images}-s{size}-seed{seed}"
    return root / "broden", root / "prepared"


def ensure_dataset(cache: Path, images: int, size: int, seed: int, workers: int | None) -> dict:
    """Generate and prepare the dataset unless the cache has it; returns paths and timings."""
    from cnnvis_pipeline.bench.bigsynth import generate_broden_big
    from cnnvis_pipeline.data.prepared import prepare_dataset

    broden, prepared = dataset_dirs(cache, images, size, seed)
    info = {"broden": str(broden), "prepared": str(prepared), "gen_s": 0.0, "prep_s": 0.0,
            "cached": True}
    if (prepared / "meta.json").is_file():
        return info
    info["cached"] = False
    if prepared.exists():
        shutil.rmtree(prepared)
    if not (broden / "index.csv").is_file():
        if broden.exists():
            shutil.rmtree(broden)
        broden.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        generate_broden_big(broden, images, size, seed=seed, workers=workers)
        info["gen_s"] = time.perf_counter() - t
        _log(f"generated {images} images ({size} px) in {info['gen_s']:.1f} s -> {broden}")
    t = time.perf_counter()
    prepare_dataset(broden, prepared, workers=workers or os.cpu_count() or 1, progress=False)
    info["prep_s"] = time.perf_counter() - t
    _log(f"prepared in {info['prep_s']:.1f} s -> {prepared}")
    return info


# -- the benchmark -------------------------------------------------------------------------------

def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _detectors(result: dict, ds, iou_threshold: float = 0.04) -> dict:
    """Detectors per layer: units whose top concept has IoU > iou_threshold (the units table's
    `detector` column, by results.unit_columns)."""
    from cnnvis_pipeline.dissection.results import unit_columns

    return {layer: int(unit_columns("bench", layer, tally, ds, result["thresholds"][layer],
                                    iou_threshold)["detector"].sum())
            for layer, tally in result["tallies"].items()}


def verify_on_cpu(model, layers, ds, n: int, common: dict) -> dict:
    """Extract n images on the device, tally them there and on the CPU from the same float16
    activations and thresholds; True per layer when every integer of the two tallies agrees."""
    import numpy as np
    import torch

    from cnnvis_pipeline.dissection.extract import extract_shard, unit_thresholds
    from cnnvis_pipeline.dissection.stores import ActivationStore
    from cnnvis_pipeline.dissection.tally import ConceptTally, tally_shard

    device = common["device"]
    idx = np.arange(min(n, len(ds)), dtype=np.int64)
    stores, hists, _ = extract_shard(model, layers, ds, idx, out_dir=None, progress=False,
                                            **common)
    cpu = torch.device("cpu")
    out = {}
    for layer in layers:
        t = unit_thresholds(hists[layer], 0.005)
        here = tally_shard(ds, idx, stores[layer], t, device=device, progress=False)
        host = ActivationStore(len(idx), stores[layer].shape[1:], None, cpu,
                               stores[layer].affine)
        host.write(0, stores[layer].data.cpu())
        there = tally_shard(ds, idx, host, t, device=cpu, progress=False)
        out[layer] = all(torch.equal(getattr(here, f).cpu(), getattr(there, f))
                         for f in ConceptTally.FIELDS)
    return out


def run(args) -> dict:
    cache = Path(args.cache or DEFAULT_CACHE)
    data = ensure_dataset(cache, args.images, args.size, args.seed, args.workers)

    import numpy as np
    import torch
    import torchvision

    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.dissection import pipeline
    from cnnvis_pipeline.dissection.extract import forward_only
    from cnnvis_pipeline.dissection.stores import load_only
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
    layers = list(args.layers)
    ds = PreparedDataset(data["prepared"])
    n = len(ds)
    idx = np.arange(n, dtype=np.int64)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None).eval()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    common = {"input_size": None, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "device": device,
              "batch_size": batch_size, "precision": precision, "model_name": "resnet18"}
    _log(f"device {device} ({_device_name(device)}), {n} images, layers {layers}, "
         f"batch {batch_size}, precision {precision}")

    # Warm-up (not timed): kernels, cuDNN autotuning (full and last batch sizes), page cache.
    forward_only(model, layers, ds, idx[: min(n, 2 * batch_size)], **common)
    if n % batch_size and n > batch_size:
        forward_only(model, layers, ds, idx[: n % batch_size], **common)
    load_only(ds, idx, batch_size=batch_size, fields=("images", "planes"), device=device)
    sync()

    t = time.perf_counter()
    load_only(ds, idx, batch_size=batch_size, fields=("images",), device=device)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    load_only(ds, idx, batch_size=batch_size, fields=("planes",), device=device)
    load_planes_s = time.perf_counter() - t
    _log(f"load (images):  {load_s:8.2f} s  {n / load_s:9.1f} images/s")
    _log(f"load (planes):  {load_planes_s:8.2f} s  {n / load_planes_s:9.1f} images/s")

    def time_forward() -> tuple[float, float]:
        sync()
        t, c = time.perf_counter(), time.process_time()
        forward_only(model, layers, ds, idx, progress=args.progress, **common)
        sync()
        return time.perf_counter() - t, time.process_time() - c

    act_bytes = _activation_bytes(model, layers, args.size, n)
    keep = args.keep_on_device
    if keep is None:
        keep = cuda and act_bytes < 0.6 * torch.cuda.mem_get_info(device)[0]
    scratch = Path(args.scratch or cache / f"scratch-{os.getpid()}")
    spec = {"name": "resnet18", "layers": layers, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "input_size": None,
            "dissection": {"batch_size": batch_size, "device": str(device),
                           "precision": precision, "quantile": args.quantile,
                           "statistics": {"enabled": args.statistics != "off"}}}
    spec_plain = {**spec, "dissection": {**spec["dissection"], "statistics": {"enabled": False}}}

    def time_dissect(spec=spec):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with PeakRSS() as rss:
                sync()
                t, c = time.perf_counter(), time.process_time()
                result = pipeline.dissect(spec, ds, keep_on_device=keep, scratch=scratch,
                                          progress=args.progress, model=model)
                sync()
                wall, cpu = time.perf_counter() - t, time.process_time() - c
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return wall, cpu, result, rss

    # Forward and dissection alternate `--repeat` times; the fastest of each is reported (on a
    # shared machine the minimum is the figure least disturbed by other work).
    forwards, dissects, plains = [], [], []
    peak_gpu_forward = 0.0
    rss_before = _current_rss_mb()
    for k in range(max(1, args.repeat)):
        if not args.no_forward:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            forwards.append(time_forward())
            if cuda:
                peak_gpu_forward = torch.cuda.max_memory_allocated(device) / 2**20
            _log(f"forward:        {forwards[-1][0]:8.2f} s  {n / forwards[-1][0]:9.1f} images/s"
                 + (f"  (round {k + 1})" if args.repeat > 1 else ""))
        dissects.append(time_dissect())
        if args.repeat > 1:
            _log(f"dissect:        {dissects[-1][0]:8.2f} s  (round {k + 1})")
        if args.statistics == "compare":
            plains.append(time_dissect(spec_plain))
            _log(f"dissect, no statistics: {plains[-1][0]:8.2f} s  (round {k + 1})")
    forward_s, forward_cpu_s = min(forwards) if forwards else (float("nan"), float("nan"))
    dissect_s, dissect_cpu_s, result, _ = min(dissects, key=lambda d: d[0])
    peak_rss = max(d[3].peak_mb for d in dissects)
    rss_method = dissects[0][3].method
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0
    detectors = _detectors(result, ds)
    _log(f"dissect:        {dissect_s:8.2f} s  {n / dissect_s:9.1f} images/s  "
         f"(extract {result['extract_s']:.2f} s, thresholds + tally {result['tally_s']:.2f} s)")
    ratio = dissect_s / forward_s if forward_s == forward_s else float("nan")
    ratio_cpu = dissect_cpu_s / forward_cpu_s if forward_s == forward_s else float("nan")
    _log(f"whole / forward: {ratio:.3f} (process CPU time: {dissect_cpu_s:.1f} s / "
         f"{forward_cpu_s:.1f} s = {ratio_cpu:.3f})")
    _log(f"peak RSS (dissect): {peak_rss:.0f} MB ({rss_method}; {rss_before:.0f} MB "
         f"before); peak GPU memory: "
         f"{peak_gpu:.0f} MB; activations {act_bytes / 2**20:.0f} MB "
         f"{'on the device' if keep else 'in files'}")
    _log(f"detectors (IoU > 0.04): {detectors}")
    stats_figures = {}
    if args.statistics != "off":
        stats_figures["statistics_s"] = result["statistics_s"]
        stats_figures["detectors_fdr"] = {
            layer: int(sig["detector_fdr"][sig["rank"] == 0].sum())
            for layer, sig in result["significance"].items()}
        _log(f"statistics: tally {result['tally_s']:.2f} s (with the per-image records), "
             f"intervals + p-values {result['statistics_s']:.2f} s; FDR detectors "
             f"{stats_figures['detectors_fdr']}")
    if plains:
        plain_s, plain_cpu_s, plain, _ = min(plains, key=lambda d: d[0])
        stats_figures.update(dissect_nostats_s=plain_s, dissect_nostats_cpu_s=plain_cpu_s,
                             tally_nostats_s=plain["tally_s"],
                             statistics_cost=dissect_s / plain_s - 1,
                             statistics_cost_cpu=dissect_cpu_s / plain_cpu_s - 1)
        _log(f"dissect without statistics: {plain_s:.2f} s (tally {plain['tally_s']:.2f} s); "
             f"statistics add {100 * (dissect_s / plain_s - 1):.1f}% wall, "
             f"{100 * (dissect_cpu_s / plain_cpu_s - 1):.1f}% CPU time")
    verified = None
    if args.verify and device.type != "cpu":
        t = time.perf_counter()
        verified = verify_on_cpu(model, layers, ds, args.verify, common)
        _log(f"{device.type} tally == cpu tally on the first {min(args.verify, n)} images: "
             f"{verified} ({time.perf_counter() - t:.1f} s)")

    workflow = {}
    if args.workflow:
        from cnnvis_pipeline.bench import workflow as bench_workflow

        work = Path(args.scratch or cache) / f"workflow-{os.getpid()}"
        try:
            workflow = bench_workflow.compare(
                data["broden"], data["prepared"], work, layers,
                {"batch_size": batch_size, "device": device.type, "precision": precision,
                 "quantile": args.quantile, "shards": args.shards},
                cores=args.cores or os.cpu_count() or 1, repeat=args.repeat, log=_log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.first_run:
        from cnnvis_pipeline.bench import workflow as bench_workflow

        first = bench_workflow.first_run(data["broden"], Path(args.scratch or cache)
                                         / f"first-run-{os.getpid()}", log=_log,
                                         workers=args.cores or os.cpu_count() or 1)
        first["prepare_ips"] = round(n / first["prepare_s"], 1)
        first["prepare_serial_ips"] = round(n / first["prepare_serial_s"], 1)
        first["validate_ips"] = round(n / first["validate_s"], 1)
        if forward_s == forward_s:
            first["prepare_over_forward"] = round(first["prepare_s"] / forward_s, 3)
            first["first_run_over_forward"] = round(
                (first["prepare_s"] + first["validate_s"]) / forward_s, 3)
            _log(f"prepare / forward: {first['prepare_over_forward']:.3f}; validate + prepare "
                 f"/ forward: {first['first_run_over_forward']:.3f}")
        workflow.update(first)
    if args.bulk:
        from cnnvis_pipeline.bench import workflow as bench_workflow

        work = Path(args.scratch or cache) / f"bulk-{os.getpid()}"
        try:
            workflow.update(bench_workflow.bulk(
                data["broden"], data["prepared"], work, layers,
                {"batch_size": batch_size, "device": device.type, "precision": precision,
                 "quantile": args.quantile, "shards": args.shards},
                counts=args.bulk, cores=args.cores or os.cpu_count() or 1,
                archs=args.bulk_archs, log=_log))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def r(x, k=3):
        return None if x != x else round(float(x), k)

    return {**workflow,
        "images": n, "size": args.size, "layers": layers, "device": device.type,
        "device_name": _device_name(device), "batch_size": batch_size, "precision": precision,
        "load_s": r(load_s), "load_planes_s": r(load_planes_s), "forward_s": r(forward_s),
        "dissect_s": r(dissect_s), "extract_s": r(result["extract_s"]),
        "forward_cpu_s": r(forward_cpu_s), "dissect_cpu_s": r(dissect_cpu_s),
        "ratio_cpu": r(ratio_cpu), "rss_before_mb": r(rss_before, 1),
        "tally_s": r(result["tally_s"]), "ratio": r(ratio),
        "load_ips": r(n / load_s, 1), "forward_ips": r(n / forward_s, 1),
        "dissect_ips": r(n / dissect_s, 1),
        "peak_rss_mb": r(peak_rss, 1), "rss_method": rss_method,
        "forward_runs_s": [r(f[0]) for f in forwards], "dissect_runs_s": [r(d[0]) for d in dissects],
        "peak_gpu_mb": r(peak_gpu, 1), "peak_gpu_forward_mb": r(peak_gpu_forward, 1),
        "keep_on_device": bool(keep), "activation_mb": r(act_bytes / 2**20, 1),
        "detectors": detectors, "verified": verified, "gen_s": r(data["gen_s"]), "prep_s": r(data["prep_s"]),
        "cached": data["cached"], "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "statistics": args.statistics, **{k: r(v) if isinstance(v, float) else v
                                          for k, v in stats_figures.items()},
    }


def _activation_bytes(model, layers: list[str], size: int, n: int) -> int:
    """float16 bytes of the layers' activations over n images (one probe forward at batch 1)."""
    import torch

    from cnnvis_pipeline.models.hooks import LayerRecorder

    device = next(model.parameters()).device
    probe = torch.zeros(1, 3, size, size, device=device)
    with LayerRecorder(model, layers, stop_after_last=True) as rec, torch.inference_mode():
        outs = rec.run(probe)
    return sum(o[0].numel() * 2 for o in outs.values()) * n


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cnnvis_pipeline.bench", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, default=224, help="image size (segmentations: half)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--cache", default=None, help=f"dataset cache (default {DEFAULT_CACHE})")
    p.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
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
