"""Per-layer unit visualisations and the HTML reports built from them.

- settings.py: the `reports:` config section and its defaults.
- selection.py: which units of a layer get visualised (top IoU plus the requested ones).
- visualize.py: run_visualize(...) -> results/<model>/<layer>/{activation_max,inversion}.parquet
  and results/<model>/<layer>/viz/ (PNGs and manifest.json); the `visualize_layer` rule.
- html.py: build_model_report(...) -> results/<model>/report/index.html (self-contained) and
  build_summary_page(...) -> results/summary/index.html; the `model_report`/`summary_page` rules.
"""
