"""The views of the visualise stage, in the order they run and the report shows them.

A view is one module here with a `VIEW` (viz.context.View): its name, title, the settings it
reads and compute(context, units, views) -> ViewResult. Its manifest entries are declared in
tables.VIEW_ENTRIES and the report shows them through reports/templates/views/<name>.html.
"""

from cnnvis_pipeline.viz.views import activation_max, deconvnet, inversion, top_images

VIEWS = (top_images.VIEW, activation_max.VIEW, deconvnet.VIEW, inversion.VIEW)

__all__ = ["VIEWS"]
