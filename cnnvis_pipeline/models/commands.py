"""CLI command of the model room: `layers` (every module with its calls per forward pass, output
shape and layout). Training synthnet is the dissection stage's `train`, the model check its
`check-model` (their rules are in dissect.smk)."""

from __future__ import annotations

import json
import re

from cnnvis_pipeline.errors import CnnvisError

EXAMPLES = ("--spec resnet18, --spec synthnet, or --spec "
            """'{"torchvision": "vit_b_16", "layouts": {"encoder.ln": "tokens:1"}}'""")


def layers_spec(text: str) -> dict:
    """A `layers --spec`: a model entry as JSON, or the plain name of a torchvision architecture
    (or `synthnet`)."""
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", text.strip()):
        name = text.strip()
        return {"arch": name, "name": name} if name == "synthnet" else \
            {"torchvision": name, "name": name}
    try:
        spec = json.loads(text)
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        raise CnnvisError(f"--spec: expected a model name or a model entry as a JSON object "
                          f"(e.g. {EXAMPLES}); got {text[:60]!r}")
    return spec


def _layers(args) -> int:
    from cnnvis_pipeline.models.check import describe_layers

    spec = layers_spec(args.spec)
    size = args.input_size or spec.get("input_size") or [224, 224]
    rows = describe_layers(spec, size)
    if args.names_only:
        for r in rows:
            print(r["layer"])
        return 0
    print(f"# {spec.get('name', 'model')} on a {size[0]}x{size[1]} input: layer, calls per "
          "forward, output shape, layout, feature map [C, H, W] or why it cannot be dissected")
    for r in rows:
        out = "x".join(map(str, r["output"])) if r["output"] else "-"
        fmap = "x".join(map(str, r["feature_map"])) if r["feature_map"] else "-"
        mark = f"  RE-USED x{r['calls']}" if r["calls"] > 1 else ""
        layout = r["layout"] if r["layout"] and not r["layout"].startswith("refuse:") else \
            ("nchw" if r["feature_map"] else "-")
        print(f"{r['layer']}\t{r['calls']}\t{out}\t{layout}\t{fmap}{mark}"
              + (f"\t{r['problem']}" if r["problem"] else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("layers", help="list a model's layers: calls per forward (re-used modules "
                       "are marked), output shapes, layouts", epilog=f"Examples: {EXAMPLES}")
    p.add_argument("--spec", required=True, help="a torchvision architecture's name, synthnet, "
                   "or a model entry as JSON (keys as in the config's models: torchvision, "
                   f"weights, factory, kwargs, checkpoint, layouts, input_size); e.g. {EXAMPLES}")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="probe input size (default: the spec's input_size, else 224 224)")
    p.add_argument("--names-only", action="store_true", help="only the dotted names")
    p.set_defaults(func=_layers)
