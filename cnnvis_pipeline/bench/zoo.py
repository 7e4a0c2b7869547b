"""The torchvision zoo check: every classification architecture, random weights, a small input.

For each architecture: build it (seeded random weights; the few that need it get constructor
kwargs for a small input), list its layers on one probe forward, pick a late layer
(late_layer) and dissect it on a tiny prepared dataset, or record the clear refusal it gives.

- zoo_spec(arch): the model spec (kwargs, input_size) the check uses.
- late_layer(rows): the last top-level module (depth <= 1, not a pooling/permute/flatten/head
  module) whose layer is a feature map larger than 1x1 and runs once per forward.
- check_arch(arch, prepared): one row of the table (status "dissected" | "refused" | "failed").
- main: `python -m cnnvis_pipeline.bench.zoo --prepared DIR [--archs ...] [--out table.md]`, or
  without --prepared a tiny broden-synth set is generated in a temporary directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Job

# Input sizes and constructor kwargs for a small forward pass.
_SMALL = 128
_SPECIAL = {
    "inception_v3": {"input_size": [160, 160], "kwargs": {"aux_logits": False,
                                                          "init_weights": False}},
    "googlenet": {"kwargs": {"aux_logits": False, "init_weights": False}},
    "maxvit_t": {"input_size": [224, 224]},  # partition size 7 at every stage: 224 at least
}
_SKIP_NAMES = ("pool", "permute", "flatten", "head", "classifier", "fc", "dropout")


def torchvision_archs() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def zoo_spec(arch: str) -> dict:
    spec = {"name": arch, "torchvision": arch, "weights": None, "seed": 0, "kwargs": {},
            "input_size": [_SMALL, _SMALL], "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "layers": []}
    if arch.startswith("vit_"):
        patch = int(arch.rsplit("_", 1)[1])
        size = 4 * patch  # a 4 x 4 patch grid
        spec["kwargs"] = {"image_size": size}
        spec["input_size"] = [size, size]
    for k, v in _SPECIAL.get(arch, {}).items():
        spec[k] = v
    return spec


def late_layer(rows) -> str | None:
    best = None
    for r in rows:
        name = r.name
        if name.count(".") > 1 or any(s in name.rsplit(".", 1)[-1].lower() for s in _SKIP_NAMES):
            continue
        if r.calls == 1 and r.feature_map and r.feature_map[1] * r.feature_map[2] > 1:
            best = name
    return best


def check_arch(arch: str, prepared, *, batch_size: int = 8) -> dict:
    from cnnvis_pipeline.dissection.pipeline import dissect
    from cnnvis_pipeline.models.probe import probe_layers
    from cnnvis_pipeline.models.registry import build_model

    spec = zoo_spec(arch)
    row = {"arch": arch, "input": "x".join(map(str, spec["input_size"])), "layer": None,
           "layout": None, "feature_map": None, "status": None, "message": "", "seconds": None}
    t0 = time.perf_counter()
    try:
        model, _ = build_model(arch, spec)
        x = torch.zeros(1, 3, *spec["input_size"])
        rows = probe_layers(model, x, model_name=arch)
        layer = late_layer(rows)
        if layer is None:
            row.update(status="refused", message="no top-level layer is a feature map > 1x1")
            return row
        probed = next(r for r in rows if r.name == layer)
        row.update(layer=layer, layout=probed.layout or "nchw",
                   feature_map="x".join(map(str, probed.feature_map)))
        spec = dict(spec, layers=[layer], resources={"batch_size": batch_size, "device": "cpu"})
        out = dissect(Job.from_spec(spec), prepared, model=model, progress=False)
        units = int(out["tallies"][layer].units)
        row.update(status="dissected", message=f"{units} units")
    except CnnvisError as e:
        row.update(status="refused", message=str(e)[:300])
    except Exception as e:  # the point of the sweep: record anything else too
        row.update(status="failed", message=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        row["seconds"] = round(time.perf_counter() - t0, 1)
        gc.collect()
    return row


def markdown(rows: list[dict]) -> str:
    done = sum(r["status"] == "dissected" for r in rows)
    lines = [f"{done} of {len(rows)} torchvision classification architectures dissected "
             "(random weights, one late layer, tiny broden-synth)", "",
             "| arch | input | layer | layout | feature map | status | note | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r["message"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['arch']} | {r['input']} | {r['layer'] or '-'} | "
                     f"{r['layout'] or '-'} | {r['feature_map'] or '-'} | {r['status']} | "
                     f"{note} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnnvis_pipeline.bench.zoo", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--prepared", default=None, help="prepared dataset (default: a tiny synth)")
    p.add_argument("--archs", nargs="+", default=None, help="default: every classification model")
    p.add_argument("--out", default=None, help="markdown table to write")
    p.add_argument("--jsonl", default=None, help="one JSON row per architecture, appended")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = args.prepared
        if prepared is None:
            from cnnvis_pipeline.data.prepared import prepare_dataset
            from cnnvis_pipeline.data.synth import generate_broden_synth

            ds = generate_broden_synth(Path(tmp) / "ds", n_images=16, image_size=32, seed=0)
            prepared = prepare_dataset(ds, Path(tmp) / "prep", progress=False)
        rows = []
        for arch in args.archs or torchvision_archs():
            row = check_arch(arch, prepared)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
    table = markdown(rows)
    if args.out:
        Path(args.out).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
