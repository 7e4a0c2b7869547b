"""synthnet: the small reference CNN of the embedded default, and its training on broden-synth.

- SynthNet: conv/batch-norm/ReLU/max-pool features (named modules, nn.ReLU so deconvnet works), a linear
  classifier on global max pooling (presence of each object anywhere in the image).
- train_synthnet(dataset, ...): seeded multi-label object classification on the train split;
  returns the trained model and per-epoch (loss, train accuracy, val accuracy) per label.

`dataset` is a prepared dataset (data.prepared.PreparedDataset, or anything with its categories,
concepts, slots, present, meta and batch()); models/ imports no stage.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.input import images_to_input

log = logging.getLogger(__name__)


class SynthNet(nn.Module):
    def __init__(self, num_classes: int = 9, width: int = 32):
        super().__init__()
        w = width
        layers: list[tuple[str, nn.Module]] = []
        channels = [3, w, 2 * w, 2 * w, 2 * w]
        for k in range(1, 5):
            layers += [
                (f"conv{k}", nn.Conv2d(channels[k - 1], channels[k], 3, padding=1)),
                (f"bn{k}", nn.BatchNorm2d(channels[k])),
                (f"relu{k}", nn.ReLU(inplace=True)),
            ]
            if k in (1, 2):
                layers.append((f"pool{k}", nn.MaxPool2d(2)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def class_targets(dataset, category: str) -> tuple[np.ndarray, list[str]]:
    """Multi-hot [N, K] presence of each label of `category` per image, and the class names.

    Images not annotated for the category get -1 rows (excluded from training)."""
    if category not in dataset.categories:
        raise CnnvisError(f"train: the dataset has no category {category!r} to train on")
    cat = dataset.categories.index(category)
    concept_ids = np.flatnonzero(dataset.concept_category == cat)
    names = [dataset.concepts[i]["name"] for i in concept_ids]
    position = {int(c): k for k, c in enumerate(concept_ids)}
    targets = np.zeros((len(dataset), len(names)), np.float32)
    for i, row in enumerate(dataset.slots):
        for c in row:
            if int(c) in position:
                targets[i, position[int(c)]] = 1
    targets[~dataset.present[:, cat]] = -1
    return targets, names


def train_synthnet(dataset, *, epochs: int = 12, batch_size: int = 16,
                   lr: float = 0.003, seed: int = 0, width: int = 32, mean=None, std=None,
                   category: str = "object", progress: bool = True):
    """Multi-label classification of the labels of `category` present in each image (BCE)."""
    torch.manual_seed(seed)
    targets, names = class_targets(dataset, category)
    splits = np.array(dataset.meta["splits"])
    annotated = targets[:, 0] >= 0
    train_idx = np.flatnonzero((splits == "train") & annotated)
    val_idx = np.flatnonzero((splits == "val") & annotated)
    if len(train_idx) == 0:
        raise CnnvisError(f"train: no training images with a {category} label")
    model = SynthNet(len(names), width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    rng = np.random.default_rng(seed)
    device = torch.device("cpu")
    history = []
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(train_idx)
        total, correct, loss_sum, seen = 0, 0, 0.0, 0
        for start in tqdm(range(0, len(order), batch_size), desc=f"train epoch {epoch + 1}",
                          disable=not progress, mininterval=2):
            idx = np.sort(order[start : start + batch_size])
            x = images_to_input(dataset.batch(idx).images, None, mean, std, device)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            y = torch.from_numpy(targets[idx])
            out = model(x)
            loss = nn.functional.binary_cross_entropy_with_logits(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int(((out.detach() > 0) == (y > 0.5)).sum())
            total += y.numel()
            seen += len(idx)
        sched.step()
        val_acc = evaluate(model, dataset, val_idx, targets, mean, std) if len(val_idx) else float("nan")
        history.append((loss_sum / seen, correct / total, val_acc))
        spent = time.monotonic() - started
        log.info("epoch %d/%d: loss %.3f train acc %.3f val acc %.3f (%.0f s, ETA %.0f s)",
                 epoch + 1, epochs, *history[-1], spent, spent / (epoch + 1) * (epochs - epoch - 1))
    return model.eval(), history, names


@torch.no_grad()
def evaluate(model, dataset, idx, targets, mean, std, batch_size: int = 128) -> float:
    model.eval()
    correct, total = 0, 0
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        x = images_to_input(dataset.batch(part).images, None, mean, std, torch.device("cpu"))
        y = torch.from_numpy(targets[part])
        correct += int(((model(x) > 0) == (y > 0.5)).sum())
        total += y.numel()
    return correct / max(total, 1)
