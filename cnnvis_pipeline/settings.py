"""Typed settings: each job's part of the configuration, parsed once.

The workflow validates the config against workflow/schemas/config.schema.yaml (the only home of
defaults) and hands each job one JSON object, `--spec`: the resolved model entry
(config.model_specs, with its `name`) plus the top-level `seed` and the config sections that the
job's stage reads. `Job.from_spec(spec)` parses it once into frozen dataclasses; every function
after that takes the dataclass it needs. A library caller may leave sections out: they are
filled with the schema's defaults, never with defaults written here.

- Dissection (+ Statistics): what determines the tables.
- Resources: scheduling only (shards, batch size, device, threads, keeping activations); never
  part of a table's config digest.
- Compositional: formula search (None when the config has no `compositional:` section).
- Views (+ ActivationMax, Inversion): what the visualise stage computes.
- Report: what the HTML pages show (display only; changing it reruns only the report).
- Ablation, Adversarial: the interventions (None when the config has no such section).

Imports neither torch nor any stage.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from cnnvis_pipeline.config import with_defaults
from cnnvis_pipeline.errors import CnnvisError

SECTIONS = ("dissection", "resources", "compositional", "views", "report", "ablation",
            "adversarial")


def _build(cls, values: dict, **extra):
    """A dataclass from a schema-filled mapping (unknown keys are schema errors before this)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(extra)
    return cls(**{k: v for k, v in values.items() if k in names}, **extra)


@dataclass(frozen=True)
class Statistics:
    enabled: bool
    replicates: int
    null_replicates: int
    level: float
    fdr: float
    top: int
    partners: int
    seed: int = 0


@dataclass(frozen=True)
class Dissection:
    quantile: float
    iou_threshold: float
    precision: str
    top_k: int
    statistics: Statistics

    @classmethod
    def parse(cls, section: dict | None, seed: int = 0) -> Dissection:
        s = with_defaults("dissection", section)
        return _build(cls, s, statistics=_build(Statistics, s["statistics"], seed=int(seed)))


@dataclass(frozen=True)
class Resources:
    shards: int
    batch_size: int
    device: str
    threads: int
    keep_activations: bool

    @classmethod
    def parse(cls, section: dict | None) -> Resources:
        return _build(cls, with_defaults("resources", section))


@dataclass(frozen=True)
class Compositional:
    max_length: int
    beam: int
    penalty: float
    units: Any  # "all" or a list of unit ids
    null_replicates: int

    @classmethod
    def parse(cls, section: dict | None) -> Compositional:
        s = with_defaults("compositional", section)
        units = s["units"] if s["units"] == "all" else tuple(int(u) for u in s["units"])
        return cls(int(s["max_length"]), int(s["beam"]), float(s["penalty"]), units,
                   int(s["null_replicates"]))


@dataclass(frozen=True)
class ActivationMax:
    steps: int
    size: int
    lr: float
    preset: str
    seed: int = 0


@dataclass(frozen=True)
class Inversion:
    images: int
    steps: int
    lr: float
    lambda_tv: float | None
    lambda_alpha: float
    layers: dict = field(default_factory=dict)
    seed: int = 0

    def weights(self, layer: str) -> tuple[float | None, float]:
        """(lambda_tv, lambda_alpha) for `layer`: its `layers` entry, else the section's; a
        lambda_tv of None means the paper's weight for the layer's relative depth."""
        own = self.layers.get(layer) or {}
        tv = own.get("lambda_tv", self.lambda_tv)
        return (None if tv is None else float(tv)), float(own.get("lambda_alpha",
                                                                   self.lambda_alpha))


@dataclass(frozen=True)
class Views:
    units: int
    deconvnet: bool
    activation_max: ActivationMax
    inversion: Inversion

    @classmethod
    def parse(cls, section: dict | None, seed: int = 0) -> Views:
        s = with_defaults("views", section)
        return cls(int(s["units"]), bool(s["deconvnet"]),
                   _build(ActivationMax, s["activation_max"], seed=int(seed)),
                   _build(Inversion, s["inversion"], seed=int(seed)))


@dataclass(frozen=True)
class Report:
    top_images: int

    @classmethod
    def parse(cls, section: dict | None) -> Report:
        return _build(cls, with_defaults("report", section))


