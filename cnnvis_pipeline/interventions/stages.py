"""The interventions as file-to-file steps of one (model, layer), what the workflow's jobs run.

- run_ablation(job, prepared, layer, layer_dir): the layer's units table -> ablation.parquet
  and ablation.png in layer_dir (the model's classification data from `job.ablation`).
- run_adversarial(job, prepared, layer, layer_dir): the layer's units and thresholds tables ->
  adversarial.parquet, adversarial_concepts.parquet and adversarial.png.

Tables carry the provenance of the dissection tables they were made from plus their own
settings (`ablation` / `adversarial`), in their config digest.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cnnvis_pipeline.config import spec_digest
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.extract import set_precision
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.interventions import ablation as ab
from cnnvis_pipeline.interventions import adversarial as adv
from cnnvis_pipeline.interventions.classdata import ClassData, image_folder, own_labels
from cnnvis_pipeline.interventions.figures import plot_ablation, plot_adversarial
from cnnvis_pipeline.models.input import pick_device
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.models.synthnet import class_targets
from cnnvis_pipeline.settings import Job
from cnnvis_pipeline.tables import provenance, write_table

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CnnvisError(f"{path}: no {what} table (dissect the layer first)")
    return pq.read_table(path).to_pandas()


def _provenance(job: Job, ds: PreparedDataset, info: dict, section: str, fields: dict) -> dict:
    model = {k: v for k, v in job.model.items() if k != "checkpoint"}
    digest = spec_digest({"model": model, "dissection": dataclasses.asdict(job.dissection),
                          section: fields})
    return provenance(config_digest=digest, dataset_digest=ds.digest,
                      checkpoint_sha256=info.get("checkpoint_sha256"),
                      extra={"model": job.name, section: fields,
                             "dissection": dataclasses.asdict(job.dissection)})


def class_data(job: Job, ds: PreparedDataset) -> ClassData:
    """The model's classification data (settings.Ablation.data_for)."""
    a, spec = job.ablation, job.model
    entry = a.data_for(spec)
    if entry is None:
        raise CnnvisError(f"config: ablation: model {job.name!r} is not ablated (not in "
                          "ablation.models, and not a `train:` model)")
    if entry.get("images"):
        size = entry.get("size") or spec.get("input_size") or list(ds.images.shape[1:3])
        return image_folder(entry["images"], entry["classes"], a.limit,
                            (int(size[0]), int(size[1])))
    category = (spec.get("train") or {}).get("category", "object")
    return own_labels(ds, category, a.limit, spec.get("input_size"))


def run_ablation(job: Job, prepared: str | Path, layer: str, layer_dir: str | Path, *,
                 model=None) -> pd.DataFrame:
    a = job.ablation
    if a is None:
        raise CnnvisError("config: no `ablation:` section")
    layer_dir = Path(layer_dir)
    ds = PreparedDataset(prepared)
    units = _read(layer_dir / "units.parquet", "units")
    info = {}
    if model is None:
        model, info = build_model(job.name, job.model)
    device = pick_device(job.resources.device)
    set_precision(job.dissection.precision, device)
    data = class_data(job, ds)
    groups = ab.ablation_groups(units, single=a.units, top_n=a.top_n)
    if not groups:
        raise CnnvisError(f"{job.name} {layer}: nothing to ablate (ablation.units is false and "
                          "no concept has detectors)")
    log.info("%s %s: %d ablations x %d images (%s)", job.name, layer, len(groups), len(data),
             data.source)
    before, after = ab.ablation_scores(
        model, data, layer, groups, mean=job.model["mean"], std=job.model["std"],
        device=device, metric=a.metric, batch_size=job.resources.batch_size,
        groups_per_pass=a.groups_per_pass, layouts=job.model.get("layouts"),
        model_name=job.name)
    cols = ab.ablation_columns(job.name, layer, data, groups, before, after, metric=a.metric,
                               replicates=a.replicates, level=a.level, seed=a.seed)
    prov = _provenance(job, ds, info, "ablation", a.digest_fields())
    write_table("ablation", cols, layer_dir / "ablation.parquet", prov)
    table = pd.DataFrame(cols)
    plot_ablation(table, layer_dir / "ablation.png", f"{job.name} {layer}")
    return table


def attacks(job: Job) -> list[adv.Attack]:
    s = job.adversarial
    return [adv.Attack(name, s.eps, 1 if name == "fgsm" else s.steps,
                       s.eps if name == "fgsm" else s.pgd_step, s.random_start)
            for name in s.attacks]


def _labels(job: Job, ds: PreparedDataset) -> np.ndarray | None:
    if job.adversarial.target != "labels":
        return None
    train = job.model.get("train")
    if not train:
        raise CnnvisError(f"config: adversarial.target: `labels` needs a `train:` model; "
                          f"{job.name!r} has none")
    return class_targets(ds, train.get("category", "object"))[0]


def run_adversarial(job: Job, prepared: str | Path, layer: str, layer_dir: str | Path, *,
                    model=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    s = job.adversarial
    if s is None:
        raise CnnvisError("config: no `adversarial:` section")
    layer_dir = Path(layer_dir)
    ds = PreparedDataset(prepared)
    units = _read(layer_dir / "units.parquet", "units")
    thresholds = _read(layer_dir / "thresholds.parquet", "thresholds").sort_values("unit")
    info = {}
    if model is None:
        model, info = build_model(job.name, job.model)
    device = pick_device(job.resources.device)
    set_precision(job.dissection.precision, device)
    n = len(ds) if s.images is None else min(s.images, len(ds))
    found = attacks(job)
    sums = adv.attack_layer(
        model, ds, layer, thresholds["threshold"].to_numpy(), found,
        indices=np.arange(n, dtype=np.int64), mean=job.model["mean"], std=job.model["std"],
        input_size=job.model.get("input_size"), device=device,
        batch_size=job.resources.batch_size, labels=_labels(job, ds),
        multi_label=bool(job.model.get("train")), seed=s.seed,
        layouts=job.model.get("layouts"), model_name=job.name)
    u_cols, c_cols = adv.adversarial_columns(job.name, layer, units, ds, sums, found,
                                             job.dissection.iou_threshold)
    prov = _provenance(job, ds, info, "adversarial", dataclasses.asdict(s))
    write_table("adversarial", u_cols, layer_dir / "adversarial.parquet", prov)
    write_table("adversarial_concepts", c_cols, layer_dir / "adversarial_concepts.parquet", prov)
    u, c = pd.DataFrame(u_cols), pd.DataFrame(c_cols)
    plot_adversarial(u, c, layer_dir / "adversarial.png", f"{job.name} {layer}")
    return u, c
