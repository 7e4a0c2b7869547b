"""CLI commands of the interventions: `ablate` and `attack` (one layer of one model each; the
workflow's `ablation_layer` and `adversarial_layer` rules)."""

from __future__ import annotations


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


def _ablate(args) -> int:
    from cnnvis_pipeline.interventions.stages import run_ablation
    from cnnvis_pipeline.settings import Job

    job = Job.from_json(args.spec)
    _threads(args.threads)
    table = run_ablation(job, args.prepared, args.layer, args.layer_dir)
    single = table[table["kind"] == "unit"]
    worst = single.loc[single["change"].idxmin()] if single["change"].notna().any() else None
    print(f"{job.name} {args.layer}: {table['group'].nunique()} ablations x "
          f"{table['class'].nunique()} classes"
          + ("" if worst is None else f"; largest drop: unit {int(worst['unit'])} on "
             f"{worst['class']} ({worst['change']:+.3f} {worst['metric']})"))
    return 0


def _attack(args) -> int:
    from cnnvis_pipeline.interventions.stages import run_adversarial
    from cnnvis_pipeline.settings import Job

    job = Job.from_json(args.spec)
    _threads(args.threads)
    units, concepts = run_adversarial(job, args.prepared, args.layer, args.layer_dir)
    for name, u in units.groupby("attack", sort=False):
        lost = concepts.loc[concepts["attack"] == name, "detectors_lost"].sum()
        print(f"{job.name} {args.layer} {name}: {u['flip_rate'].iloc[0]:.0%} predictions flip; "
              f"{int(lost)} of {int(u['detector'].sum())} detectors stop detecting")
    return 0


def _common(p, what: str) -> None:
    p.add_argument("--prepared", required=True, help="prepared dataset directory (or receipt)")
    p.add_argument("--spec", required=True,
                   help=f"the job as JSON: the model entry, seed, dissection, resources, {what}")
    p.add_argument("--layer", required=True)
    p.add_argument("--layer-dir", required=True,
                   help="results/<model>/<layer>: reads the dissection tables, writes the "
                        f"{what} tables and figure")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def register(sub) -> None:
    p = sub.add_parser("ablate", help="ablate each unit (and each concept's top detectors) of "
                       "one layer; the change of every class's score")
    _common(p, "ablation")
    p.set_defaults(func=_ablate)
    p = sub.add_parser("attack", help="FGSM/PGD on the dissection images; each unit's "
                       "activation and IoU with its label, clean and attacked")
    _common(p, "adversarial")
    p.set_defaults(func=_attack)
