"""Peak resident memory of the interventions' and a segmenter's jobs, each a child process.

    python -m cnnvis_pipeline.bench.memory_interventions --images 600 [--jobs ablation
        adversarial segment] [--layers layer3 layer4] [--batch-sizes 16 64]

On the benchmark's broden-big dataset (as `python -m cnnvis_pipeline.bench.memory`): dissects a
seeded random ResNet-18's layers once (in process, statistics off), then runs the rules'
commands as measured children (bench.memory.run_measured: the child's own peak RSS) and prints
one JSON object per job with the plan's estimate (plan_interventions.py) beside it:
- `cnnvis ablate` on an ImageFolder of `--classes` folders x `--per-class` images (links to the
  dataset's images; a class index to the model's first outputs);
- `cnnvis attack` on the first `--attack-images` images, `--steps` PGD steps;
- `cnnvis segment` (one shard) with torchvision's LR-ASPP MobileNetV3 or FCN-ResNet50
  (`--segmenter`; random weights, 21 classes) on the dataset's images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cnnvis_pipeline.bench.common import DEFAULT_CACHE, ensure_dataset, log
from cnnvis_pipeline.bench.memory import run_measured

CNNVIS = [sys.executable, "-m", "cnnvis_pipeline"]
SEGMENTER_KWARGS = {"weights": None, "weights_backbone": None, "num_classes": 21}


def _config(data: dict, layers: list[str], batch: int, **sections) -> dict:
    return {"seed": 0, "dataset": {"path": data["broden"]},
            "models": {"r18": {"torchvision": "resnet18", "weights": None, "layers": layers}},
            "dissection": {"statistics": {"enabled": False}},
            "resources": {"batch_size": batch, "device": "cpu", "shards": 1}, **sections}


def _jpgs(data: dict) -> list[str]:
    return sorted(str(p) for p in Path(data["broden"], "images").rglob("*.jpg"))


def _planned(config: dict, tmp: Path, rule: str, layer: str = "", part: str = ""):
    """The plan's job (the dataset's size from its index.csv)."""
    from cnnvis_pipeline.config import model_specs
    from cnnvis_pipeline.plan import workflow_plan

    config = dict(config, data_root=str(tmp / "root"))
    jobs = workflow_plan(config, model_specs(config), cache_dir=tmp / "shapes")
    return next(j for j in jobs if (j.rule, j.layer, j.part) == (rule, layer, part))


def _row(planned, measured: dict, **what) -> dict:
    out = dict(what, peak_rss_mb=measured["peak_rss_mb"], wall_s=measured["wall_s"],
               rc=measured["rc"], plan_mb=planned.mem_mb,
               ratio=round(planned.mem_mb / measured["peak_rss_mb"], 2),
               parts={k: round(v) for k, v in planned.parts.items()})
    if measured["rc"]:
        out["stderr_tail"] = measured["stderr_tail"]
    log(json.dumps(out))
    return out


def _intervention(args, data: dict, tmp: Path, section: str, layer: str, batch: int) -> dict:
    from cnnvis_pipeline.config import model_specs
    from cnnvis_pipeline.settings import job_spec

    if section == "ablation":
        root, jpgs = tmp / "classes", _jpgs(data)
        for c in range(args.classes):
            (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
            for j in range(args.per_class):
                link = root / f"c{c:04d}" / f"{j}.jpg"
                if not link.exists():
                    os.symlink(jpgs[(c * args.per_class + j) % len(jpgs)], link)
        (tmp / "classes.json").write_text(json.dumps({f"c{c:04d}": c
                                                      for c in range(args.classes)}))
        body = {"models": {"r18": {"images": str(root), "classes": str(tmp / "classes.json")}},
                "limit": args.per_class, "replicates": 50,
                "groups_per_pass": args.groups_per_pass}
    else:
        body = {"images": args.attack_images, "steps": args.steps}
    config = _config(data, args.layers, batch, **{section: body})
    spec = job_spec(dict(model_specs(config)["r18"], name="r18"), config,
                    (section, "resources", "dissection"))
    work = tmp / f"{section}-{layer}-{batch}"
    shutil.copytree(tmp / "dissected" / layer, work, dirs_exist_ok=True)
    measured = run_measured([*CNNVIS, "ablate" if section == "ablation" else "attack",
                             "--prepared", data["prepared"], "--spec", json.dumps(spec),
                             "--layer", layer, "--layer-dir", str(work), "--threads", "1"])
    return _row(_planned(config, tmp, f"{section}_layer", layer), measured,
                job=f"{section}_layer", layer=layer, batch_size=batch)


def _segment(args, data: dict, tmp: Path, batch: int) -> dict:
    images = tmp / "segment-images"
    images.mkdir(exist_ok=True)
    for i, src in enumerate(_jpgs(data)[:args.segment_images]):
        if not (images / f"{i:05d}.jpg").exists():
            os.symlink(src, images / f"{i:05d}.jpg")
    (tmp / "channels.csv").write_text("channel,name,category\n" + "".join(
        f"{c},thing{c},object\n" for c in range(1, 21)))
    dataset = {"segmenter": {"images": str(images), "classes": str(tmp / "channels.csv"),
                             "factory": f"torchvision.models.segmentation:{args.segmenter}",
                             "kwargs": SEGMENTER_KWARGS}}
    out = tmp / f"segment-{batch}"
    shutil.rmtree(out, ignore_errors=True)
    measured = run_measured([*CNNVIS, "segment", "--dataset", json.dumps(dataset), "--shard",
                             "0", "--shards", "1", "--device", "cpu", "--batch-size",
                             str(batch), "--out", str(out)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    config = dict(_config(data, args.layers, batch), dataset=dataset)
    return _row(_planned(config, tmp, "segment_shard", part="0"), measured,
                job="segment_shard", batch_size=batch)


def measure(args) -> list[dict]:
    from cnnvis_pipeline.config import model_specs
    from cnnvis_pipeline.dissection.pipeline import dissect
    from cnnvis_pipeline.settings import Job, job_spec

    data = ensure_dataset(Path(args.cache), args.images, args.size, args.seed, None)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as name:
        tmp = Path(name)
        if {"ablation", "adversarial"} & set(args.jobs):
            config = _config(data, args.layers, 32)
            spec = job_spec(dict(model_specs(config)["r18"], name="r18"), config,
                            ("dissection", "resources"))
            dissect(Job.from_spec(spec), data["prepared"], tmp / "dissected", progress=False)
        for batch in args.batch_sizes:
            for section in ("ablation", "adversarial"):
                if section in args.jobs:
                    rows += [_intervention(args, data, tmp, section, layer, batch)
                             for layer in args.layers]
            if "segment" in args.jobs:
                rows.append(_segment(args, data, tmp, batch))
    return [dict(r, images=args.images, cpus=os.cpu_count()) for r in rows]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", nargs="+", choices=["ablation", "adversarial", "segment"],
                   default=["ablation", "adversarial", "segment"])
    p.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--classes", type=int, default=20, help="ablation: class folders")
    p.add_argument("--per-class", type=int, default=5, help="ablation: images per class")
    p.add_argument("--groups-per-pass", type=int, default=32, help="ablation.groups_per_pass")
    p.add_argument("--attack-images", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="PGD steps")
    p.add_argument("--segment-images", type=int, default=64)
    p.add_argument("--segmenter", default="lraspp_mobilenet_v3_large",
                   choices=["lraspp_mobilenet_v3_large", "fcn_resnet50"],
                   help="torchvision's segmentation model (random weights, 21 classes)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--scratch", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    for row in measure(parse_args(argv)):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
