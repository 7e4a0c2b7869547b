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
    "inversion": {"images": 4, "steps": 300, "lr": 0.01, "lambda_tv": 0.01, "seed": 0,
                  "spread_images": 64},
    "threads": 1,  # torch CPU threads (and Snakemake threads) of a visualize job
}


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in base:
            raise CnnvisError(f"config: {where}.{k} is not a known setting ({', '.join(base)})")
        out[k] = _merge(base[k], v, f"{where}.{k}") if isinstance(base[k], dict) else v
    return out


def report_settings(user: dict | None) -> dict:
    s = _merge(REPORT_DEFAULTS, user or {}, "reports")
    if int(s["top_units"]) < 0 or int(s["top_images"]) < 1:
        raise CnnvisError("config: reports.top_units must be >= 0 and reports.top_images >= 1")
    if int(s["activation_max"]["steps"]) < 0 or int(s["inversion"]["steps"]) < 0:
        raise CnnvisError("config: reports step counts must be >= 0")
    if int(s["inversion"]["images"]) < 0:
        raise CnnvisError("config: reports.inversion.images must be >= 0")
    return s
