"""Statistical dissection on synthetic data whose answers are known.

Hand-built prepared datasets (one object category, two box-shaped concepts placed mostly in the
upper-left quarter) and hand-built activation maps at the segmentation size (so the bilinear
upsample is the identity and the masks are exactly what is planted):

- unit 0 is a planted detector of `thing`: on with probability A on its pixels, B elsewhere;
  its population IoU is A*mu / (mu + B*(S - mu)) (mu: the expected `thing` area per image);
- unit 1 is one fixed square in the upper-left, the same in every image (it carries no
  information about any image, but overlaps the concepts more than a random square would);
- the other units are random boxes drawn independently of the labels (planted null units).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.records import (
    ImageStats,
    null_choices,
    partner_indices,
    poisson_weights,
)
from cnnvis_pipeline.dissection.significance import bh_qvalues, significance, sweep_counts
from cnnvis_pipeline.dissection.stores import ActivationStore
from cnnvis_pipeline.dissection.tally import tally_shard
from cnnvis_pipeline.settings import Job, Statistics

H = W = 16
S = H * W
A, B = 0.7, 0.02
SIDES = np.arange(4, 9)  # box sides, uniform
P_THING = 0.5
MU = P_THING * float(np.mean(SIDES**2))
POP_IOU = A * MU / (MU + B * (S - MU))
STATS = {"enabled": True, "replicates": 200, "null_replicates": 1000, "level": 0.95,
         "fdr": 0.05, "seed": 0, "top": 5, "partners": 1}


def _box(rng, side):
    """A square placed in the upper-left 10x10 region (a spatial prior shared by all images)."""
    y, x = rng.integers(0, 10 - side + 1, 2) if side <= 10 else (0, 0)
    m = np.zeros((H, W), bool)
    m[y : y + side, x : x + side] = True
    return m


def make_data(tmp_path, n, seed, null_units=2, present=None):
    """(prepared directory, activations float16 [n, U, H, W])."""
    rng = np.random.default_rng(seed)
    planes = np.zeros((n, 1, H, W), np.uint16)
    acts = np.zeros((n, 2 + null_units, H, W), np.float16)
    fixed = np.zeros((H, W), bool)
    fixed[1:7, 1:7] = True
    for i in range(n):
        if rng.random() < 0.6:  # `other` first, so `thing` is on top where they overlap
            planes[i, 0][_box(rng, int(rng.choice(SIDES)))] = 2
        thing = _box(rng, int(rng.choice(SIDES))) if rng.random() < P_THING else np.zeros((H, W), bool)
        planes[i, 0][thing] = 1
        on = np.where(thing, rng.random((H, W)) < A, rng.random((H, W)) < B)
        acts[i, 0] = on
        acts[i, 1] = fixed
        for k in range(null_units):
            acts[i, 2 + k] = _box(rng, int(rng.integers(3, 8)))
    if present is None:
        present = np.ones((n, 1), bool)
    slots = np.array([([c for c in (0, 1) if (planes[i, 0] == c + 1).any()] + [-1, -1])[:2]
                      for i in range(n)], np.int32)
    out = tmp_path / f"prep{seed}"
    out.mkdir()
    np.save(out / "images.npy", np.zeros((n, H, W, 3), np.uint8))
    np.save(out / "planes.npy", planes)
    np.save(out / "slots.npy", slots)
    np.save(out / "present.npy", present)
    np.save(out / "plane_category.npy", np.zeros(1, np.int16))
    meta = {"format": 1, "source": "test", "digest": "test", "n_images": n, "image_size": [H, W],
            "seg_size": [H, W], "categories": [{"name": "object", "kind": "pixel"}],
            "concepts": [{"label": 1, "name": "thing", "category": "object"},
                         {"label": 2, "name": "other", "category": "object"}],
            "images": [f"{i}.jpg" for i in range(n)], "splits": ["train"] * n}
    (out / "meta.json").write_text(json.dumps(meta))
    return out, acts


def tally(ds, acts, indices, stats=None, seed=0, partners=1):
    dev = torch.device("cpu")
    store = ActivationStore(len(indices), acts.shape[1:], None, dev)
    store.write(0, torch.from_numpy(acts[indices]))
    rec = None
    if stats:
        rec = ImageStats(partner_indices(ds.present, seed, partners))
    t = tally_shard(ds, np.asarray(indices), store, np.full(acts.shape[1], 0.5),
                           device=dev, batch_size=32, progress=False, stats=rec)
    return t, rec


def run(ds, acts, shards=1, **stats):
    settings = {**STATS, **stats}
    bounds = np.linspace(0, len(ds), shards + 1).round().astype(int)
    merged = rec = None
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        t, r = tally(ds, acts, np.arange(a, b), True, settings["seed"], settings["partners"])
        if merged is None:
            merged, rec = t, r
        else:
            merged.merge(t)
            rec.merge(r)
    return merged, rec, significance(merged, rec, ds, Statistics(**settings), 0.04)


def test_records_leave_the_tally_unchanged(tmp_path):
    path, acts = make_data(tmp_path, 60, 1)
    ds = PreparedDataset(path)
    plain, _ = tally(ds, acts, np.arange(60))
    with_stats, rec = tally(ds, acts, np.arange(60), stats=True)
    for f in plain.FIELDS:
        assert torch.equal(getattr(plain, f), getattr(with_stats, f)), f
    a = rec.arrays
    # per-image records add up to the tally's sums
    inter = np.zeros((acts.shape[1], 2), np.int64)
    np.add.at(inter, (a["inter_unit"], a["inter_concept"]), a["inter_count"])
    assert np.array_equal(inter, plain.intersection[:, :2].numpy())
    mask = np.bincount(a["mask_unit"], a["mask_count"], minlength=acts.shape[1])
    assert np.array_equal(mask.astype(np.int64), plain.mask_area[:, 0].numpy())
    # the mask of unit 1 (the fixed 6x6 square) has 36 pixels in every image
    assert set(a["mask_count"][a["mask_unit"] == 1]) == {36}
    # the null records of image i are its mask against its partner's labels
    partner = partner_indices(ds.present, 0, 1)[0]
    i = int(a["null_image"][0])
    u = int(a["null_unit"][0])
    c = int(a["null_concept"][0])
    expect = int(((acts[i, u] > 0.5) & (np.load(path / "planes.npy")[partner[i], 0] == c + 1)).sum())
    assert int(a["null_count"][0]) == expect > 0


def test_partners_and_null_choices_permute_labels_within_strata():
    present = np.zeros((50, 2), bool)
    present[:30, 0] = True
    present[20:, 1] = True  # strata: 0-19 {0}, 20-29 {0,1}, 30-49 {1}
    p1 = partner_indices(present, 7, 1)[0]
    assert sorted(p1) == list(range(50)) and (p1 != np.arange(50)).all()
    assert np.array_equal(p1[p1], np.arange(50))  # blocks of two: a swap
    assert (present[p1] == present).all()  # same annotated categories
    p = partner_indices(present, 7, 2)
    assert np.array_equal(p, partner_indices(present, 7, 2))
    assert not np.array_equal(p, partner_indices(present, 8, 2))
    for d in range(2):
        assert sorted(p[d]) == list(range(50)) and (present[p[d]] == present).all()
    choice = null_choices(7, 300, present, 2)
    # blocks of 3 (45 images), two of 2 and one of 1 (strata of 20, 10, 20): own labels kept
    # with probability 1/3, 1/2 and 1
    assert abs((choice == 0).mean() - (15 + 2 + 1) / 50) < 0.02
    assert set(np.unique(choice)) == {0, 1, 2}
    table = np.concatenate([np.arange(50)[None], p])  # whose labels: own, partner 1, 2
    for r in range(300):
        takes = table[choice[r], np.arange(50)]
        assert sorted(takes) == list(range(50))  # every image's labels used exactly once
    # replicates are a function of the replicate index, not of how many are asked for
    assert np.array_equal(null_choices(7, 5, present, 2, first=10), choice[10:15])


def test_weights_are_poisson_and_a_function_of_the_image_index():
    w = poisson_weights(3, 400, np.arange(1000))
    assert abs(w.mean() - 1) < 0.01 and abs(w.var() - 1) < 0.02
    assert abs((w == 0).mean() - np.exp(-1)) < 0.005
    # the same image gets the same weights whatever else is asked for
    assert np.array_equal(poisson_weights(3, 400, np.array([17, 999]))[:, 0], w[:, 17])
    assert not np.array_equal(poisson_weights(4, 400, np.array([17]))[:, 0], w[:, 17])


def test_bh_qvalues_match_the_step_up_rule():
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.005])
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.2 -> m p / rank = 0.025, 0.025, 0.05, 0.05, 0.2
    assert np.allclose(bh_qvalues(p), [0.025, 0.05, 0.05, 0.2, 0.025])
    assert bh_qvalues(np.array([0.9, 0.95])).max() == 0.95


def _row(sig, unit, rank=0):
    k = np.flatnonzero((sig["unit"] == unit) & (sig["rank"] == rank))[0]
    return {key: v[k] for key, v in sig.items()}


def test_planted_detector_is_significant_and_fixed_pattern_is_not(tmp_path):
    path, acts = make_data(tmp_path, 300, 2, null_units=4)
    ds = PreparedDataset(path)
    _, _, sig = run(ds, acts)
    det = _row(sig, 0)
    assert det["concept"] == 0 and det["p_value"] == 1 / 1001 and det["detector_fdr"]
    assert det["iou_low"] < det["iou"] < det["iou_high"] and det["iou_high"] - det["iou_low"] < 0.1
    fixed = [_row(sig, 1, r) for r in range(2)]
    # its IoU passes the plain threshold: only the null sees that it carries no information
    assert fixed[0]["detector"] and fixed[0]["iou"] > 0.1
    # any permutation of the labels among images leaves its intersections' sum unchanged
    assert all(r["p_value"] == 1.0 and not r["detector_fdr"] for r in fixed)


def test_interval_covers_the_population_iou(tmp_path):
    covered = []
    for seed in range(40):
        path, acts = make_data(tmp_path, 200, 100 + seed, null_units=0)
        sig = run(PreparedDataset(path), acts, seed=seed, null_replicates=10)[2]
        row = _row(sig, 0)
        assert row["concept"] == 0
        covered.append(row["iou_low"] <= POP_IOU <= row["iou_high"])
    assert np.mean(covered) >= 0.9, np.mean(covered)


def test_shards_give_the_same_statistics(tmp_path):
    path, acts = make_data(tmp_path, 90, 4, null_units=3)
    ds = PreparedDataset(path)
    one = run(ds, acts, shards=1, partners=2)
    three = run(ds, acts, shards=3, partners=2)
    for k in one[1].arrays:
        assert np.array_equal(one[1].arrays[k], three[1].arrays[k]), k
    for k in one[2]:
        assert np.array_equal(one[2][k], three[2][k]), k
    other_seed = run(ds, acts, seed=1)[2]
    assert not np.array_equal(one[2]["iou_low"], other_seed["iou_low"])


def test_null_units_have_uniform_p_values(tmp_path):
    path, acts = make_data(tmp_path, 200, 5, null_units=60)
    sig = run(PreparedDataset(path), acts, null_replicates=400)[2]
    null = np.isin(sig["unit"], np.arange(2, 62))
    p = np.sort(sig["p_value"][null])
    assert len(p) == 120
    ks = np.max(np.abs(np.arange(1, len(p) + 1) / len(p) - p))
    assert ks < 0.15, ks
    assert not sig["detector_fdr"][null].any()


def test_sweep_counts_plain_and_fdr():
    units = pd.DataFrame({"iou": [0.05, 0.12, 0.3, 0.02], "category": ["a", "a", "b", "b"],
                          "label": [1, 1, 2, 3], "q_value": [0.01, 0.2, 0.01, 0.01]})
    cols = pd.DataFrame(sweep_counts(units, ["a", "b"], [0.04, 0.1], 0.05))
    at = cols.set_index(["iou_threshold", "category"])
    assert at.loc[(0.04, "a"), "detectors"] == 2 and at.loc[(0.04, "a"), "unique_detectors"] == 1
    assert at.loc[(0.04, "a"), "detectors_fdr"] == 1
    assert at.loc[(0.1, "a"), "detectors_fdr"] == 0 and at.loc[(0.1, "a"), "detectors"] == 1
    assert at.loc[(0.1, "b"), "unique_detectors_fdr"] == 1




def test_dissect_writes_the_statistics_tables(prepared_dir, tmp_path):
    from test_planted_detectors import PlantedColours
    from torch import nn

    from cnnvis_pipeline.dissection.figures import plot_sweep
    from cnnvis_pipeline.dissection.pipeline import dissect, run_summary
    from cnnvis_pipeline.tables import SCHEMAS

    ds = PreparedDataset(prepared_dir)
    spec = {"name": "planted", "layers": ["pool"], "mean": [0, 0, 0], "std": [1, 1, 1],
            "dissection": {"quantile": 0.01, "iou_threshold": 0.04},
            "resources": {"batch_size": 16, "device": "cpu"}}
    wrapper = nn.Sequential()
    wrapper.add_module("pool", PlantedColours())
    out = dissect(Job.from_spec(spec), ds, tmp_path / "out", model=wrapper, progress=False)
    layer = tmp_path / "out/pool"
    units = pd.read_parquet(layer / "units.parquet").set_index("unit")
    # the colour units are significant detectors; the fixed random pattern gets p = 1
    assert units.loc[[0, 1, 2], "detector_fdr"].all()
    assert (units.loc[[0, 1, 2], "p_value"] < 0.01).all()  # 48 images, blocks of two
    assert units.loc[3, "p_value"] == 1.0 and not units.loc[3, "detector_fdr"]
    assert (units["iou_low"] <= units["iou"]).all() and (units["iou"] <= units["iou_high"]).all()
    sig = pd.read_parquet(layer / "significance.parquet")
    assert list(sig.columns) == SCHEMAS["significance"].names
    assert len(sig) == 4 * 5 and (sig.groupby("unit")["rank"].apply(list) == [[0, 1, 2, 3, 4]] * 4).all()
    top = sig[sig["rank"] == 0].set_index("unit")
    assert (top["concept"] == units["concept"]).all() and (top["iou"] == units["iou"]).all()
    assert np.allclose(np.sort(sig["q_value"]), np.sort(bh_qvalues(sig["p_value"].to_numpy())))
    sweep = pd.read_parquet(layer / "sweep.parquet")
    assert len(sweep) == 39 * len(ds.categories)
    # the figure draws the sweep table: drawn again from the table, the same bytes
    plot_sweep(sweep, tmp_path / "sweep.png", "planted pool", 0.04)
    assert (layer / "sweep.png").read_bytes() == (tmp_path / "sweep.png").read_bytes()
    total = sweep.groupby("iou_threshold")[["detectors", "detectors_fdr"]].sum()
    assert (np.diff(total["detectors"]) <= 0).all() and (total["detectors_fdr"] <= total["detectors"]).all()
    assert total.loc[0.04, "detectors"] == units["detector"].sum()
    summary = run_summary([layer / "units.parquet"], tmp_path / "detectors.parquet")
    assert summary["detectors_fdr"].sum() == 3 == total.loc[0.04, "detectors_fdr"]
    assert summary["unique_detectors_fdr"].sum() == out["significance"]["pool"]["detector_fdr"][
        out["significance"]["pool"]["rank"] == 0].sum()
