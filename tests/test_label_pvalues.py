"""The p-value of a unit's label allows for its selection (the best of the unit's concepts).

Datasets: two pixel categories (`object`: 6 box concepts on every image; `material`: 4 box
concepts on about half the images), label maps at the segmentation size and activations
thresholded at 0.5 there (the tally's upsample is the identity), so every mask is what is
planted. Null units are random boxes drawn independently of the labels; unit 0 is exactly
concept `o0`. The reference below is numpy code of its own: masks and labels as boolean arrays,
IoU over the images annotated for the concept's category, the max statistic over all concepts
in every replicate of the null (whose draws are the package's records.null_choices: the same
permutations, so the p-values must agree exactly).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.records import ImageStats, null_choices, partner_indices
from cnnvis_pipeline.dissection.significance import significance, unit_significance_columns
from cnnvis_pipeline.dissection.stores import ActivationStore
from cnnvis_pipeline.dissection.tally import tally_shard
from cnnvis_pipeline.settings import Statistics

H = W = 12
OBJ, MAT = 6, 4


def _box(rng, lo=2, hi=7):
    side = int(rng.integers(lo, hi))
    y, x = rng.integers(0, H - side + 1, 2)
    m = np.zeros((H, W), bool)
    m[y : y + side, x : x + side] = True
    return m


def make(tmp_path, n, units, seed, material=0.5):
    """(dataset, labels bool [n, C, H, W], present bool [n, 2], activations [n, U, H, W]);
    `material`: the fraction of images annotated for material."""
    rng = np.random.default_rng(seed)
    planes = np.zeros((n, 2, H, W), np.uint16)
    present = np.ones((n, 2), bool)
    present[:, 1] = rng.random(n) < material
    for i in range(n):
        for c in rng.permutation(OBJ)[: rng.integers(1, 4)]:
            planes[i, 0][_box(rng)] = c + 1
        if present[i, 1]:
            for c in rng.permutation(MAT)[: rng.integers(1, 3)]:
                planes[i, 1][_box(rng)] = c + 1
    labels = np.concatenate([planes[:, :1] == np.arange(1, OBJ + 1)[None, :, None, None],
                             planes[:, 1:] == np.arange(1, MAT + 1)[None, :, None, None]], 1)
    acts = np.zeros((n, units, H, W), np.float16)
    acts[:, 0] = labels[:, 0]  # a planted detector of o0
    for i in range(n):
        for u in range(1, units):
            acts[i, u] = _box(rng, 2, 9)
    slots = np.full((n, OBJ + MAT), -1, np.int32)
    for i in range(n):
        have = np.flatnonzero(labels[i].any((1, 2)))
        slots[i, : len(have)] = have
    out = tmp_path / f"prep{seed}"
    out.mkdir()
    np.save(out / "images.npy", np.zeros((n, H, W, 3), np.uint8))
    np.save(out / "planes.npy", planes)
    np.save(out / "slots.npy", slots)
    np.save(out / "present.npy", present)
    np.save(out / "plane_category.npy", np.array([0, 1], np.int16))
    concepts = ([{"label": c + 1, "name": f"o{c}", "category": "object"} for c in range(OBJ)]
                + [{"label": c + 1, "name": f"m{c}", "category": "material"} for c in range(MAT)])
    meta = {"format": 1, "source": "test", "digest": "test", "n_images": n, "image_size": [H, W],
            "seg_size": [H, W], "categories": [{"name": "object", "kind": "pixel"},
                                               {"name": "material", "kind": "pixel"}],
            "concepts": concepts, "images": [f"{i}.jpg" for i in range(n)],
            "splits": ["train"] * n}
    (out / "meta.json").write_text(json.dumps(meta))
    return PreparedDataset(out), labels, present, acts


def package(ds, acts, stats: Statistics):
    dev = torch.device("cpu")
    store = ActivationStore(len(ds), acts.shape[1:], None, dev)
    store.write(0, torch.from_numpy(acts))
    rec = ImageStats(partner_indices(ds.present, stats.seed, stats.partners))
    t = tally_shard(ds, np.arange(len(ds)), store, np.full(acts.shape[1], 0.5), device=dev,
                    batch_size=64, progress=False, stats=rec)
    sig = significance(t, rec, ds, stats, 0.04)
    return sig, unit_significance_columns(sig, acts.shape[1])


def reference_label_p(labels, present, acts, stats: Statistics):
    """Numpy: the label's IoU and its max-statistic p-value over the block permutations."""
    masks = acts > 0.5  # [n, U, H, W]
    cat = np.r_[np.zeros(OBJ, int), np.ones(MAT, int)]
    on = present[:, cat].astype(np.int64)  # [n, C]: image annotated for the concept's category
    M = masks.reshape(*masks.shape[:2], -1).astype(np.int64)
    L = labels.reshape(*labels.shape[:2], -1).astype(np.int64)
    m_area = M.sum(2)  # [n, U]
    l_area = (L.sum(2) * on).sum(0)  # [C]
    a_area = np.einsum("nu,nc->uc", m_area, on)  # [U, C]

    def iou(Lx):  # labels of each image's source
        inter = np.einsum("nup,ncp,nc->uc", M, Lx, on)
        union = a_area + l_area[None, :] - inter
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)

    obs = iou(L)
    label_iou = obs.max(1)
    partners = partner_indices(present, stats.seed, stats.partners)
    choice = null_choices(stats.seed, stats.null_replicates, present, stats.partners)
    exceed = np.zeros(len(label_iou), np.int64)
    for r in range(stats.null_replicates):
        src = np.arange(len(L))
        for d in range(1, stats.partners + 1):
            src = np.where(choice[r] == d, partners[d - 1], src)
        exceed += iou(L[src]).max(1) >= label_iou
    return label_iou, (1.0 + exceed) / (stats.null_replicates + 1.0)


