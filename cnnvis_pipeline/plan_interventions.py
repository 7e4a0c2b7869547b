"""The resource plan of the interventions and of a segmenter dataset (plan.py's other jobs):
`ablation_layer`, `adversarial_layer` (per model and layer, with the config's `ablation:` /
`adversarial:` sections) and `segment_shard` (per shard, with a `dataset: {segmenter: ...}`).

Memory from the same inputs as plan.py's jobs (the dataset's size, the layers' shapes on the
meta device) and the per-row, per-image and per-unit costs below, measured as child processes
running the rules' commands (`cnnvis ablate`, `cnnvis attack`, `cnnvis segment`) with
bench.memory.run_measured (benchmarks/README.md, "Memory of the jobs"). Imports no torch.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.plan import (
    CPU_GFLOPS_PER_THREAD,
    FORWARD_OUTPUTS,
    GPU_GFLOPS,
    MB,
    TALLY_BUFFERS_MB,
    JobPlan,
    _shard_images,
    _sum,
)
from cnnvis_pipeline.plandata import DatasetSize, ModelShape, model_shape
from cnnvis_pipeline.settings import Ablation, Adversarial

# -- measured constants (MB unless said) -----------------------------------------------------------
# Figures from a seeded random ResNet-18 at 224 px on broden-big's 600 images, 1 thread; the
# parts as in plan.py (FORWARD_OUTPUTS, TALLY_BUFFERS_MB).
# Imports of the interventions' commands and the model's build: `import
# cnnvis_pipeline.interventions.stages` peaks at 712 MB, with a ResNet-18 built 877 MB.
IMPORTS_MB = 780
# Ablation (`cnnvis ablate`, an ImageFolder of 20 classes x 5 images): ablations are repeated at
# the layer (the part before it runs once per image), `batch_size x groups_per_pass` rows after
# it, which hold ~3 times the layer's float32 output of the rows (layer4, 2,048 rows: 1,246 MB,
# 512 rows: 986 MB; layer3, 1,926 rows: 2,021 MB).
ABLATION_ROW_OUTPUTS = 3.0
# After the passes: the table of (group, class) rows and the figure, ~190 MB besides the imports
# and the model, and ~60 bytes per row (100 classes x 1 image, 57,400 rows: 1,018.9 MB; 400 x 1,
# 229,600 rows: 1,028.6 MB; batch 4, 8 groups a pass, so that the passes are small).
ABLATION_END_MB = 190
ABLATION_BYTES_PER_ROW = 60
# The concept groups (`top_n` detectors of a concept together) per unit of the layer: distinct
# detected concepts (at most the concepts, at most the units).
CONCEPT_GROUPS_PER_UNIT = 0.25
# The rows after the layer, CPU GFLOP/s per thread (the rows of a pass are many: layer3, 100
# images x 321 groups x 0.82 GFLOP after it in 250 s on 1 thread).
ROWS_GFLOPS_PER_THREAD = 100.0
# Adversarial (`cnnvis attack`, 2 PGD steps): the attack's gradient keeps every module's output
# of the batch for the backward pass, ~6.4 times the largest module output (float32) per image
# (layer4, batch 16: 1,445 MB, batch 32: 1,760 MB, 32 images; 1,524 MB at 128 images; layer3,
# batch 16: 1,491 MB); what the job holds besides the parts below (the intercept of that fit
# at batch 0 less them: the concept lookups, autograd's and the allocator's buffers, the pages
# of the prepared arrays read) ~230 MB.
ATTACK_OUTPUTS = 6.4
ATTACK_FIXED_MB = 230
# Segmenter (`cnnvis segment`, torchvision's LR-ASPP MobileNetV3 and FCN-ResNet50, random
# weights, 21 classes, 224 px): ~1,000 MB besides the model's weights at batch 0 (imports of
# the command 636 MB, then torchvision's segmentation models and the first pass's buffers), and
# per image of a batch ~3 times the largest module output, float32 (LR-ASPP: 1,137 MB at batch
# 16, 1,235 MB at 32, 1,149 MB at batch 16 over 256 images; FCN-ResNet50: 1,245 MB at 8,
# 1,397 MB at 16).
SEGMENT_FIXED_MB = 1000
SEGMENT_OUTPUTS = 3.0

def ablation_job(model: str, layer: str, shape: ModelShape, ds: DatasetSize, a: Ablation,
                 spec: dict, batch: int, threads: int) -> JobPlan:
    """The ablation of one layer: the model, then a pass of `batch_size x groups_per_pass`
    rows after the layer (the ablations repeated at the layer, as for a model that passes
    ablation.at_layer_ok), or, once the passes are done, every (group, image) score, the table
    of (group, class) rows and its figure."""
    units, h, w = shape.layers[layer]
    classes, images = ablation_data(a, spec, ds)
    concept = min(units, ds.concepts) * CONCEPT_GROUPS_PER_UNIT if a.top_n > 0 else 0
    groups = max(1, math.ceil((units if a.units else 0) + concept))
    rows = batch * a.groups_per_pass
    per_pass = min(groups + 1, rows)
    pass_images = max(1, rows // per_pass)
    passes = (FORWARD_OUTPUTS * pass_images * shape.largest_output
              + ABLATION_ROW_OUTPUTS * pass_images * per_pass * units * h * w) * 4 / MB
    table = ABLATION_END_MB + (groups * classes * ABLATION_BYTES_PER_ROW
                               + 2 * (groups + 1) * images * 8) / MB
    parts = {"imports": IMPORTS_MB, "model": shape.params * 4 / MB,
             # the table is made once the passes are done: the larger of the two
             **({"passes": passes} if passes >= table else {"table": table})}
    before = shape.prefix_gflops.get(layer, 0.0)  # unknown: as if all the work came after
    after = images * (groups + 1) * (shape.gflops - before)
    return _sum(JobPlan("ablation_layer", model, layer, parts=parts,
                        disk_mb=math.ceil(groups * classes * 200 / MB + 5),
                        cpu_s=(images * before / CPU_GFLOPS_PER_THREAD
                               + after / ROWS_GFLOPS_PER_THREAD) / threads,
                        gpu_s=(images * before + after) / GPU_GFLOPS))


def ablation_data(a: Ablation, spec: dict, ds: DatasetSize) -> tuple[int, int]:
    """(classes, images) of a model's classification data: an ImageFolder's class folders
    (counted when the directory is there, else its class-index entries) x `limit` images, or
    a `train:` model's own labels (at most every concept, at most every image)."""
    limit, entry = a.limit, a.data_for(spec) or {}
    folder = entry.get("images")
    if folder and Path(folder).is_dir():
        classes = sum(1 for p in os.scandir(folder) if p.is_dir())
    elif entry.get("classes") and Path(entry["classes"]).is_file():
        classes = _class_entries(Path(entry["classes"]))
    else:
        classes = ds.concepts
    images = classes * limit if folder else min(ds.images, classes * limit)
    return classes, images