@dataclass(frozen=True)
class Ablation:
    models: dict | None  # name -> {images, classes, size} ({} = own labels); None = train: models
    limit: int
    units: bool
    top_n: int
    metric: str
    replicates: int
    level: float
    groups_per_pass: int
    seed: int = 0

    @classmethod
    def parse(cls, section: dict | None, seed: int = 0) -> Ablation:
        return _build(cls, with_defaults("ablation", section), seed=int(seed))

    def data_for(self, model: dict) -> dict | None:
        """The classification data entry of a model entry (with its `name`), or None when the
        model is not ablated; {} = a `train:` model's own labels."""
        if self.models is None:
            return {} if model.get("train") else None
        entry = self.models.get(model["name"])
        if entry is not None and not entry.get("images") and not model.get("train"):
            raise CnnvisError(f"config: ablation.models.{model['name']}: give `images` and "
                              "`classes` (only a `train:` model has its own labels)")
        return None if entry is None else dict(entry)

    def digest_fields(self) -> dict:
        """What determines the ablation tables (not the scheduling's groups_per_pass)."""
        out = dataclasses.asdict(self)
        out.pop("groups_per_pass")
        return out


@dataclass(frozen=True)
class Adversarial:
    models: tuple | None  # None = every model
    attacks: tuple
    eps: float
    steps: int
    step_size: float | None
    random_start: bool
    target: str
    images: int | None
    seed: int = 0

    @classmethod
    def parse(cls, section: dict | None, seed: int = 0) -> Adversarial:
        s = with_defaults("adversarial", section)
        s["attacks"] = tuple(s["attacks"])
        s["models"] = None if s["models"] is None else tuple(s["models"])
        return _build(cls, s, seed=int(seed))

    @property
    def pgd_step(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def applies_to(self, model: dict) -> bool:
        return self.models is None or model["name"] in self.models


@dataclass(frozen=True)
class Job:
    """One job's settings: the model it works on and the parsed sections of its stage."""

    model: dict  # the resolved model entry (config.model_specs) with its `name`
    seed: int
    dissection: Dissection
    resources: Resources
    views: Views
    report: Report
    compositional: Compositional | None
    ablation: Ablation | None = None
    adversarial: Adversarial | None = None

    @property
    def name(self) -> str:
        return self.model["name"]

    @classmethod
    def from_json(cls, text: str, flag: str = "--spec") -> Job:
        """Parse a job's `--spec` text (a JSON object; anything else is a clear error)."""
        return cls.from_spec(spec_object(text, flag))

    @classmethod
    def from_spec(cls, spec: dict) -> Job:
        """Parse a `--spec` object (sections left out take the schema's defaults)."""
        seed = int(spec.get("seed", 0))
        model = {k: v for k, v in spec.items() if k not in SECTIONS and k != "seed"}
        comp = spec.get("compositional")
        abl, adv = spec.get("ablation"), spec.get("adversarial")
        return cls(model=model, seed=seed,
                   dissection=Dissection.parse(spec.get("dissection"), seed),
                   resources=Resources.parse(spec.get("resources")),
                   views=Views.parse(spec.get("views"), seed),
                   report=Report.parse(spec.get("report")),
                   compositional=None if comp is None else Compositional.parse(comp),
                   ablation=None if abl is None else Ablation.parse(abl, seed),
                   adversarial=None if adv is None else Adversarial.parse(adv, seed))


def job_spec(model: dict, config: dict, sections: tuple[str, ...]) -> dict:
    """The `--spec` object of a job: the model entry, the seed and only `sections` of the
    config (a job's command line, and so its rerun trigger, changes only with what it reads)."""
    out = dict(model, seed=int(config.get("seed", 0)))
    for s in sections:
        if config.get(s) is not None:
            out[s] = config[s]
    if "resources" in out:  # the memory limit and the unit parts: the workflow's, read by no job
        out["resources"] = {k: v for k, v in out["resources"].items()
                            if k not in ("max_mem_mb", "unit_parts")}
    return out


def spec_object(text: str, flag: str = "--spec") -> dict:
    """The JSON object of a `--spec` option, or a CnnvisError saying what a spec is."""
    try:
        out = json.loads(text)
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise CnnvisError(
            f"{flag}: expected a JSON object (the resolved model entry), e.g. "
            f"""'{{"name": "m", "torchvision": "resnet18", "weights": null, "layers": ["layer4"]}}'"""
            f"; got {text[:60]!r}")
    return out
