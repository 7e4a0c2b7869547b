"""The cost of ablation: every unit of ResNet-18's layer4 (random weights), one at a time, on N
images, through interventions.ablation.ablation_scores (what `cnnvis ablate` runs).

    python -m cnnvis_pipeline.bench.ablation [--images 5000] [--device auto] [--batch-size 32]
        [--groups-per-pass 64] [--plain-images 4 --plain-units 16] [--threads N]

Images are seeded random 224 x 224 RGB images with random classes of the 1000 outputs (the
cost does not depend on the pixels). It measures:
- at the layer (the design): the images run once up to layer4, whose output is repeated per
  ablated unit; only avgpool + fc run per unit;
- plain (for comparison, on `--plain-images` x `--plain-units`): the input repeated per unit,
  the whole network per ablation;
and reports images x units per second of each, and an estimate for 50,000 images on one GPU from
the FLOP count (multiply-adds x 2) at an assumed sustained rate (`--gpu-tflops`, default 25: a
conservative fp32 rate of an A100/H100-class GPU; data loading not included).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cnnvis_pipeline.bench.common import device_name, log
from cnnvis_pipeline.interventions.ablation import Group, ablation_scores
from cnnvis_pipeline.interventions.classdata import ClassData
from cnnvis_pipeline.models.input import pick_device

LAYER = "layer4"
UNITS = 512
CLASSES = 1000


def random_images(n: int, seed: int = 0, size: int = 224) -> ClassData:
    """n seeded random images (each drawn from its own index), one random class each."""
    labels = np.random.default_rng(seed).integers(0, CLASSES, n)
    targets = np.zeros((n, CLASSES), bool)
    targets[np.arange(n), labels] = True

    def read(rows, device):
        out = []
        for i in rows:
            g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
            out.append(torch.rand(3, size, size, generator=g))
        return torch.stack(out).to(device)

    return ClassData(names=[str(k) for k in range(CLASSES)], outputs=np.arange(CLASSES),
                     targets=targets, related=[frozenset()] * CLASSES, multi_label=False,
                     read=read, source="random")


def resnet18_macs(size: int = 224) -> tuple[float, float]:
    """(multiply-adds of one image up to layer4's output, of avgpool + fc after it), counted
    with forward hooks on the convolutions and the linear layer."""
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    macs = {"prefix": 0.0, "tail": 0.0}

    def conv_hook(m, _i, out):
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs["prefix"] += out.numel() * k

    def fc_hook(m, _i, out):
        macs["tail"] += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(fc_hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    macs["tail"] += UNITS * 7 * 7  # the average pool's additions
    return macs["prefix"], macs["tail"]


def measure(model, data: ClassData, units: int, *, device, batch_size: int,
            groups_per_pass: int, at_layer: bool) -> tuple[float, float]:
    """(wall, process CPU) seconds of ablation_scores for the first `units` units of layer4,
    one at a time (on a shared machine the CPU seconds are the steadier measure)."""
    groups = [Group("unit", (u,), None, None, False) for u in range(units)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    ablation_scores(model, data, LAYER, groups, mean=[0.485, 0.456, 0.406],
                    std=[0.229, 0.224, 0.225], device=device, metric="accuracy",
                    batch_size=batch_size, groups_per_pass=groups_per_pass, at_layer=at_layer)
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--groups-per-pass", type=int, default=64)
    p.add_argument("--plain-images", type=int, default=4)
    p.add_argument("--plain-units", type=int, default=16)
    p.add_argument("--gpu-tflops", type=float, default=25.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    import torchvision

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    data = random_images(args.images)
    log(f"ablation of {UNITS} units of resnet18 {LAYER} on {args.images} images, "
        f"{device_name(device)}, {torch.get_num_threads()} threads")
    fast, fast_cpu = measure(model, data, UNITS, device=device, batch_size=args.batch_size,
                   groups_per_pass=args.groups_per_pass, at_layer=True)
    small = random_images(args.plain_images)
    plain, plain_cpu = measure(model, small, args.plain_units, device=device,
                    batch_size=args.batch_size, groups_per_pass=args.groups_per_pass,
                    at_layer=False)
    prefix, tail = resnet18_macs()
    flops_50k = 2 * 50_000 * (prefix + UNITS * tail)
    out = {
        "device": device_name(device), "threads": torch.get_num_threads(),
        "images": args.images, "units": UNITS, "seconds_at_layer": fast,
        "cpu_seconds_at_layer": fast_cpu,
        "image_units_per_s_at_layer": args.images * UNITS / fast,
        "plain_images": args.plain_images, "plain_units": args.plain_units,
        "seconds_plain": plain, "cpu_seconds_plain": plain_cpu,
        "image_units_per_s_plain": args.plain_images * args.plain_units / plain,
        "macs_prefix_per_image": prefix, "macs_tail_per_ablation": tail,
        "gflop_50k_images_all_units": flops_50k / 1e9,
        "gpu_estimate_s_50k": flops_50k / (args.gpu_tflops * 1e12),
        "gpu_tflops_assumed": args.gpu_tflops,
    }
    print(f"at the layer: {out['image_units_per_s_at_layer']:,.0f} images x units / s "
          f"({args.images} x {UNITS} in {fast:.1f} s; {fast_cpu:.1f} s of process CPU time)")
    print(f"plain (input repeated): {out['image_units_per_s_plain']:,.1f} images x units / s "
          f"({args.plain_images} x {args.plain_units} in {plain:.1f} s; {plain_cpu:.1f} s CPU)")
    print(f"FLOPs: {2 * prefix / 1e9:.2f} GFLOP per image up to {LAYER}, "
          f"{2 * tail / 1e6:.2f} MFLOP per ablation after it; 50,000 images x {UNITS} units = "
          f"{flops_50k / 1e12:.0f} TFLOP: {out['gpu_estimate_s_50k']:.0f} s at "
          f"{args.gpu_tflops:g} TFLOP/s (plain: "
          f"{2 * 50_000 * UNITS * (prefix + tail) / (args.gpu_tflops * 1e12) / 3600:.1f} h)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