def _class_entries(path: Path) -> int:
    """Classes of a class-index file (JSON: its keys; CSV: its rows under the header)."""
    text = path.read_text(errors="replace")
    if path.suffix.lower() == ".json":
        try:
            return max(1, len(json.loads(text)))
        except (ValueError, TypeError):
            return 1  # the ablation job reports the file
    return max(1, len(text.splitlines()) - 1)


def adversarial_job(model: str, layer: str, shape: ModelShape, ds: DatasetSize, s: Adversarial,
                    batch: int, threads: int) -> JobPlan:
    """FGSM/PGD on the dissection images of one layer: a batch's forward and backward pass,
    the layer's maps of the batch clean and under each attack, a concept tally per attack."""
    units, h, w = shape.layers[layer]
    attacks = len(s.attacks)
    images = ds.images if s.images is None else min(ds.images, s.images)
    seg = ds.seg_size[0] * ds.seg_size[1]
    parts = {"imports": IMPORTS_MB, "model": shape.params * 4 / MB, "fixed": ATTACK_FIXED_MB,
             "attack": ATTACK_OUTPUTS * batch * shape.largest_output * 4 / MB,
             "layer_maps": (attacks + 1) * batch * units * h * w * 4 / MB,
             "tally": TALLY_BUFFERS_MB + batch * (units * h * w * 2 + ds.planes * seg * 8) / MB,
             "tallies": (attacks + 1) * units * (ds.concepts + 1) * 8 / MB}
    steps = sum(1 if a == "fgsm" else s.steps for a in s.attacks)
    flops = images * shape.gflops * (1 + attacks + 3 * steps)  # a backward pass ~ 2 forward
    return _sum(JobPlan("adversarial_layer", model, layer, parts=parts,
                        disk_mb=math.ceil((attacks + 1) * units * 400 / MB + 5),
                        cpu_s=flops / (CPU_GFLOPS_PER_THREAD * threads), gpu_s=flops / GPU_GFLOPS))


