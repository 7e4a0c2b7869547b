"""CLI commands of the report stage: `report` (one model's HTML page) and `summary-page`."""

from __future__ import annotations

from pathlib import Path

from cnnvis_pipeline.errors import CnnvisError


def _report(args) -> int:
    from cnnvis_pipeline.reports.html import build_model_report

    root = Path(args.results)
    out = build_model_report(args.model, {layer: root / layer for layer in args.layers}, args.out,
                             iou_figure=args.iou_figure, iou_threshold=args.iou_threshold)
    print(out)
    return 0


def _summary_page(args) -> int:
    from cnnvis_pipeline.reports.html import build_summary_page

    reports = {}
    for item in args.reports:
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise CnnvisError(f"--reports: expected MODEL=PATH, got {item!r}")
        reports[model] = path
    print(build_summary_page(reports, args.detectors, args.figure, args.out))
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="one model's self-contained HTML report")
    p.add_argument("--model", required=True)
    p.add_argument("--results", required=True, help="results/<model>")
    p.add_argument("--layers", nargs="+", required=True)
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--iou-figure", default=None, help="where to write the IoU distribution PNG")
    p.add_argument("--iou-threshold", type=float, default=None)
    p.set_defaults(func=_report)

    p = sub.add_parser("summary-page", help="the HTML page linking every model's report")
    p.add_argument("--reports", nargs="+", required=True, help="MODEL=path/to/index.html")
    p.add_argument("--detectors", required=True, help="results/summary/detectors.parquet")
    p.add_argument("--figure", required=True, help="results/summary/unique_detectors.png")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_summary_page)
