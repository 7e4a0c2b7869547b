"""The view settings of a job in the shape the views read them (`legacy_settings(job)`), and
the inversion's weights for one layer.

The config's `views:` and `report:` sections are parsed once into cnnvis_pipeline.settings.Job;
this maps them to the mapping the views and the manifest use (SPREAD_IMAGES: the number of
dataset images whose representations define the inversion's normalising spread).
"""

from __future__ import annotations

import dataclasses

from cnnvis_pipeline.settings import Job

SPREAD_IMAGES = 64


def legacy_settings(job: Job) -> dict:
    v = job.views
    return {
        "top_units": v.units, "top_images": job.report.top_images, "deconvnet": v.deconvnet,
        "threads": job.resources.threads,
        "activation_max": dataclasses.asdict(v.activation_max),
        "inversion": dict(dataclasses.asdict(v.inversion), spread_images=SPREAD_IMAGES),
    }


def inversion_weights(s: dict, layer: str) -> tuple[float | None, float]:
    """(lambda_tv, lambda_alpha) for `layer`: its views.inversion.layers entry, else the
    section's values; lambda_tv None means the paper's weight for the layer's depth."""
    inv = s["inversion"]
    own = (inv.get("layers") or {}).get(layer) or {}
    tv = own.get("lambda_tv", inv["lambda_tv"])
    alpha = own.get("lambda_alpha", inv["lambda_alpha"])
    return (None if tv is None else float(tv)), float(alpha)
