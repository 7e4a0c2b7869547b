"""A segmentation model's predictions as concept labels (data/sources/segmenter.py reads them).

segment_shard(dataset, out, shard=, shards=, device=, batch_size=): the images of shard `shard`
of a `segmenter:` dataset, each resized as the prepared arrays resize it (bilinear, PIL), fed to
the model (normalised with the spec's mean and std, default ImageNet's); the logits are resized
to the prepared segmentation size (bilinear, align_corners=False) when they are not at it, and
the argmax channel c of every pixel becomes label c + 1 when the classes CSV names channel c,
else 0. Written to `out/` (atomically): labels.npy uint16 [n, sh, sw] and info.json (the
shard's image range, the factory and the checkpoint's sha256).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnnvis_pipeline.data.sources import open_source, options
from cnnvis_pipeline.dissection.extract import shard_indices
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import atomic_dir
from cnnvis_pipeline.models import IMAGENET_MEAN, IMAGENET_STD
from cnnvis_pipeline.models.input import images_to_input, pick_device, prepare_model
from cnnvis_pipeline.models.registry import build_model


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, dict):  # torchvision's segmentation models: {"out": ..., "aux": ...}
        out = out.get("out")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise CnnvisError("config: dataset.segmenter: the model must return logits [B, K, h, w] "
                          "(or a dict with 'out')")
    return out


def segment_shard(dataset: dict, out: str | Path, *, shard: int = 0, shards: int = 1,
                  device: str = "auto", batch_size: int = 16) -> Path:
    spec = dataset["segmenter"]
    source = open_source(dataset)
    ih, iw, sh, sw = source.geometry(options(dataset).get("size"))
    idx = shard_indices(len(source), shards, shard)
    model, info = build_model("segmenter", {"factory": spec["factory"],
                                            "checkpoint": spec.get("checkpoint"),
                                            "kwargs": spec.get("kwargs") or {}})
    dev = pick_device(device)
    channels_last = prepare_model(model, dev)
    lut = None
    labels = np.zeros((len(idx), sh, sw), np.uint16)
    with torch.inference_mode():
        for lo in range(0, len(idx), batch_size):
            batch = []
            for i in idx[lo:lo + batch_size]:
                img = source.read(int(i))[0]
                if img.shape[:2] != (ih, iw):
                    img = np.asarray(Image.fromarray(img).resize((iw, ih), Image.BILINEAR))
                batch.append(img)
            x = images_to_input(np.stack(batch), None, spec.get("mean", IMAGENET_MEAN),
                                spec.get("std", IMAGENET_STD), dev, channels_last)
            y = _logits(model, x)
            if tuple(y.shape[-2:]) != (sh, sw):
                y = F.interpolate(y.float(), size=(sh, sw), mode="bilinear", align_corners=False)
            if lut is None:
                lut = _label_table(source, y.shape[1], spec["classes"])
            labels[lo:lo + len(batch)] = lut[y.argmax(1).cpu().numpy()]
    start = int(np.linspace(0, len(source), shards + 1).round()[shard])
    with atomic_dir(out) as tmp:
        np.save(tmp / "labels.npy", labels)
        (tmp / "info.json").write_text(json.dumps({
            "start": start, "stop": start + len(idx), "factory": spec["factory"],
            "checkpoint_sha256": info.get("checkpoint_sha256")}, sort_keys=True))
    return Path(out)


def _label_table(source, channels: int, classes: str) -> np.ndarray:
    """uint16 [channels]: channel c -> label c + 1 when the CSV names it, else 0."""
    named = [c.label for c in source.concepts]
    if max(named, default=0) > channels:
        raise CnnvisError(f"{classes}: names channel {max(named) - 1}, but the model has "
                          f"{channels} output channels")
    lut = np.zeros(channels, np.uint16)
    lut[np.asarray(named, np.int64) - 1] = named
    return lut
