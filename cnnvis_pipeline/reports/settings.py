"""The `reports:` section of the config: what the unit visualisations cost and show.

REPORT_DEFAULTS mirrors the defaults of workflow/schemas/config.schema.yaml (documented in
config/README.md); report_settings(user) fills in whatever the user left out.
"""

from __future__ import annotations

import copy

from cnnvis_pipeline.errors import CnnvisError

REPORT_DEFAULTS: dict = {
    "top_units": 16,  # units with the highest IoU per layer, plus the model's `units:`
    "top_images": 9,  # top-activating images shown per unit (at most dissection.top_k)
    "activation_max": {"steps": 512, "size": 128, "lr": 0.05, "seed": 0, "preset": "default"},
    "deconvnet": True,
    # lambda_tv None: the paper's weight for the layer's relative depth; `layers` maps a layer
    # name to its own {lambda_tv, lambda_alpha}.
    "inversion": {"images": 4, "steps": 300, "lr": 0.01, "lambda_tv": None, "lambda_alpha": 1e-4,
                  "seed": 0, "spread_images": 64, "layers": {}},
    "threads": 1,  # torch CPU threads (and Snakemake threads) of a visualize job
}


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in base:
            raise CnnvisError(f"config: {where}.{k} is not a known setting ({', '.join(base)})")
        # A dict default with keys is a section (merged key by key); an empty one is a mapping
        # the user fills (reports.inversion.layers).
        out[k] = (_merge(base[k], v, f"{where}.{k}") if isinstance(base[k], dict) and base[k]
                  else copy.deepcopy(v))
    return out


def inversion_weights(s: dict, layer: str) -> tuple[float | None, float]:
    """(lambda_tv, lambda_alpha) for `layer`: its reports.inversion.layers entry, else the
    section's values; lambda_tv None means the paper's weight for the layer's depth."""
    inv = s["inversion"]
    own = (inv.get("layers") or {}).get(layer) or {}
    tv = own.get("lambda_tv", inv["lambda_tv"])
    alpha = own.get("lambda_alpha", inv["lambda_alpha"])
    return (None if tv is None else float(tv)), float(alpha)


def report_settings(user: dict | None) -> dict:
    s = _merge(REPORT_DEFAULTS, user or {}, "reports")
    if int(s["top_units"]) < 0 or int(s["top_images"]) < 1:
        raise CnnvisError("config: reports.top_units must be >= 0 and reports.top_images >= 1")
    if int(s["activation_max"]["steps"]) < 0 or int(s["inversion"]["steps"]) < 0:
        raise CnnvisError("config: reports step counts must be >= 0")
    if int(s["inversion"]["images"]) < 0:
        raise CnnvisError("config: reports.inversion.images must be >= 0")
    layers = s["inversion"]["layers"]
    if not isinstance(layers, dict):
        raise CnnvisError("config: reports.inversion.layers must map layer names to "
                          "{lambda_tv, lambda_alpha}")
    for name, own in layers.items():
        bad = ([k for k in own if k not in ("lambda_tv", "lambda_alpha")]
               if isinstance(own, dict) else [own])
        vals = [own.get(k) for k in ("lambda_tv", "lambda_alpha")] if isinstance(own, dict) else []
        if bad or any(v is not None and (not isinstance(v, int | float) or v < 0) for v in vals):
            raise CnnvisError(f"config: reports.inversion.layers.{name} must be "
                              "{lambda_tv: number >= 0, lambda_alpha: number >= 0}, "
                              f"not {own!r}")
    return s
