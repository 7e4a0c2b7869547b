"""Peak resident memory of the workflow's dissection jobs, each a child process.

    python -m cnnvis_pipeline.bench.memory --images 3000 [--arch resnet18] [--layer layer4]
        [--statistics on off] [--shards 1] [--unit-parts K] [--records]

On the benchmark's broden-big dataset (generated and prepared once, cached as for
`python -m cnnvis_pipeline.bench`), runs the commands of the workflow's jobs as separate
processes: `cnnvis extract` for each shard, then `cnnvis tables` for the layer once per
`--statistics` setting (`--workdir`: the extraction kept and reused), with `--unit-parts K` the
layer in K parts too (`cnnvis layer-units` per part, then `cnnvis tables --parts`), and reads
each child's peak resident set size from the kernel (`os.wait4`'s ru_maxrss: the child's own high-water mark, start-up and imports included, what a
SLURM job's memory limit sees). `--tile K` measures the tables jobs of a dataset K times larger
on the extraction's activations repeated K times (the tally and statistics of K x images
without K forward passes). `--records` also tallies the layer in this process and prints
the per-image records of the statistics (rows and bytes per group).
Prints one JSON object per job, and the load average at the start and end of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnnvis_pipeline.bench.common import DEFAULT_CACHE, ensure_dataset, log

# The job is started by a small launcher process, not by the caller: a child forked (or
# vforked) from a large process (a test session of 1.7 GB) carries that process's high-water mark
# in its ru_maxrss across exec, so the job's own peak would be lost under the caller's. The
# launcher's own child starts from a 10 MB interpreter, and the launcher reports its ru_maxrss.
_LAUNCH = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], "
           "stdout=subprocess.DEVNULL); _, status, usage = os.wait4(p.pid, 0); "
           "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, file=sys.stdout)")


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` as a child process; its exit status, wall seconds and peak RSS (MB)."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], env=env, capture_output=True,
                          text=True)
    rc, maxrss = (int(x) for x in proc.stdout.split())
    return {"rc": rc, "wall_s": round(time.perf_counter() - t, 1),
            "peak_rss_mb": round(maxrss / 1024, 1), "stderr_tail": proc.stderr[-2000:]}


def job_spec(arch: str, layer: str, statistics: bool, batch_size: int) -> dict:
    """The `--spec` of the dissection jobs for a seeded random torchvision model."""
    from cnnvis_pipeline.config import model_specs
    from cnnvis_pipeline.settings import job_spec as make

    config = {"seed": 0, "models": {arch: {"torchvision": arch, "weights": None,
                                           "layers": [layer]}},
              "dissection": {"statistics": {"enabled": statistics}},
              "resources": {"batch_size": batch_size, "device": "cpu"}}
    spec = dict(model_specs(config)[arch], name=arch)
    return make(spec, config, ("dissection", "resources"))


def _cnnvis(*args: str) -> list[str]:
    return [sys.executable, "-m", "cnnvis_pipeline", *args, "--quiet"]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def record_sizes(prepared: str, spec: dict, extracts: list[Path], layer: str) -> dict:
    """Rows and bytes of each group of per-image records of the layer's tally (in process)."""
    import torch

    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.dissection import pipeline
    from cnnvis_pipeline.settings import Job

    job = Job.from_spec(spec)
    ds = PreparedDataset(prepared)
    hist, shards, maxima = pipeline.layer_inputs(job, layer, *pipeline.extractions(extracts))
    res = pipeline.dissect_layer(job, ds, layer, hist, shards, maxima,
                                 device=torch.device("cpu"), progress=False)
    out = {}
    for group, names in res.stats.GROUPS.items():
        cols = [res.stats.arrays[f"{group}_{n}"] for n in names]
        out[group] = {"rows": int(len(cols[0])), "bytes": int(sum(c.nbytes for c in cols)),
                      "dtypes": sorted({str(c.dtype) for c in cols})}
    return out


def tile_extraction(src: Path, dst: Path, layer: str, k: int) -> Path:
    """A one-shard extraction of k times as many images: the activations and per-image maxima
    of `src` repeated k times, the histogram's counts times k (the same thresholds). What the
    tables job of a k-times larger dataset reads, without its forward pass (the labels of the
    larger dataset's images differ; their activations repeat)."""
    import numpy as np

    dst.mkdir(parents=True, exist_ok=True)
    acts = np.load(src / f"acts_{layer}.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(dst / f"acts_{layer}.npy", mode="w+", dtype=acts.dtype,
                                    shape=(len(acts) * k, *acts.shape[1:]))
    for i in range(k):
        out[i * len(acts):(i + 1) * len(acts)] = acts
    out.flush()
    del out
    (dst / f"acts_{layer}.affine.npz").write_bytes((src / f"acts_{layer}.affine.npz").read_bytes())
    with np.load(src / f"hist_{layer}.npz") as z:
        hist = dict(z)
    hist["count"] = hist["count"] * k
    np.savez(dst / f"hist_{layer}.npz", **hist)
    np.save(dst / f"maxima_{layer}.npy", np.tile(np.load(src / f"maxima_{layer}.npy"), (k, 1)))
    info = json.loads((src / "info.json").read_text())
    info.update(start=0, stop=len(acts) * k, shapes={layer: [len(acts) * k, *acts.shape[1:]]})
    (dst / "info.json").write_text(json.dumps(info))
    return dst


