"""The `reports:` section of the config: what the unit visualisations cost and show.

report_settings(user) checks the section against workflow/schemas/config.schema.yaml and fills in
the schema's defaults (documented in config/README.md) for whatever the user left out;
inversion_weights(settings, layer) the inversion's weights for one layer.
"""

from __future__ import annotations

from cnnvis_pipeline.config import with_defaults


def report_settings(user: dict | None) -> dict:
    return with_defaults("reports", user)


def inversion_weights(s: dict, layer: str) -> tuple[float | None, float]:
    """(lambda_tv, lambda_alpha) for `layer`: its reports.inversion.layers entry, else the
    section's values; lambda_tv None means the paper's weight for the layer's depth."""
    inv = s["inversion"]
    own = (inv.get("layers") or {}).get(layer) or {}
    tv = own.get("lambda_tv", inv["lambda_tv"])
    alpha = own.get("lambda_alpha", inv["lambda_alpha"])
    return (None if tv is None else float(tv)), float(alpha)
