"""CLI commands of the dissection stage: train (synthnet), check-model, extract, tables (a
layer's thresholds, tally and tables from every shard, or from its unit parts), layer-units
(one part of a layer's units), summary, dissect (one process),
compositional (formulas of one shard of a layer's units), formulas (their merge), segment (a
segmentation model's labels of one shard of a `segmenter:` dataset) and plan (the resources of
every job of a run).

`--spec` is the job's JSON (cnnvis_pipeline.settings), parsed once into a typed Job."""

from __future__ import annotations

import json

from cnnvis_pipeline.dissection import compositional, parts, pipeline
from cnnvis_pipeline.fileio import atomic_file
from cnnvis_pipeline.settings import Job


def _job(args) -> Job:
    return Job.from_json(args.spec)


def _train(args) -> int:
    import torch

    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models.check import train_num_classes
    from cnnvis_pipeline.models.synthnet import train_synthnet

    job = _job(args)
    spec = job.model
    train = dict(spec.get("train") or {})
    ds = PreparedDataset(args.prepared)
    train_num_classes(spec, ds)  # a kwargs.num_classes that disagrees with the category: refused
    # What the spec leaves out takes train_synthnet's defaults; the seed is the run's.
    kw = {k: train[k] for k in ("epochs", "batch_size", "lr", "category") if k in train}
    if "width" in spec.get("kwargs", {}):
        kw["width"] = spec["kwargs"]["width"]
    model, history, names = train_synthnet(
        ds, seed=job.seed, mean=spec["mean"], std=spec["std"],
        progress=not args.quiet, **kw,
    )
    with atomic_file(args.out) as tmp:
        torch.save(model.state_dict(), tmp)
    loss, acc, val = history[-1]
    print(f"trained {spec.get('name')}: {len(names)} classes, final loss {loss:.3f}, "
          f"train acc {acc:.3f}, val acc {val:.3f}")
    return 0


def _segment(args) -> int:
    from cnnvis_pipeline.dissection.segment import segment_shard

    out = segment_shard(json.loads(args.dataset), args.out, shard=args.shard, shards=args.shards,
                        device=args.device, batch_size=args.batch_size)
    print(out)
    return 0


def _check(args) -> int:
    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.fileio import write_text
    from cnnvis_pipeline.models.check import check_model

    summary = check_model(_job(args).model, PreparedDataset(args.prepared))
    write_text(args.out, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"{summary['model']}: {len(summary['layers'])} layer(s) checked: "
          + ", ".join(f"{k} {v['feature_map']}" for k, v in summary["layers"].items()))
    return 0


def _tables(args) -> int:
    if args.extracts:
        pipeline.run_layers(_job(args), args.prepared, args.extracts, args.out_dir, args.layers,
                            progress=not args.quiet)
    else:
        parts.run_merge(_job(args), args.prepared, args.parts, args.out_dir, args.layers)
    return 0


def _plan(args) -> int:
    from cnnvis_pipeline import plan
    from cnnvis_pipeline.config import model_specs

    config = plan.load_config(args.configfile)
    jobs = plan.workflow_plan(config, model_specs(config), cores=args.cores,
                              cache_dir=args.cache)
    print(plan.format_plan(jobs, plan.dataset_size(config)))
    limit = config["resources"].get("max_mem_mb")
    for line in plan.over_limit(jobs, limit, "resources.max_mem_mb"):
        print(f"over the limit: {line}")
    return 0