def _stats(**kw):
    base = dict(enabled=True, replicates=20, null_replicates=99, level=0.95, fdr=0.05, top=5,
                partners=1, seed=0)
    return Statistics(**{**base, **kw})


def test_label_p_value_is_the_max_statistic_of_a_numpy_reference(tmp_path):
    for seed, partners in ((0, 1), (1, 3)):
        stats = _stats(partners=partners, seed=seed, null_replicates=60)
        ds, labels, present, acts = make(tmp_path, 80, 25, seed)
        sig, cols = package(ds, acts, stats)
        label_iou, p = reference_label_p(labels, present, acts, stats)
        top = sig["rank"] == 0
        np.testing.assert_array_equal(sig["iou"][top], label_iou)
        np.testing.assert_array_equal(cols["p_value"], p)
        assert p[0] == 1 / 61 and label_iou[0] == 1.0  # the planted detector
        # BH over the layer's units of the adjusted p-values (step-up, numpy)
        order = np.argsort(p, kind="stable")
        q = np.minimum.accumulate((p[order] * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1]
        q_units = np.empty(len(p))
        q_units[order] = np.minimum(q, 1)
        np.testing.assert_allclose(cols["q_value"], q_units, rtol=1e-12)
        np.testing.assert_array_equal(cols["detector_fdr"], (label_iou > 0.04) & (q_units < 0.05))
        # the selection costs: never below the label's own per-pair p-value, often above
        assert (p >= sig["p_value"][top]).all() and (p > sig["p_value"][top]).sum() >= 5


def test_null_units_label_p_values_are_calibrated(tmp_path):
    """Over 2,000 null units of four datasets: P(p <= 0.05) <= 0.06, P(p <= 0.01) <= 0.015,
    where the label's own per-pair p-value (the selection ignored) is far too small."""
    stats = _stats(null_replicates=199, replicates=10)
    adjusted, plain = [], []
    for seed in range(4):
        ds, _, _, acts = make(tmp_path, 150, 501, 10 + seed)
        sig, cols = package(ds, acts, stats)
        assert cols["p_value"][0] == 1 / 200
        adjusted.append(cols["p_value"][1:])
        plain.append(sig["p_value"][sig["rank"] == 0][1:])
    adjusted, plain = np.concatenate(adjusted), np.concatenate(plain)
    assert len(adjusted) == 2000
    assert np.mean(adjusted <= 0.05) <= 0.06 and np.mean(adjusted <= 0.01) <= 0.015
    assert np.mean(plain <= 0.05) > 0.1  # what the test would catch
