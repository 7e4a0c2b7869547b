"""The HTML reports: tables and images in, self-contained pages out.

- html.py: build_model_report(...) -> results/<model>/report/index.html and
  build_summary_page(...) -> results/summary/index.html; the `model_report`/`summary_page` rules.
- layer.py: one layer's section, each view of its manifest through
  templates/views/<name>.html; methods.py: the Methods section.
- figures.py: the IoU distribution per category (the report's own figure).
- format.py: how numbers are printed and files embedded.
- templates/ (jinja2) and static/ (report.css, report.js, inlined into every page).

reports/ imports only the table schemas and the views manifest's schema (tables), the errors,
the file helper (fileio), the typed settings (settings: the command's `--spec`) and its own
modules.

The unit visualisations the report shows are made by the visualise stage (cnnvis_pipeline.viz).
"""
