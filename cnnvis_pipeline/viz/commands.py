"""CLI command of the visualisation stage: `visualize` (one layer of one model; the workflow's
`visualize_layer` rule)."""

from __future__ import annotations


def _visualize(args) -> int:
    from cnnvis_pipeline.settings import Job
    from cnnvis_pipeline.viz.visualize import run_visualize

    job = Job.from_json(args.spec)
    m = run_visualize(job, args.prepared, args.layer, args.layer_dir,
                      threads=args.threads or job.resources.threads)
    per = m["per_unit_s"]
    print(f"{m['model']} {m['layer']}: {len(m['units'])} units on {m['device']}; per unit: "
          f"activation maximisation {per['activation_max']:.2f}s, DeconvNet "
          + (f"{per['deconvnet']:.2f}s" if per["deconvnet"] is not None else "refused")
          + f"; inversion {per['inversion_per_image']:.2f}s per image")
    if m["deconv_error"]:
        print(f"DeconvNet: {m['deconv_error']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("visualize", help="top images with masks, activation maximisation, "
                       "DeconvNet and inversion for the selected units of one layer")
    p.add_argument("--prepared", required=True, help="prepared dataset directory")
    p.add_argument("--spec", required=True,
                   help="the job as JSON: the model entry, seed, views, report, resources")
    p.add_argument("--layer", required=True)
    p.add_argument("--layer-dir", required=True,
                   help="results/<model>/<layer>: reads the dissection tables, writes viz/ and "
                        "activation_max/inversion.parquet")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="(no progress bars are drawn)")
    p.set_defaults(func=_visualize)