def segment_job(shape: ModelShape, ds: DatasetSize, batch: int, shards: int, shard: int,
                threads: int) -> JobPlan:
    """One shard of a segmenter's predictions: the model's forward pass of a batch and the
    shard's labels (uint16 at the segmentation size)."""
    n = _shard_images(ds.images, shards, shard)
    seg = ds.seg_size[0] * ds.seg_size[1]
    parts = {"imports": SEGMENT_FIXED_MB, "model": shape.params * 4 / MB,
             "forward": SEGMENT_OUTPUTS * batch * shape.largest_output * 4 / MB,
             "labels": n * seg * 2 / MB}
    return _sum(JobPlan("segment_shard", part=str(shard), parts=parts,
                        disk_mb=math.ceil(n * seg * 2 / MB + 1),
                        cpu_s=n * shape.gflops / (CPU_GFLOPS_PER_THREAD * threads),
                        gpu_s=n * shape.gflops / GPU_GFLOPS))


def segmenter_spec(dataset: dict) -> dict:
    """The segmentation model as model_shape builds it (a factory model, no layers)."""
    seg = dataset["segmenter"]
    return {"name": "segmenter", "factory": seg["factory"], "kwargs": seg.get("kwargs") or {},
            "layers": []}


def other_jobs(config: dict, models: dict, ds: DatasetSize, *, shards: int, batch: int,
               cores: int, cache_dir) -> list[JobPlan]:
    """The jobs of the sections that are on: segment_shard per shard (a segmenter dataset),
    ablation_layer and adversarial_layer per layer of the models they apply to."""
    from cnnvis_pipeline.interventions.targets import ablation_models, adversarial_models

    jobs = []
    if "segmenter" in config["dataset"]:
        try:
            shape = model_shape(segmenter_spec(config["dataset"]), ds.image_size, cache_dir)
        except (CnnvisError, RuntimeError, NotImplementedError) as e:
            # a model that cannot be built on the meta device: its jobs take the profile's
            # resources (the segment job reports a model that cannot be built at all)
            print(f"resource plan: segment_shard not planned ({e})", file=sys.stderr)
        else:
            jobs += [segment_job(shape, ds, batch, shards, k, max(1, cores // shards))
                     for k in range(shards)]
    seed = config.get("seed", 0)
    spec = lambda m: dict(models[m], name=m)  # noqa: E731
    for name in ablation_models(config, models, spec):
        a = Ablation.parse(config["ablation"], seed)
        shape, layers = model_shape(spec(name), ds.image_size, cache_dir), models[name]["layers"]
        jobs += [ablation_job(name, layer, shape, ds, a, spec(name), batch,
                              max(1, cores // len(layers))) for layer in layers]
    for name in adversarial_models(config, models, spec):
        s = Adversarial.parse(config["adversarial"], seed)
        shape, layers = model_shape(spec(name), ds.image_size, cache_dir), models[name]["layers"]
        jobs += [adversarial_job(name, layer, shape, ds, s, batch, max(1, cores // len(layers)))
                 for layer in layers]
    return jobs
