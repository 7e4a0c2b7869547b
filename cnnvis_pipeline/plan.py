"""The resource plan of a run: memory, disk and time of every job of the workflow, before it runs.

`workflow_plan(config, models)` returns one `JobPlan` per job (extract_shard per model and shard,
layer_tables per layer, compositional_shard per layer and part, visualize_layer; the
interventions' and a segmenter's jobs: plan_interventions.py), from
- the dataset's size (plandata.py: its prepared arrays' meta.json when they exist, else the
  source's index.csv, else the config or the known datasets' sizes);
- the layers' shapes, known without data (plandata.py): the model built on PyTorch's meta device
  (no weights, no memory) and run on a meta input of the dataset's size; cached by the model's
  spec in `.snakemake/cnnvis/plan/` (torch is imported only when the cache misses, so
  `snakemake -n` stays fast);
- the per-unit and per-image costs below, measured on the development VM (`python -m
  cnnvis_pipeline.bench.memory`, each job a child process, peak RSS from os.wait4; AMD EPYC,
  2 threads, torch 2.14 CPU; benchmarks/README.md, "Memory of the jobs").

The workflow's rules take `mem_mb`, `disk_mb` and `runtime` (minutes) from it, and a job that
would not fit `resources.max_mem_mb` (or Snakemake's `--resources mem_mb=`) is refused at
`snakemake -n` with its estimate and what to change (`over_limit`). `cnnvis plan --configfile
FILE` prints it. Imports no torch at module level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from cnnvis_pipeline.plandata import DatasetSize, ModelShape, dataset_size, model_shape
from cnnvis_pipeline.plandata import SizeUnknown as SizeUnknown  # (the workflow catches it)
from cnnvis_pipeline.plandata import load_config as load_config  # (`cnnvis plan` reads it)

MB = 1 << 20
# -- measured constants (MB unless said) -----------------------------------------------------------
# Resident memory of a job after its imports (python, torch, torchvision, numpy, pandas, pyarrow,
# matplotlib): `import cnnvis_pipeline.dissection.pipeline` peaks at 713 MB (ru_maxrss).
BASE_MB = 720
# A unit's exact float16 histogram: 65,536 int64 counts (extract_shard holds one per layer,
# layer_tables the merged one, and the one being merged when there are several shards).
HIST_MB_PER_UNIT = (1 << 16) * 8 / MB
# The forward pass on the CPU: live activations ~ this many times the largest module output of a
# batch (float32); ResNet-18 at 224 px, batch 64: extract_shard peaks at 1,538-1,548 MB.
FORWARD_OUTPUTS = 2.5
# The tally's CPU work buffers (tally._TALLY_CHUNK_DEFAULT of upsampled maps and their masks).
TALLY_BUFFERS_MB = 80
# layer_tables grows by 23 bytes per (image, unit) without statistics (the per-image maxima, float32,
# concatenated, and the top images' selection): ResNet-18 layer4, 1,070.6 MB at 3,000 images,
# 1,281.7 MB at 21,000.
MAXIMA_BYTES_PER_IMAGE_UNIT = 23.0
# Statistics: the per-image records take 20.8 bytes per (image, unit) in their compact dtypes
# (records.DTYPES; ResNet-18 layer4, broden-big, 3,000 images: 222,652 mask, 859,675 intersection,
# 882,853 partner and 41,238 area records); layer_tables holds them about once (each column's
# batches freed once concatenated, the shards merged as they are tallied): with statistics it
# peaks 102 MB above the run without them at 3,000 images, 308 MB at 21,000. Partners' label
# planes and per-pixel concepts of a batch are 12 bytes per (image, plane, pixel) for each of the
# image and its partners.
RECORD_BYTES_PER_IMAGE_UNIT = 20.8
# The tables of a layer (the iou table's rows, the tally's IoU, intersection and union arrays):
# writing iou.parquet of 2,048 units x 1,197 concepts peaks 263 MB above 256 x 1,197 (128 bytes
# per unit and concept, in process, numbers from a random tally).
TABLE_BYTES_PER_UNIT_CONCEPT = 130
RECORD_PEAK_FACTOR = 1.1
PARTNER_BYTES_PER_PIXEL = 12
# Significance work arrays: bootstrap weights [images, replicates] (int64 drawn, float64 used),
# a block of null replicates (significance._NULL_IMAGE_CELLS images x replicates, ~48 B each).
NULL_BLOCK_MB = (1 << 21) * 48 / MB
# Throughput: CPU GFLOP/s per thread of the forward pass (ResNet-18, 224 px, fp32, 2 threads:
# 3,000 images in 201 s, 3.6 GFLOP each), GPU GFLOP/s (H200, bf16, ResNet-18: 33,622 images/s).
CPU_GFLOPS_PER_THREAD = 27.0
GPU_GFLOPS = 60_000.0
# The tally's seconds per (image, unit) on one CPU thread (3,000 images x 512 units in 23-30 s on
# 2 threads) and on the GPU (H200: 63,305 x 512 in 1.74 s); statistics: RECORD_TIME_FACTOR x.
TALLY_S_PER_IMAGE_UNIT_CPU = 3.5e-5
TALLY_S_PER_IMAGE_UNIT_GPU = 5.4e-8
RECORD_TIME_FACTOR = 1.5
# Start-up of a job (imports, model build) in seconds, and the margin of a runtime request.
START_S = 30
RUNTIME_MARGIN = 2.0
# The share of (image, unit) maps with a non-empty mask (ResNet-18 layer4, quantile 0.005: 74
# of 512 units per image).
UNIT_ACTIVE = 0.15
# Compositional explanations (compositional_shard: `cnnvis compositional`, ResNet-18 layer4,
# broden-big, 3,000 images, 1,376 concepts, 953 MB at 16 units, 1,055 at 64, 1,243 at 160): the
# concept entries per image (41,238 for 3,000 images), the annotation groups of the
# co-occurrence (8), the buffers of the pass that thresholds the units, and the searches' caches
# of formula masks and overlaps, which fill at about 470 bytes per (image, unit) up to their
# bound (formulas.Searcher: 512 + 256 MB for the search and again for the null).
CONCEPT_ENTRIES_PER_IMAGE = 14
ANNOTATION_GROUPS = 8
UNIT_MASK_PASS_MB = 100
FORMULA_CACHE_BYTES_PER_IMAGE_UNIT = 470
FORMULA_CACHE_MAX_MB = 2 * (512 + 256)


@dataclass
class JobPlan:
    rule: str
    model: str = ""
    layer: str = ""
    part: str = ""
    mem_mb: int = 0
    disk_mb: int = 0
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    parts: dict = field(default_factory=dict)  # what the memory is made of (MB)
    unit_parts: int = 1  # layer_tables: the layer's unit parts (layer_units jobs) it merges
    floor: list = field(default_factory=list)  # a layer too large even with one unit per part:
    # the jobs of that split which would still not fit

    @property
    def name(self) -> str:
        return " ".join(x for x in (self.rule, self.model, self.layer, self.part) if x)

    def runtime_min(self, gpu: bool) -> int:
        """The runtime request (minutes): the estimate with a margin, at least 5."""
        s = self.gpu_s if gpu else self.cpu_s
        return max(5, math.ceil((START_S + RUNTIME_MARGIN * s) / 60))


# -- the jobs --------------------------------------------------------------------------------------

def _shard_images(n: int, shards: int, shard: int) -> int:
    """Images of one shard (as extract.shard_indices: consecutive, the first ones larger)."""
    return n // shards + (1 if shard < n % shards else 0)


def extract_job(model: str, shape: ModelShape, ds: DatasetSize, batch: int, shards: int,
                shard: int, threads: int) -> JobPlan:
    """One shard's forward pass: float16 activations, histograms and maxima of every layer."""
    n = _shard_images(ds.images, shards, shard)
    units = sum(u for u, _h, _w in shape.layers.values())
    maps = sum(u * h * w for u, h, w in shape.layers.values())
    parts = {"imports": BASE_MB, "model": shape.params * 4 / MB,
             "forward": FORWARD_OUTPUTS * batch * shape.largest_output * 4 / MB,
             "histograms": HIST_MB_PER_UNIT * units, "maxima": n * units * 4 / MB}
    disk = (n * maps * 2 + units * (1 << 16) * 8 + n * units * 4) / MB
    return JobPlan("extract_shard", model, part=str(shard), parts=parts,
                   disk_mb=math.ceil(disk), cpu_s=n * shape.gflops / (CPU_GFLOPS_PER_THREAD * threads),
                   gpu_s=n * shape.gflops / GPU_GFLOPS)


