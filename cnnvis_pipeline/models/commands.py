"""CLI commands of the model stage: `train` (synthnet on broden-synth) and `layers`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.models.hooks import layer_names
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.models.synthnet import train_synthnet


def _train(args) -> int:
    spec = json.loads(args.spec)
    train = dict(spec.get("train") or {})
    ds = PreparedDataset(args.prepared)
    model, history, names = train_synthnet(
        ds, epochs=int(train.get("epochs", 12)), batch_size=int(train.get("batch_size", 16)),
        lr=float(train.get("lr", 0.003)), seed=int(train.get("seed", spec.get("seed", 0))),
        mean=spec["mean"], std=spec["std"], category=train.get("category", "object"),
        progress=not args.quiet, **({"width": spec["kwargs"]["width"]} if "width" in spec.get("kwargs", {}) else {}),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)
    loss, acc, val = history[-1]
    print(f"trained {spec.get('name')}: {len(names)} classes, final loss {loss:.3f}, "
          f"train acc {acc:.3f}, val acc {val:.3f}")
    return 0


def _layers(args) -> int:
    spec = json.loads(args.spec)
    model, _ = build_model(spec.get("name", "model"), spec)
    for name in layer_names(model):
        print(name)
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train the built-in synthnet on a prepared dataset")
    p.add_argument("--prepared", required=True)
    p.add_argument("--spec", required=True, help="model spec as JSON")
    p.add_argument("--out", required=True, help="state dict file to write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("layers", help="list a model's dotted layer names")
    p.add_argument("--spec", required=True, help="model spec as JSON")
    p.set_defaults(func=_layers)