def register(sub) -> None:
    def add(name, help_, func, *, spec=True, prepared=True):
        p = sub.add_parser(name, help=help_)
        if spec:
            p.add_argument("--spec", required=True,
                           help="the job as JSON: the resolved model entry with its name, the "
                                "run's seed and the config sections the stage reads")
        if prepared:
            p.add_argument("--prepared", required=True, help="prepared dataset directory")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    p = add("train", "train the built-in synthnet on a prepared dataset", _train)
    p.add_argument("--out", required=True, help="state dict file to write")

    p = add("check-model", "build a model and check all its layers, units and class count on "
            "one dataset image (before any other job of the model)", _check)
    p.add_argument("--out", required=True, help="JSON summary to write")

    p = add("extract", "forward pass over one shard; float16 activations + histograms",
            lambda a: pipeline.run_extract(_job(a), a.prepared, a.shard, a.shards, a.out,
                                           progress=not a.quiet) and 0)
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--out", required=True, help="shard directory to write")

    p = add("tables", "a layer's thresholds, tally and tables from every shard's extraction "
            "(--extracts), or from its unit parts (--parts, of layer-units)", _tables)
    p.add_argument("--layers", nargs="+", default=None, help="only these layers")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--extracts", nargs="+", help="every shard's extract directory")
    source.add_argument("--parts", nargs="+", help="every unit part of one layer (layer-units)")
    p.add_argument("--out-dir", required=True, help="results/<model>")

    p = add("layer-units", "one part of a layer's units: thresholds, tally, significance and top "
            "images of those units only, for `tables --parts`",
            lambda a: parts.run_unit_part(_job(a), a.prepared, a.extracts, a.layer, a.part,
                                          a.parts, a.out, progress=not a.quiet) and 0)
    p.add_argument("--layer", required=True)
    p.add_argument("--extracts", nargs="+", required=True, help="every shard's extract directory")
    p.add_argument("--part", type=int, required=True, help="which part of the units")
    p.add_argument("--parts", type=int, required=True, help="parts the units are split into")
    p.add_argument("--out", required=True, help="the part's .npz to write")

    p = add("summary", "detectors per model, layer and category over all models",
            lambda a: pipeline.run_summary(a.units, a.out, a.figure,
                                           json.loads(a.series) if a.series else None,
                                           a.prepared) is None,
            spec=False, prepared=False)
    p.add_argument("--prepared", default=None,
                   help="the prepared dataset: every one of its categories gets a row")
    p.add_argument("--units", nargs="+", required=True, help="units.parquet files")
    p.add_argument("--out", required=True)
    p.add_argument("--figure", default=None)
    p.add_argument("--series", default=None,
                   help='checkpoint series as JSON: {"<series>": {"models": [<model per '
                        'checkpoint, in order>], "figure": "<png to write>"}}')

    p = add("dissect", "the whole dissection of one model in one process",
            lambda a: pipeline.dissect(_job(a), a.prepared, a.out_dir, keep_on_device=False,
                                       scratch=a.scratch, progress=not a.quiet) and 0)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--scratch", required=True, help="directory for the float16 activations")

    p = add("plan", "memory, disk and time of every job of a run, before it runs", _plan,
            spec=False, prepared=False)
    p.add_argument("--configfile", required=True, help="the run's config (as for snakemake)")
    p.add_argument("--cores", type=int, default=1, help="cores of the run (CPU time)")
    p.add_argument("--cache", default=".snakemake/cnnvis/plan", help="where layer shapes are cached")

    p = add("compositional", "compositional explanations (formulas of concepts) of one shard of "
            "a layer's units",
            lambda a: compositional.run_compositional(
                _job(a), a.prepared, a.extracts, a.thresholds, a.layer, a.shard, a.shards,
                a.out, progress=not a.quiet) and 0)
    p.add_argument("--layer", required=True)
    p.add_argument("--extracts", nargs="+", required=True, help="every shard's extract directory")
    p.add_argument("--thresholds", required=True, help="the layer's thresholds.parquet")
    p.add_argument("--shard", type=int, required=True, help="which part of the units")
    p.add_argument("--shards", type=int, required=True, help="parts the units are split into")
    p.add_argument("--out", required=True, help="partial formulas table to write")

    p = add("segment", "label one shard of a `segmenter:` dataset's images by the model's "
            "argmax per pixel (docs/DATA_SOURCES.md)", _segment, spec=False, prepared=False)
    p.add_argument("--dataset", required=True, help="the config's `dataset` mapping as JSON")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="shard directory to write")

    p = add("formulas", "merge the unit shards' formulas into one formulas.parquet",
            lambda a: compositional.run_formulas(a.parts, a.out) and 0, spec=False,
            prepared=False)
    p.add_argument("--parts", nargs="+", required=True, help="the shards' partial tables")
    p.add_argument("--out", required=True, help="formulas.parquet to write")