def tables_job(model: str, layer: str, shape: ModelShape, ds: DatasetSize, batch: int,
               statistics: dict, threads: int, shards: int = 1, units: int | None = None,
               part: str = "") -> JobPlan:
    """A layer's thresholds, tally (with the statistics' per-image records) and tables in one
    job; with `part`, the job `layer_units` of a part of `units` of its units (the same without
    the tables, which the layer's merge job writes: merge_job)."""
    n = ds.images
    units_all, h, w = shape.layers[layer]
    units = units_all if units is None else units
    seg = ds.seg_size[0] * ds.seg_size[1]
    parts = {"imports": BASE_MB, "histograms": (1 + (shards > 1)) * HIST_MB_PER_UNIT * units,
             "maxima": n * units * MAXIMA_BYTES_PER_IMAGE_UNIT / MB,
             "tally": TALLY_BUFFERS_MB + batch * (units * h * w * 2 + ds.planes * seg * 8) / MB}
    if not part:
        parts["tables"] = units * ds.concepts * TABLE_BYTES_PER_UNIT_CONCEPT / MB
    tally_cpu = n * units * TALLY_S_PER_IMAGE_UNIT_CPU / threads
    stats_s = 0.0
    if statistics.get("enabled", True):
        reps, partners = int(statistics.get("replicates", 200)), int(statistics.get("partners", 1))
        parts["records"] = n * units * RECORD_BYTES_PER_IMAGE_UNIT * RECORD_PEAK_FACTOR / MB
        parts["partners"] = batch * (partners + 1) * ds.planes * seg * PARTNER_BYTES_PER_PIXEL / MB
        parts["significance"] = n * reps * 12 / MB + min(NULL_BLOCK_MB, n * 250 * 48 / MB)
        tally_cpu *= RECORD_TIME_FACTOR
        stats_s = n * units * TALLY_S_PER_IMAGE_UNIT_CPU / 4  # intervals and p-values (CPU)
    disk = (units * (ds.concepts + 1) * 64 / MB + 5) if not part else units * ds.concepts * 8 / MB
    return _sum(JobPlan("layer_units" if part else "layer_tables", model, layer, part,
                        parts=parts, disk_mb=math.ceil(disk), cpu_s=tally_cpu + stats_s,
                        gpu_s=n * units * TALLY_S_PER_IMAGE_UNIT_GPU + stats_s))


