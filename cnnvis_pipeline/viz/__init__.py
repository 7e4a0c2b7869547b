"""Per-unit visualisations of a CNN layer, as pure library functions.

- activation_maximization: Lucid-style feature visualisation, one image per unit (Olah et al. 2017).
- deconvnet, strongest_locations, receptive_field: DeconvNet projections of a unit's strongest
  activation and the input box it sees (Zeiler & Fergus 2014).
- invert, representation_spread, layer_representation: reconstruct images from a layer's whole
  representation (Mahendran & Vedaldi 2015).

The visualise stage (the `visualize_layer` rule, workflow/rules/viz.smk) is built on them:

- visualize.py: run_visualize(job, ...), a driver over the views of views/ (top images with
  masks, activation maximisation, DeconvNet, inversion; one module each, behind the View
  interface of context.py), the manifest (tables.MANIFEST_SCHEMA) and the views' tables.
- objectives.py, transform.py, param.py: activation maximisation's composable parts.
- selection.py: which units of a layer are visualised.
- images.py: image tiles (PNG writing, mask overlays, strips, crops).

Layers are dotted module names (see cnnvis_pipeline.models.hooks), their layouts the model's
(`layouts=`); images are float [N, 3, H, W] in [0, 1]; `mean`/`std`, when given, normalise
images before the model. Settings come typed from cnnvis_pipeline.settings (Job, Views).
"""

from cnnvis_pipeline.viz.activation_max import activation_maximization
from cnnvis_pipeline.viz.deconvnet import deconvnet, receptive_field, strongest_locations
from cnnvis_pipeline.viz.inversion import (
    NORMALIZED_ERROR_FORMULA,
    invert,
    layer_representation,
    paper_lambda_tv,
    relative_depth,
    representation_spread,
)

__all__ = [
    "NORMALIZED_ERROR_FORMULA",
    "activation_maximization",
    "deconvnet",
    "invert",
    "layer_representation",
    "paper_lambda_tv",
    "receptive_field",
    "relative_depth",
    "representation_spread",
    "strongest_locations",
]
