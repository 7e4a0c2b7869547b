"""The statistics' per-image records (dissection/records.py) in their compact form: the same
records, sums and statistics as the same records in int64, and the upper bound summed batch by
batch equal to the bound computed from all the records at once, whatever the sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.records import ImageStats, partner_indices
from cnnvis_pipeline.dissection.significance import significance
from cnnvis_pipeline.dissection.stores import ActivationStore
from cnnvis_pipeline.dissection.tally import tally_shard
from cnnvis_pipeline.settings import Statistics

STATS = {"enabled": True, "replicates": 30, "null_replicates": 40, "level": 0.9, "fdr": 0.05,
         "top": 3, "partners": 2, "seed": 5}


def _activations(ds, units=6):
    """Random float16 maps of a quarter of the segmentation size (upsampled by the tally)."""
    h, w = (max(1, s // 4) for s in ds.seg_size)
    return np.random.default_rng(0).normal(size=(len(ds), units, h, w)).astype(np.float16)


def _tally(ds, acts, shards):
    dev = torch.device("cpu")
    merged = rec = None
    bounds = np.linspace(0, len(ds), shards + 1).round().astype(int)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        idx = np.arange(a, b)
        store = ActivationStore(len(idx), acts.shape[1:], None, dev)
        store.write(0, torch.from_numpy(acts[idx]))
        part_rec = ImageStats(partner_indices(ds.present, STATS["seed"], STATS["partners"]))
        part = tally_shard(ds, idx, store, np.full(acts.shape[1], 1.2), device=dev,
                           batch_size=5, progress=False, stats=part_rec)
        if merged is None:
            merged, rec = part, part_rec
        else:
            merged.merge(part)
            rec.merge(part_rec)
    return merged, rec


def _reference_upper(a, units, concepts, images):
    """Per (unit, concept): the sum over images of the largest count of the image's own and its
    partners' intersection records (dense, int64)."""
    best = np.zeros((units, concepts, images), np.int64)
    for g in ("inter", "null"):
        np.maximum.at(best, (a[f"{g}_unit"].astype(np.int64), a[f"{g}_concept"].astype(np.int64),
                             a[f"{g}_image"].astype(np.int64)), a[f"{g}_count"].astype(np.int64))
    return best.sum(2)


@pytest.fixture(scope="module")
def data(prepared_dir):
    ds = PreparedDataset(prepared_dir)
    return ds, _activations(ds)


@pytest.mark.parametrize("shards", [1, 3])
def test_upper_bound_summed_per_batch_equals_all_records(data, shards):
    ds, acts = data
    _, rec = _tally(ds, acts, shards)
    ref = _reference_upper(rec.arrays, acts.shape[1], len(ds.concepts), len(ds))
    assert np.array_equal(rec.upper, ref)
    # the partners' labels raise it above the own intersections for some pairs, image-level
    # concepts included
    own = np.zeros_like(ref)
    np.add.at(own, (rec.arrays["inter_unit"], rec.arrays["inter_concept"]),
              rec.arrays["inter_count"])
    assert (ref >= own).all() and (ref > own).any()
    image_level = np.flatnonzero(np.array([ds.category_kind[c] == "image"
                                           for c in ds.concept_category]))
    assert ref[:, image_level].sum() > 0


def test_compact_records_give_the_int64_statistics(data):
    ds, acts = data
    tally, rec = _tally(ds, acts, 3)
    wide = ImageStats()
    wide.arrays = {k: v.astype(np.int64) for k, v in rec.arrays.items()}
    # the earlier path: int64 records, the upper bound computed from all of them at once
    wide.upper = _reference_upper(wide.arrays, acts.shape[1], len(ds.concepts), len(ds))
    settings = Statistics(**STATS)
    a = significance(tally, rec, ds, settings, 0.04)
    b = significance(tally, wide, ds, settings, 0.04)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert np.isfinite(a["p_value"]).all() and (a["iou"] > 0).any()
    # compact: the records take less than 60% of their int64 size
    compact = sum(v.nbytes for v in rec.arrays.values())
    assert compact < 0.6 * sum(v.nbytes for v in wide.arrays.values())
    assert rec.arrays["inter_image"].dtype == np.int32 and rec.arrays["null_partner"].dtype == np.int8


def test_state_round_trip_keeps_records_and_upper(data):
    ds, acts = data
    _, rec = _tally(ds, acts, 1)
    back = ImageStats.from_state(rec.state())
    for k, v in rec.arrays.items():
        assert np.array_equal(back.arrays[k], v) and back.arrays[k].dtype == v.dtype, k
    assert np.array_equal(back.upper, rec.upper)


def test_null_blocks_bounded_by_images_give_the_same_statistics(data, monkeypatch):
    from cnnvis_pipeline.dissection import significance as sig_module

    ds, acts = data
    tally, rec = _tally(ds, acts, 1)
    settings = Statistics(**STATS)
    whole = significance(tally, rec, ds, settings, 0.04)
    # blocks of 7 null replicates (40 = 5 x 7 + 5) instead of one block of 40
    monkeypatch.setattr(sig_module, "_NULL_IMAGE_CELLS", 7 * len(ds))
    blocks = significance(tally, rec, ds, settings, 0.04)
    for k in whole:
        assert np.array_equal(whole[k], blocks[k]), k
    assert (whole["p_value"] < 1).any()
