"""CLI command of the visualisation stage: `visualize` (one layer of one model; the workflow's
`visualize_layer` rule)."""

from __future__ import annotations


def _visualize(args) -> int:
    from cnnvis_pipeline.settings import Job
    from cnnvis_pipeline.viz.visualize import run_visualize

    m = run_visualize(Job.from_json(args.spec), args.prepared, args.layer, args.layer_dir,
                      threads=args.threads)
    n = max(1, len(m["units"]))
    parts = []
    for name in m["order"]:
        v = m["views"][name]
        parts.append(f"{v['title']} " + (v["note"] if v["note"] else f"{v['seconds']:.2f}s"))
    print(f"{m['model']} {m['layer']}: {n} units on {m['device']}; " + "; ".join(parts))
    return 0


def register(sub) -> None:
    p = sub.add_parser("visualize", help="top images with masks, activation maximisation, "
                       "DeconvNet and inversion for the selected units of one layer")
    p.add_argument("--prepared", required=True, help="prepared dataset directory")
    p.add_argument("--spec", required=True,
                   help="the job's JSON: the resolved model entry, `seed`, and the config's "
                        "`views` and `resources` sections (settings.Job.from_spec); the "
                        "dissection's settings come from the tables' provenance")
    p.add_argument("--layer", required=True)
    p.add_argument("--layer-dir", required=True,
                   help="results/<model>/<layer>: reads the dissection tables, writes viz/ and "
                        "the views' tables")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default resources.threads; the rule passes its own)")
    p.add_argument("--quiet", action="store_true", help="(no progress bars are drawn)")
    p.set_defaults(func=_visualize)
