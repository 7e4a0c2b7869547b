"""Activation maximisation presets side by side on a dissected layer: how close each gets to the
best natural image, and what it costs.

    python -m cnnvis_pipeline.bench.am --prepared P --spec JSON --layer-dir D --layer L \
        [--steps 96 --size 64 --presets default,lucid --top-units 16 --threads 1]

benchmark_presets(model, spec, prepared, layer, layer_dir, ...) -> pandas.DataFrame, one row per
(preset, unit): model, layer, unit, preset, steps, size, achieved_activation,
dataset_top_activation, activation_ratio, cpu_s_per_unit, wall_s_per_unit. The units are those the
report visualises (viz.selection.select_units on the layer's units.parquet, plus the model's
`units:`); the dataset top is the highest `max_activation` in top_images.parquet; achieved is the
maximum of the unit's map on its AM image fed at the dataset's input size, as run_visualize
measures it. The costs are the whole batch's CPU and wall seconds divided by the number of units.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.viz._common import frozen_eval, layer_forward, preprocess
from cnnvis_pipeline.viz.activation_max import PRESETS, activation_maximization


def _table(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; the {what} table of the dissection is needed")
    return pq.read_table(path).to_pandas()


def benchmark_presets(model, spec: dict, prepared, layer: str, layer_dir, *,
                      presets=("default", "lucid"), steps: int = 96, size: int = 64,
                      lr: float = 0.05, seed: int = 0, top_units: int = 16) -> pd.DataFrame:
    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.viz.selection import requested_units, select_units

    layer_dir = Path(layer_dir)
    units_df = _table(layer_dir / "units.parquet", "units")
    top_df = _table(layer_dir / "top_images.parquet", "top_images")
    name = spec["name"]
    units = select_units(units_df, int(top_units), requested_units(spec, layer),
                         where=f"{name} {layer}")
    top = top_df.groupby("unit")["max_activation"].max()
    ds = PreparedDataset(prepared)
    input_size = spec.get("input_size")
    in_hw = tuple(input_size) if input_size is not None else tuple(ds.images.shape[1:3])
    mean, std = spec["mean"], spec["std"]
    rows = []
    for preset in presets:
        if preset not in PRESETS:
            raise CnnvisError(f"am_bench: unknown preset {preset!r} (one of {', '.join(PRESETS)})")
        c0, t0 = time.process_time(), time.perf_counter()
        images, _ = activation_maximization(model, layer, units, steps=steps, size=size, lr=lr,
                                            seed=seed, input_size=in_hw, mean=mean, std=std,
                                            preset=preset, model_name=name,
                                            layouts=spec.get("layouts"))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        with frozen_eval(model), torch.no_grad():
            a = layer_forward(model, layer, preprocess(images, mean, std, input_size=in_hw),
                              model_name=name, layouts=spec.get("layouts"))
            achieved = a[torch.arange(len(units)), torch.tensor(units)].amax(dim=(1, 2))
        for u, ach in zip(units, achieved.tolist(), strict=True):
            t = float(top.get(u, 0.0))
            rows.append({"model": name, "layer": layer, "unit": int(u), "preset": preset,
                         "steps": int(steps), "size": int(size), "achieved_activation": ach,
                         "dataset_top_activation": t,
                         "activation_ratio": ach / t if t > 0 else float("nan"),
                         "cpu_s_per_unit": cpu / len(units),
                         "wall_s_per_unit": wall / len(units)})
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per preset: units, min and quartiles of activation_ratio (units whose dataset top is 0
    left out), the fraction >= 1, and the mean CPU and wall seconds per unit."""
    out = []
    for preset, g in df.groupby("preset", sort=False):
        r = g["activation_ratio"].dropna().to_numpy()
        q = np.quantile(r, [0.25, 0.5, 0.75]) if len(r) else [np.nan] * 3
        out.append({"preset": preset, "units": len(g), "ever_active": len(r),
                    "ratio_min": float(r.min()) if len(r) else np.nan, "ratio_q1": q[0],
                    "ratio_median": q[1], "ratio_q3": q[2],
                    "fraction_ge_1": float((r >= 1).mean()) if len(r) else np.nan,
                    "cpu_s_per_unit": float(g.groupby(["model", "layer"])["cpu_s_per_unit"]
                                            .first().mean()),
                    "wall_s_per_unit": float(g.groupby(["model", "layer"])["wall_s_per_unit"]
                                             .first().mean())})
    return pd.DataFrame(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnnvis_pipeline.bench.am",
                                description=__doc__.splitlines()[0])
    p.add_argument("--prepared", required=True)
    p.add_argument("--spec", required=True, help="resolved model spec as JSON")
    p.add_argument("--layer", required=True)
    p.add_argument("--layer-dir", required=True)
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--presets", default="default,lucid")
    p.add_argument("--top-units", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the per-unit rows here (CSV)")
    args = p.parse_args(argv)
    from cnnvis_pipeline.models.registry import build_model

    torch.set_num_threads(args.threads)
    spec = json.loads(args.spec)
    model, _info = build_model(spec["name"], spec)
    df = benchmark_presets(model.eval(), spec, args.prepared, args.layer, args.layer_dir,
                           presets=[s for s in args.presets.split(",") if s],
                           steps=args.steps, size=args.size, top_units=args.top_units)
    if args.out:
        df.to_csv(args.out, index=False)
    print(summarise(df).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except CnnvisError as e:
        raise SystemExit(f"error: {e}") from None
