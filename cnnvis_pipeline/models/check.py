"""The model check: cheap and complete. The rule check_model runs it before training a `train:`
model; every extraction runs check_built first (so a mistake stops a run at its first model
job, with every problem listed, before any activation is computed).

- train_num_classes(spec, dataset): the class count of a `train:` model, derived from its
  category's labels; a `kwargs.num_classes` that disagrees is refused naming both keys.
- check_model(spec, dataset): build the model (a `train:` model with random weights and the
  derived class count; another model with its checkpoint, so a checkpoint that does not fit is
  caught too), run one dataset image through it as the extraction would, and report every
  problem of every listed layer at once (unknown, not a feature map, a re-used module without
  `@K`, unit ids of `units:` beyond the layer's channels). Returns a JSON-able summary.
- check_built(model, spec, dataset): the same layer and unit checks on a built model.
- check_architectures({name: (spec, input_hw)}): the check at `snakemake -n` of synthnet and
  torchvision entries, without weights or data: the architecture built without its weights
  (registry.build_architecture) and run on one zero image of the input's size (zero weights on
  the CPU, or the meta device for a large model), the weights name against torchvision's enum. Every problem of every model at once, one line each naming its
  config key. With input_hw None (a size only the data tells) a 224 px input stands in and only
  the problems that do not depend on the size are reported (names, units, weights).
"""

from __future__ import annotations

import numpy as np
import torch

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.input import images_to_input
from cnnvis_pipeline.models.precheck import unit_problems
from cnnvis_pipeline.models.probe import check_layers, layer_problems, probe_layers, unknown_layers
from cnnvis_pipeline.models.registry import (
    build_architecture,
    build_model,
    check_weights_name,
    materialize,
)


def train_num_classes(spec: dict, ds) -> int:
    """ds: a prepared dataset (duck-typed: categories, concept_category)."""
    name = spec.get("name", "model")
    train = spec.get("train") or {}
    category = train.get("category", "object")
    if category not in ds.categories:
        raise CnnvisError(f"config: models.{name}.train.category: the dataset has no category "
                          f"{category!r} (it has {', '.join(ds.categories)})")
    cat = ds.categories.index(category)
    n = int((ds.concept_category == cat).sum())
    given = (spec.get("kwargs") or {}).get("num_classes")
    if given is not None and int(given) != n:
        raise CnnvisError(
            f"config: models.{name}.kwargs.num_classes is {given}, but models.{name}.train."
            f"category {category!r} has {n} labels in the dataset; drop kwargs.num_classes (it "
            f"is derived from the category) or set it to {n}")
    return n


def check_model(spec: dict, ds) -> dict:
    """ds: a prepared dataset (duck-typed: images, categories, concept_category)."""
    name = spec.get("name", "model")
    build = dict(spec)
    num_classes = None
    if spec.get("train"):
        num_classes = train_num_classes(spec, ds)
        # Not trained yet: the architecture with the class count training will give it.
        build["checkpoint"] = None
        build["kwargs"] = {**(spec.get("kwargs") or {}), "num_classes": num_classes}
    model, _info = build_model(name, build)
    return dict(check_built(model, spec, ds), num_classes=num_classes)


def check_built(model, spec: dict, ds) -> dict:
    """The layer and unit checks of check_model on a model already built (what an extraction
    runs first, before its first batch): every problem at once, as one CnnvisError."""
    name = spec.get("name", "model")
    x = images_to_input(np.array(ds.images[:1]), spec.get("input_size"), spec["mean"], spec["std"],
                        torch.device("cpu"))
    try:
        shapes = check_layers(model, spec["layers"], x, model_name=name,
                              layouts=spec.get("layouts"))
    except RuntimeError as e:  # the model cannot run on this input at all
        raise CnnvisError(f"{name}: the model fails on a {tuple(x.shape[-2:])} input "
                          f"(input_size {spec.get('input_size')}): {str(e)[:300]}") from None
    problems = unit_problems(spec, shapes)
    if problems:
        raise CnnvisError(f"config: models.{name}." + f"; config: models.{name}.".join(problems))
    return {"model": name, "input_size": list(x.shape[-2:]),
            "layers": {k: {"feature_map": v} for k, v in shapes.items()}}


# Up to this many parameters the check's forward runs on the CPU with zero weights (a
# ResNet-50 at 224 px: a fraction of a second); a larger model runs on the meta device.
CPU_PARAMETERS = 30_000_000

# Problems that depend on the input's size: not reported when the size is a stand-in.
_SIZE_DEPENDENT = ("patch grid", "does not follow from the", "empty map")


def _architecture_problems(name: str, spec: dict, input_hw) -> list[str]:
    """The problems of one synthnet or torchvision entry, each naming its key (no prefix)."""
    try:
        model = build_architecture(name, spec)
    except CnnvisError as e:
        return [str(e).removeprefix(f"config: models.{name}.")
                .removeprefix(f"config: models.{name}: ")]
    problems = []
    if spec.get("torchvision"):
        try:
            check_weights_name(spec["torchvision"], spec.get("weights"), f"config: models.{name}")
        except CnnvisError as e:
            problems.append(str(e).removeprefix(f"config: models.{name}."))
    unknown, known = unknown_layers(model, spec["layers"])
    problems += [f"layers: {p}" for p in unknown]
    h, w = input_hw or (224, 224)
    x = torch.zeros(1, 3, int(h), int(w), device=materialize(model, CPU_PARAMETERS))
    try:
        layers, shapes = layer_problems(model, known, x, model_name=name,
                                        layouts=spec.get("layouts"))
    except Exception as e:  # a meta forward may fail where a real one would not
        if input_hw is None or isinstance(e, NotImplementedError) or "meta" in str(e):
            return problems
        return problems + [f"input_size: the model fails on a {h}x{w} input: {str(e)[:200]}"]
    if input_hw is None:
        layers = [p for p in layers if not any(k in p for k in _SIZE_DEPENDENT)]
    return problems + [f"layers: {p}" for p in layers] + unit_problems(spec, shapes)


def check_architectures(entries: dict) -> None:
    """Every problem of every listed model at once (one CnnvisError, one line per problem)."""
    problems = []
    for name, (spec, input_hw) in entries.items():
        problems += [f"config: models.{name}.{p}" for p in
                     _architecture_problems(name, spec, input_hw)]
    if len(problems) == 1:
        raise CnnvisError(problems[0])
    if problems:
        raise CnnvisError(f"{len(problems)} problems:\n" + "\n".join(f"  {m}" for m in problems))


def describe_layers(spec: dict, input_size) -> list[dict]:
    """Every module of the model with its calls per forward, output and verdict (`layers`)."""
    name = spec.get("name", "model")
    model, _ = build_model(name, spec)
    h, w = input_size
    x = torch.zeros(1, 3, int(h), int(w))
    rows = []
    for r in probe_layers(model, x, model_name=name, layouts=spec.get("layouts")):
        rows.append({"layer": r.name, "calls": r.calls, "output": r.shape, "layout": r.layout,
                     "feature_map": r.feature_map, "problem": r.problem})
    return rows
