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

    python -m cnnvis_pipeline.bench.am --known [--steps 512 --size 128 --presets default,lucid]

benchmark_known_optima(...) -> pandas.DataFrame, one row per (preset, kind, pool, unit): units
whose optimum is known (linear colour units: a uniform frame of the best corner of the colour
cube; Gabor units: a grating, the best of a small search), ReLU and global average or max
pooling; `ratio` = the AM image's activation / that optimum.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import nn

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


# Units with a known optimum: colour directions w (on the normalised image) and bias.
KNOWN_COLOURS = {"red": ((1.0, -0.5, -0.5), 0.1), "yellow": ((1.0, 1.0, -1.0), 0.1),
                 "dark": ((-1.0, -1.0, -1.0), 0.1), "desaturated": ((0.3, -0.2, 0.1), 0.1)}
GABOR_THETAS = (0.0, 45.0, 60.0, 90.0)  # degrees; 9 x 9 Gabor, period 6, sigma 2.5


def _gabor(theta: float, k: int = 9, period: float = 6.0, sigma: float = 2.5) -> torch.Tensor:
    r = torch.arange(k, dtype=torch.float64) - k // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    t = np.radians(theta)
    g = torch.exp(-(x**2 + y**2) / (2 * sigma**2)) * torch.cos(
        2 * np.pi * (x * np.cos(t) + y * np.sin(t)) / period)
    return (g - g.mean()).float()


def _known_nets(mean, std) -> dict:
    """{(kind, pool): (net, unit names, optimum per unit)}: linear colour units (optimum: the
    best corner of the colour cube as a uniform frame) and Gabor units (optimum: the best of
    square-wave gratings over 12 orientations, 5 periods and 8 phases), each followed by ReLU
    and global average or max pooling, fed 64 px images."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3))).view(8, 3, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    gratings = torch.stack([
        (torch.cos(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / p + ph) > 0).float()
        for a in np.radians(np.arange(0, 180, 15)) for p in (5.0, 5.5, 6.0, 6.5, 7.0)
        for ph in np.linspace(0, 2 * np.pi, 8, endpoint=False)])[:, None].expand(-1, 3, 64, 64)
    out = {}
    colour = nn.Conv2d(3, len(KNOWN_COLOURS), 1)
    gabor = nn.Conv2d(3, len(GABOR_THETAS), 9)
    with torch.no_grad():
        for u, (w, b) in enumerate(KNOWN_COLOURS.values()):
            colour.weight[u, :, 0, 0] = torch.tensor(w)
            colour.bias[u] = b
        for u, t in enumerate(GABOR_THETAS):
            gabor.weight[u] = _gabor(t)[None].expand(3, 9, 9)
        gabor.bias.zero_()
    for pool in ("avg", "max"):
        for kind, conv, probes, names in (
                ("colour", colour, corners.expand(8, 3, 64, 64), list(KNOWN_COLOURS)),
                ("gabor", gabor, gratings, [f"theta {t:g}" for t in GABOR_THETAS])):
            net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1) if pool == "avg"
                                else nn.AdaptiveMaxPool2d(1)).eval()
            with torch.no_grad():
                best = torch.cat([net((p - m) / s).flatten(1) for p in probes.split(64)]).amax(0)
            out[(kind, pool)] = (net, names, best)
    return out


def benchmark_known_optima(*, presets=("default", "lucid"), steps: int = 512, size: int = 128,
                           lr: float = 0.05, seed: int = 0,
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> pd.DataFrame:
    """Per (preset, kind, pool, unit): the activation of the unit's AM image (fed at 64 px) over
    its known optimum (_known_nets), and the image's mean colour."""
    rows = []
    for (kind, pool), (net, names, best) in _known_nets(list(mean), list(std)).items():
        for preset in presets:
            images, acts = activation_maximization(
                net, "2", range(len(names)), steps=steps, size=size, lr=lr, seed=seed,
                preset=preset, input_size=64, mean=list(mean), std=list(std))
            for u, name in enumerate(names):
                rows.append({"preset": preset, "kind": kind, "pool": pool, "unit": name,
                             "steps": steps, "size": size, "achieved": float(acts[u]),
                             "optimum": float(best[u]), "ratio": float(acts[u] / best[u]),
                             "mean_rgb": tuple(round(v, 2) for v in
                                               images[u].mean(dim=(1, 2)).tolist())})
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
    p.add_argument("--known", action="store_true",
                   help="units with a known optimum instead of a dissected layer")
    p.add_argument("--prepared")
    p.add_argument("--spec", help="resolved model spec as JSON")
    p.add_argument("--layer")
    p.add_argument("--layer-dir")
    p.add_argument("--steps", type=int, default=None, help="default 96 (--known: 512)")
    p.add_argument("--size", type=int, default=None, help="default 64 (--known: 128)")
    p.add_argument("--presets", default="default,lucid")
    p.add_argument("--top-units", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the per-unit rows here (CSV)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = [s for s in args.presets.split(",") if s]
    if args.known:
        df = benchmark_known_optima(presets=presets, steps=args.steps or 512,
                                    size=args.size or 128)
        table = df.groupby(["preset", "kind", "pool"], sort=False)["ratio"].agg(
            ["min", "median"]).reset_index()
    else:
        missing = [k for k in ("prepared", "spec", "layer", "layer_dir")
                   if getattr(args, k) is None]
        if missing:
            raise CnnvisError(f"am_bench: give --known or all of --prepared --spec --layer "
                              f"--layer-dir (missing: {', '.join(missing)})")
        from cnnvis_pipeline.models.registry import build_model

        spec = json.loads(args.spec)
        model, _info = build_model(spec["name"], spec)
        df = benchmark_presets(model.eval(), spec, args.prepared, args.layer, args.layer_dir,
                               presets=presets, steps=args.steps or 96, size=args.size or 64,
                               top_units=args.top_units)
        table = summarise(df)
    if args.out:
        df.to_csv(args.out, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except CnnvisError as e:
        raise SystemExit(f"error: {e}") from None