def measure(args) -> list[dict]:
    data = ensure_dataset(Path(args.cache), args.images, args.size, args.seed, None)
    prepared = data["prepared"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        extracts = []
        spec = json.dumps(job_spec(args.arch, args.layer, True, args.batch_size))
        work = Path(args.workdir) if args.workdir else Path(tmp)
        for shard in range(args.shards):
            out = work / "extract" / str(shard)
            extracts.append(out)
            if args.workdir and (out / "info.json").is_file():
                continue  # extracted by an earlier run with the same --workdir
            load = _load()
            r = run_measured(_cnnvis("extract", "--prepared", prepared, "--spec", spec,
                                     "--shard", str(shard), "--shards", str(args.shards),
                                     "--out", str(out)))
            rows.append(dict(job="extract_shard", shard=shard, shards=args.shards, **r,
                             load_before=load, load_after=_load()))
            log(json.dumps(rows[-1]))
        if args.tile > 1:  # the tables jobs of a dataset args.tile times larger
            if args.shards != 1:
                raise SystemExit("--tile takes one shard")
            prepared = ensure_dataset(Path(args.cache), args.images * args.tile, args.size,
                                      args.seed, None)["prepared"]
            extracts = [tile_extraction(extracts[0], Path(tmp) / "tiled" / "0", args.layer,
                                        args.tile)]
        for stats in args.statistics:
            spec = json.dumps(job_spec(args.arch, args.layer, stats == "on", args.batch_size))
            load = _load()
            r = run_measured(_cnnvis("tables", "--prepared", prepared, "--spec", spec,
                                     "--layers", args.layer, "--extracts",
                                     *map(str, extracts), "--out-dir", str(Path(tmp) / stats)))
            rows.append(dict(job="layer_tables", statistics=stats, **r, load_before=load,
                             load_after=_load()))
            log(json.dumps(rows[-1]))
        if args.unit_parts > 1:
            rows += measure_parts(prepared, args, extracts, Path(tmp))
        if args.records:
            rows.append({"records": record_sizes(
                prepared, job_spec(args.arch, args.layer, True, args.batch_size), extracts,
                args.layer)})
            log(json.dumps(rows[-1]))
    common = {"images": args.images * args.tile, "arch": args.arch, "layer": args.layer,
              "tiled_from": args.images if args.tile > 1 else None,
              "cpus": os.cpu_count()}
    return [dict(common, **r) for r in rows]


def measure_parts(prepared: str, args, extracts: list[Path], tmp: Path) -> list[dict]:
    """The layer in args.unit_parts parts, statistics on: each `cnnvis layer-units` job, then
    the merge (`cnnvis tables --parts`), each a measured child process."""
    spec = json.dumps(job_spec(args.arch, args.layer, True, args.batch_size))
    rows, files = [], []
    for k in range(args.unit_parts):
        files.append(tmp / "parts" / f"{k}-{args.unit_parts}.npz")
        load = _load()
        r = run_measured(_cnnvis("layer-units", "--prepared", prepared, "--spec", spec,
                                 "--layer", args.layer, "--extracts", *map(str, extracts),
                                 "--part", str(k), "--parts", str(args.unit_parts),
                                 "--out", str(files[-1])))
        rows.append(dict(job="layer_units", part=k, parts=args.unit_parts, **r,
                         load_before=load, load_after=_load()))
        log(json.dumps(rows[-1]))
    load = _load()
    r = run_measured(_cnnvis("tables", "--prepared", prepared, "--spec", spec, "--layers",
                             args.layer, "--parts", *map(str, files), "--out-dir",
                             str(tmp / "merged")))
    rows.append(dict(job="layer_tables", parts=args.unit_parts, **r, load_before=load,
                     load_after=_load()))
    log(json.dumps(rows[-1]))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--layer", default="layer4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--statistics", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--tile", type=int, default=1,
                   help="measure the tables jobs on a dataset this many times larger, with the "
                        "extraction's activations repeated (no forward pass of its own)")
    p.add_argument("--unit-parts", type=int, default=1,
                   help="also run the layer in this many unit parts (layer-units jobs and their "
                        "merge), statistics on")
    p.add_argument("--records", action="store_true",
                   help="also count the per-image records of the statistics (in process)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--scratch", default=None, help="directory for the activations")
    p.add_argument("--workdir", default=None,
                   help="keep the extraction here and reuse it when it is there (measure the "
                        "tables jobs of another version of the code on the same activations)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    for row in measure(parse_args(argv)):
        row.pop("stderr_tail", None) if row.get("rc", 0) == 0 else None
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