def merge_job(model: str, layer: str, shape: ModelShape, ds: DatasetSize, statistics: dict,
              unit_parts: int) -> JobPlan:
    """The job `layer_tables` of a layer in unit parts: the parts' tallies, significance and top
    images concatenated, the layer-wide steps and the tables."""
    units = shape.layers[layer][0]
    top = int(statistics.get("top", 5)) if statistics.get("enabled", True) else 0
    parts = {"imports": BASE_MB,
             "tables": units * ds.concepts * TABLE_BYTES_PER_UNIT_CONCEPT / MB,
             "significance": units * top * 200 / MB}
    return _sum(JobPlan("layer_tables", model, layer, parts=parts, unit_parts=unit_parts,
                        disk_mb=math.ceil(units * (ds.concepts + 1) * 64 / MB + 5),
                        cpu_s=units * ds.concepts * 2e-6, gpu_s=units * ds.concepts * 2e-6))


def layer_jobs(model: str, layer: str, shape: ModelShape, ds: DatasetSize, batch: int,
               statistics: dict, threads: int, shards: int, unit_parts: int | str = "auto",
               limit: int | None = None) -> list[JobPlan]:
    """A layer's jobs: one `layer_tables` job, or with k unit parts k `layer_units` jobs and the
    merge (`layer_tables`). `unit_parts` "auto": the fewest parts whose jobs all fit `limit` (MB;
    one part without a limit). When none fits, the layer stays in one job, which over_limit
    refuses naming what would not fit even with one unit per part (its `floor`)."""
    units = shape.layers[layer][0]

    def part(n: int, i: int = 0) -> JobPlan:
        return tables_job(model, layer, shape, ds, batch, statistics, threads, shards, n, str(i))

    def jobs(k: int) -> list[JobPlan]:
        if k == 1:
            return [tables_job(model, layer, shape, ds, batch, statistics, threads, shards)]
        bounds = [units * i // k for i in range(k + 1)]  # as dissection.parts.unit_bounds
        return [part(bounds[i + 1] - bounds[i], i) for i in range(k)] + [
            merge_job(model, layer, shape, ds, statistics, k)]

    if unit_parts != "auto":
        return jobs(max(1, min(int(unit_parts), units)))
    whole = jobs(1)
    if not limit or whole[0].mem_mb <= limit:
        return whole
    merge = merge_job(model, layer, shape, ds, statistics, units)
    if merge.mem_mb <= limit:
        for k in range(2, units + 1):  # the largest part (-(-units // k) units) shrinks with k
            if part(-(-units // k)).mem_mb <= limit:
                return jobs(k)
    whole[0].floor = [j for j in (part(1), merge) if j.mem_mb > limit]
    return whole


def find_job(jobs: dict, rule: str, model: str, layer: str, part: str) -> JobPlan:
    """The planned job {(rule, model, layer, part): JobPlan}; a unit part this plan does not
    have (a cluster job's plan, from the prepared arrays, may split a layer otherwise than the
    run's) gets the layer's largest part, else the layer in one job."""
    found = jobs.get((rule, model, layer, part))
    if found is None and rule == "layer_units":
        same = [j for (r, m, x, _), j in jobs.items() if (r, m, x) == (rule, model, layer)]
        found = max(same, key=lambda j: j.mem_mb, default=None)
    return found or jobs[("layer_tables", model, layer, "")]


def _sum(job: JobPlan) -> JobPlan:
    job.mem_mb = math.ceil(sum(job.parts.values()))
    return job


def compositional_job(model: str, layer: str, shape: ModelShape, ds: DatasetSize, shards: int,
                      part: int, units_setting) -> JobPlan:
    """Formulas of one part of a layer's units: the bit-packed concept masks of every (image,
    concept present) entry, the concepts' co-occurrence per annotation group, the pass that
    thresholds the part's units, their masks, kept for the images where they are not empty
    (about UNIT_ACTIVE of them at the default quantile), and the searches' bounded caches."""
    units = shape.layers[layer][0] if units_setting == "all" else len(units_setting)
    mine = _shard_images(units, shards, part)
    row = 8 * math.ceil(ds.seg_size[0] * ds.seg_size[1] / 64)  # int64 words of a mask row
    parts = {"imports": BASE_MB,
             "concept_masks": ds.images * CONCEPT_ENTRIES_PER_IMAGE * row / MB,
             "cooccurrence": ds.concepts ** 2 * ANNOTATION_GROUPS * 8 / MB,
             "unit_mask_pass": UNIT_MASK_PASS_MB,
             "unit_masks": ds.images * mine * UNIT_ACTIVE * row / MB,
             "formula_caches": min(FORMULA_CACHE_MAX_MB,
                                   ds.images * mine * FORMULA_CACHE_BYTES_PER_IMAGE_UNIT / MB)}
    cpu = ds.images * mine * 2e-4
    return JobPlan("compositional_shard", model, layer, str(part), parts=parts, disk_mb=5,
                   cpu_s=cpu, gpu_s=cpu)


def compositional_jobs(model: str, layer: str, shape: ModelShape, ds: DatasetSize, shards: int,
                       units_setting, limit: int | None = None) -> list[JobPlan]:
    """A layer's compositional_shard jobs: its explained units in `resources.shards` parts, or
    more when a part would not fit `limit` (MB): the fewest parts (at most one unit each) whose
    largest fits. The first parts are the largest (as compositional.shard_units)."""
    units = shape.layers[layer][0] if units_setting == "all" else len(units_setting)
    k = max(1, min(shards, units))
    if limit:
        while k < units and _sum(compositional_job(model, layer, shape, ds, k, 0,
                                                   units_setting)).mem_mb > limit:
            k += 1
    return [compositional_job(model, layer, shape, ds, k, i, units_setting) for i in range(k)]


def visualize_job(model: str, layer: str, shape: ModelShape, views: dict) -> JobPlan:
    """The layer's views (rough: the model with gradients and optimiser state, a batch of
    images; time from the views' steps)."""
    units = int((views or {}).get("units", 16))
    parts = {"imports": BASE_MB, "model": 4 * shape.params * 4 / MB, "views": 500}
    cpu = units * 3 * shape.gflops * 2
    return JobPlan("visualize_layer", model, layer, parts=parts, disk_mb=50 + units,
                   cpu_s=cpu, gpu_s=cpu / 100)


def workflow_plan(config: dict, models: dict, *, cores: int = 1,
                  cache_dir: str | Path | None = ".snakemake/cnnvis/plan",
                  limit: int | None = None) -> list[JobPlan]:
    """Every per-model job of the workflow, planned (memory, disk, time); each layer in the unit
    parts `resources.unit_parts` asks for ("auto": the fewest that fit `limit`, MB, default
    `resources.max_mem_mb`)."""
    res = config.get("resources") or {}
    limit = res.get("max_mem_mb") if limit is None else limit
    shards, batch = int(res.get("shards", 2)), int(res.get("batch_size", 64))
    statistics = (config.get("dissection") or {}).get("statistics") or {}
    ds = dataset_size(config)
    jobs = [JobPlan("prepare_dataset", parts={"imports": 300, "chunks": 500},
                    disk_mb=math.ceil(ds.prepared_mb), cpu_s=ds.images * 0.01)]
    for name, spec in models.items():
        shape = model_shape(dict(spec, name=name), ds.image_size, cache_dir)
        layers = len(spec["layers"])
        for k in range(shards):
            jobs.append(extract_job(name, shape, ds, batch, shards, k, max(1, cores // shards)))
        for layer in spec["layers"]:
            jobs += layer_jobs(name, layer, shape, ds, batch, statistics,
                               max(1, cores // layers), shards, res.get("unit_parts", "auto"),
                               limit)
            jobs.append(visualize_job(name, layer, shape, config.get("views") or {}))
            if config.get("compositional") is not None:
                units = (config["compositional"] or {}).get("units", "all")
                jobs += compositional_jobs(name, layer, shape, ds, shards, units, limit)
    from cnnvis_pipeline.plan_interventions import other_jobs

    jobs += other_jobs(config, models, ds, shards=shards, batch=batch, cores=cores,
                       cache_dir=cache_dir)
    for job in jobs:
        job.mem_mb = math.ceil(sum(job.parts.values()))
    return jobs


# -- limits and the printed plan -------------------------------------------------------------------

_ADVICE = {
    "extract_shard": "a smaller resources.batch_size (the forward pass) or more resources.shards "
                     "(the per-image maxima)",
    "layer_tables": "resources.unit_parts: auto or a number (the layer's units in parts, fewer "
                    "per job), or dissection.statistics.enabled: false (the per-image records)",
    "layer_units": "more resources.unit_parts (fewer units per job), a smaller "
                   "resources.batch_size (a batch's partner label planes) or fewer "
                   "dissection.statistics.replicates (the bootstrap weights of every image)",
    "merge": "a machine with more memory (the tables grow with the layer's units x concepts)",
    "compositional_shard": "more resources.shards (fewer units per job; with resources."
                           "max_mem_mb the plan adds parts until each fits), or a machine with "
                           "more memory (the dataset's concept masks and co-occurrence)",
    "visualize_layer": "fewer views.units",
    "ablation_layer": "a smaller resources.batch_size or ablation.groups_per_pass (the ablated "
                      "rows of one pass), or a smaller ablation.limit (the images scored)",
    "adversarial_layer": "a smaller resources.batch_size (the attack's gradients keep every "
                         "layer's output of a batch)",
    "segment_shard": "a smaller resources.batch_size (the segmenter's forward pass) or more "
                     "resources.shards (each shard's labels)",
}


def _line(job: JobPlan, limit: int, where: str, floor: bool = False) -> str:
    top = sorted(job.parts.items(), key=lambda kv: -kv[1])[:3]
    advice = _ADVICE["merge"] if job.unit_parts > 1 else _ADVICE.get(
        job.rule, "a machine with more memory")
    if floor:  # one unit per part already
        advice = advice.removeprefix("more resources.unit_parts (fewer units per job), ")
    return (f"needs about {job.mem_mb} MB, more than {where} {limit} MB ("
            + ", ".join(f"{k} {v:.0f} MB" for k, v in top) + f"); try {advice}")


def over_limit(jobs: list[JobPlan], max_mem_mb: int | None, where: str) -> list[str]:
    """One line per job whose memory estimate exceeds `max_mem_mb` (one per layer for its unit
    parts, which differ by one unit at most): its estimate, the largest parts and what to change;
    for a layer that does not fit even with one unit per part, what still would not fit."""
    if not max_mem_mb:
        return []
    lines, layers = [], set()
    for job in jobs:
        if job.mem_mb <= max_mem_mb or (job.rule == "layer_units"
                                        and (job.model, job.layer) in layers):
            continue
        layers.add((job.model, job.layer))
        floor = [f for f in job.floor if f.mem_mb > max_mem_mb]
        if not floor:
            lines.append(f"{job.name}: {_line(job, max_mem_mb, where)}")
            continue
        lines.append(f"{job.name}: needs about {job.mem_mb} MB, more than {where} {max_mem_mb} "
                     "MB, and even with one unit per part (resources.unit_parts) " + "; ".join(
                         ("the merge of the parts " if f.unit_parts > 1 else "a layer_units job ")
                         + _line(f, max_mem_mb, where, True) for f in floor))
    return lines


def format_plan(jobs: list[JobPlan], ds: DatasetSize) -> str:
    """The plan as a text table."""
    head = (f"dataset: {ds.images} images, {ds.image_size[0]}x{ds.image_size[1]} px, "
            f"segmentation {ds.seg_size[0]}x{ds.seg_size[1]}, {ds.planes} planes, "
            f"{ds.concepts} concepts (from {ds.source}); prepared arrays {ds.prepared_mb:.0f} MB")
    rows = [f"{'job':<44} {'mem MB':>8} {'disk MB':>9} {'CPU min':>9} {'GPU min':>9}  largest"]
    for j in jobs:
        top = max(j.parts.items(), key=lambda kv: kv[1])[0] if j.parts else ""
        merges = f" (merges {j.unit_parts} unit parts)" if j.unit_parts > 1 else ""
        rows.append(f"{j.name:<44} {j.mem_mb:>8} {j.disk_mb:>9} {j.cpu_s / 60:>9.1f} "
                    f"{j.gpu_s / 60:>9.2f}  {top}{merges}")
    return "\n".join([head, *rows])
