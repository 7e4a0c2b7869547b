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
"""

from __future__ import annotations

import numpy as np
import torch

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.input import images_to_input
from cnnvis_pipeline.models.probe import check_layers, probe_layers
from cnnvis_pipeline.models.registry import build_model


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
    problems = []
    for layer, units in sorted((spec.get("units") or {}).items()):
        if layer not in shapes:
            problems.append(f"units.{layer}: not among the model's layers")
            continue
        bad = [u for u in units if not 0 <= int(u) < shapes[layer][0]]
        if bad:
            problems.append(f"units.{layer}: {bad} out of range (the layer has units 0.."
                            f"{shapes[layer][0] - 1})")
    if problems:
        raise CnnvisError(f"config: models.{name}." + f"; config: models.{name}.".join(problems))
    return {"model": name, "input_size": list(x.shape[-2:]),
            "layers": {k: {"feature_map": v} for k, v in shapes.items()}}


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
