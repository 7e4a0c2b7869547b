"""CLI command of the model room: `layers` (a model's dotted layer names). Training synthnet is
the dissection stage's `train` (its rule is in dissect.smk)."""

from __future__ import annotations

import json

from cnnvis_pipeline.models.hooks import layer_names
from cnnvis_pipeline.models.registry import build_model


def _layers(args) -> int:
    spec = json.loads(args.spec)
    model, _ = build_model(spec.get("name", "model"), spec)
    for name in layer_names(model):
        print(name)
    return 0


def register(sub) -> None:
    p = sub.add_parser("layers", help="list a model's dotted layer names")
    p.add_argument("--spec", required=True, help="model spec as JSON")
    p.set_defaults(func=_layers)
