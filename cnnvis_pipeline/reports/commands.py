"""CLI commands of the report stage: `report` (one model's HTML page) and `summary-page`."""

from __future__ import annotations

from pathlib import Path

from cnnvis_pipeline.errors import CnnvisError


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise CnnvisError(f"{flag}: expected NAME=PATH, got {item!r}")
        out[key] = path
    return out


def _report(args) -> int:
    from cnnvis_pipeline.reports.html import build_model_report
    from cnnvis_pipeline.settings import Job

    job = Job.from_json(args.spec)
    root = Path(args.results)
    out = build_model_report(
        args.model, {layer: root / layer for layer in args.layers}, args.out,
        top_images=job.report.top_images, iou_figure=args.iou_figure, prepared=args.prepared,
        dataset_name=args.dataset_name, spec=job.model, summary_page=args.summary_page)
    print(out)
    return 0


def _summary_page(args) -> int:
    from cnnvis_pipeline.reports.html import build_summary_page

    print(build_summary_page(
        _pairs(args.reports, "--reports"), args.detectors, args.figure, args.out,
        series=_pairs(args.series, "--series"), prepared=args.prepared,
        dataset_name=args.dataset_name, units=args.units, formulas=args.formulas))
    return 0


def _method_args(p) -> None:
    p.add_argument("--prepared", default=None,
                   help="the prepared dataset (its meta.json: the Methods' dataset facts)")
    p.add_argument("--dataset-name", default=None)


def register(sub) -> None:
    p = sub.add_parser("report", help="one model's self-contained HTML report")
    p.add_argument("--model", required=True)
    p.add_argument("--results", required=True, help="results/<model>")
    p.add_argument("--layers", nargs="+", required=True)
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--iou-figure", default=None, help="where to write the IoU distribution PNG")
    p.add_argument("--summary-page", default=None,
                   help="the run's summary page (results/summary/index.html), linked from the "
                        "report")
    p.add_argument("--spec", required=True,
                   help="the job's JSON: the resolved model entry, `seed` and the config's "
                        "`report` section (settings.Job.from_spec); the dissection's settings "
                        "come from the units tables' provenance")
    _method_args(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("summary-page", help="the HTML page linking every model's report")
    p.add_argument("--reports", nargs="+", required=True, help="MODEL=path/to/index.html")
    p.add_argument("--detectors", required=True, help="results/summary/detectors.parquet")
    p.add_argument("--figure", required=True, help="results/summary/unique_detectors.png")
    p.add_argument("--series", nargs="*", default=[], help="NAME=results/summary/series_NAME.png")
    p.add_argument("--units", nargs="*", default=[],
                   help="the units tables behind the counts (their provenance)")
    p.add_argument("--formulas", nargs="*", default=[],
                   help="the layers' formulas.parquet (compositional explanations)")
    p.add_argument("--out", required=True)
    _method_args(p)
    p.set_defaults(func=_summary_page)
