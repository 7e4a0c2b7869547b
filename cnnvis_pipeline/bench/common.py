"""What the benchmarks share: the dataset cache, peak resident memory, the device's name.

- dataset_dirs / ensure_dataset: the broden-big dataset of given size and seed, generated and
  prepared once under the cache.
- PeakRSS: peak resident memory over a block.
- device_name: the GPU's name, or the CPU's model and torch's thread count.

Importing this module imports neither torch nor the workflow's dependencies.
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
import time
from pathlib import Path

DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "benchmarks" / "cache"


def log(msg: str) -> None:
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


def current_rss_mb() -> float:
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
            self.peak_mb = max(self.peak_mb, current_rss_mb())

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = True
        except OSError:
            self._reset = False
        self.peak_mb = current_rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())
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
        log(f"generated {images} images ({size} px) in {info['gen_s']:.1f} s -> {broden}")
    t = time.perf_counter()
    prepare_dataset(broden, prepared, workers=workers or os.cpu_count() or 1, progress=False)
    info["prep_s"] = time.perf_counter() - t
    log(f"prepared in {info['prep_s']:.1f} s -> {prepared}")
    return info


# -- device --------------------------------------------------------------------------------------

def device_name(device) -> str:
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
