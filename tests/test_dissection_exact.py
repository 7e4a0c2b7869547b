"""Thresholds and IoU against a brute-force numpy implementation of docs/DEFINITIONS.md.

The brute force reads labels through the Broden reader (PNG decoding), not the prepared
arrays, and upsamples with its own bilinear code, so it shares nothing with dissection/.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnvis_pipeline.data.broden import load_broden
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.extract import shard_indices, unit_thresholds
from cnnvis_pipeline.dissection.stats import Float16Histogram
from cnnvis_pipeline.dissection.stores import ActivationStore
from cnnvis_pipeline.dissection.tally import ConceptTally, tally_shard


def bilinear_upsample(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Centre-aligned (align_corners=False) bilinear resize of [..., h, w] in float64."""
    h, w = a.shape[-2:]

    def coords(n_out, n_in):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = coords(out_h, h)
    x0, x1, wx = coords(out_w, w)
    top = a[..., y0, :][..., x0] * (1 - wx) + a[..., y0, :][..., x1] * wx
    bot = a[..., y1, :][..., x0] * (1 - wx) + a[..., y1, :][..., x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


def brute_force(acts16: np.ndarray, synth_dir, quantile: float):
    """thresholds [U], iou [U, C], intersection, union by the definitions, image by image."""
    ds = load_broden(synth_dir)
    n, u = acts16.shape[:2]
    vals = acts16.astype(np.float64).transpose(1, 0, 2, 3).reshape(u, -1)
    thresholds = np.quantile(vals, 1 - quantile, axis=1)
    c = len(ds.concepts)
    inter = np.zeros((u, c), np.int64)
    union = np.zeros((u, c), np.int64)
    for i, rec in enumerate(ds.records):
        planes = ds.read_planes(i)
        up = bilinear_upsample(acts16[i].astype(np.float64), rec.sh, rec.sw)
        masks = up > thresholds[:, None, None]
        for k, con in enumerate(ds.concepts):
            if con.category in planes:
                lab = (planes[con.category] == con.label).any(axis=0)
            elif con.category in rec.labels:
                lab = np.full((rec.sh, rec.sw), con.label in rec.labels[con.category])
            else:
                continue  # the image has no annotation of this category
            inter[:, k] += (masks & lab).sum(axis=(1, 2))
            union[:, k] += (masks | lab).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return thresholds, iou, inter, union


@pytest.mark.parametrize("quantile", [0.005, 0.1])
def test_thresholds_and_iou_match_brute_force(synth_dir, prepared_dir, quantile):
    ds = PreparedDataset(prepared_dir)
    rng = np.random.default_rng(0)
    n, u, h, w = len(ds), 6, 5, 5  # 5x5 maps upsampled to 16x16: non-integer scale
    acts = rng.gamma(1.0, 1.0, (n, u, h, w)).astype(np.float16)
    acts[:, 0] = np.maximum(acts[:, 0] - 1.5, 0)  # a sparse, ReLU-like unit with many ties at 0
    want_t, want_iou, want_inter, want_union = brute_force(acts, synth_dir, quantile)

    hist = Float16Histogram(u)
    for start in range(0, n, 7):  # odd batches: the histogram must not care
        hist.add(torch.from_numpy(acts[start : start + 7]))
    got_t = unit_thresholds(hist, quantile)
    np.testing.assert_array_equal(got_t, want_t)  # exact: float16 data, same interpolation

    store = ActivationStore(n, (u, h, w), None, torch.device("cpu"))
    store.write(0, torch.from_numpy(acts))
    tally = tally_shard(ds, np.arange(n), store, got_t, device=torch.device("cpu"),
                               batch_size=5, progress=False)
    iou, inter, union = tally.iou(ds.concept_category)
    np.testing.assert_array_equal(inter, want_inter)
    np.testing.assert_array_equal(union, want_union)
    np.testing.assert_allclose(iou, want_iou, rtol=0, atol=1e-12)
    assert want_inter.sum() > 0


def test_histogram_and_tally_merge_exactly(prepared_dir):
    ds = PreparedDataset(prepared_dir)
    rng = np.random.default_rng(1)
    acts = rng.normal(0, 1, (len(ds), 4, 3, 3)).astype(np.float16)
    whole = Float16Histogram(4)
    whole.add(torch.from_numpy(acts))
    parts = [Float16Histogram(4) for _ in range(3)]
    for p, chunk in zip(parts, np.array_split(acts, 3), strict=True):
        p.add(torch.from_numpy(chunk))
    merged = Float16Histogram.from_state(parts[0].state())
    for p in parts[1:]:
        merged.merge(p)
    assert torch.equal(merged.counts, whole.counts)
    t = unit_thresholds(whole, 0.05)
    np.testing.assert_array_equal(t, np.quantile(acts.astype(np.float64).transpose(1, 0, 2, 3)
                                                 .reshape(4, -1), 0.95, axis=1))

    def tally(idx):
        store = ActivationStore(len(idx), (4, 3, 3), None, torch.device("cpu"))
        store.write(0, torch.from_numpy(acts[idx]))
        return tally_shard(ds, idx, store, t, device=torch.device("cpu"), progress=False)

    one = tally(np.arange(len(ds)))
    merged_tally = ConceptTally.from_state(tally(shard_indices(len(ds), 3, 0)).state())
    for s in (1, 2):
        merged_tally.merge(tally(shard_indices(len(ds), 3, s)))
    for f in ConceptTally.FIELDS:
        assert torch.equal(getattr(one, f), getattr(merged_tally, f)), f
