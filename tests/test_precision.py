"""Storage precision does not change the answer: a layer scaled by 1e-7 or 1e5 or shifted by -50
gives the top concepts and IoUs of a float64 reference (issue 10); unit activity; TF32 off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dissection_exact import brute_force

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection import affine, extract, tally
from cnnvis_pipeline.dissection.results import unit_activity
from cnnvis_pipeline.dissection.tally import ConceptTally
from cnnvis_pipeline.models.hooks import LayerRecorder, find_module
from cnnvis_pipeline.models.input import images_to_input
from cnnvis_pipeline.models.synthnet import SynthNet

LAYER = "features.relu3"
Q = 0.01
KW = dict(input_size=None, mean=[0.5] * 3, std=[0.25] * 3, device=torch.device("cpu"),
          batch_size=16, progress=False, quantile=Q)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SynthNet(width=8).eval()


@pytest.fixture(scope="module")
def reference(model, prepared_dir, synth_dir):
    """Thresholds and IoUs of the unscaled layer by brute force in float64."""
    ds = PreparedDataset(prepared_dir)
    outs = []
    with LayerRecorder(model, [LAYER]) as rec, torch.no_grad():
        for s in range(0, len(ds), 16):
            idx = np.arange(s, min(len(ds), s + 16))
            x = images_to_input(np.array(ds.images[idx]), None, KW["mean"], KW["std"],
                                       KW["device"])
            outs.append(rec.run(x)[LAYER].numpy().astype(np.float64))
    acts = np.concatenate(outs)
    t, iou, _, _ = brute_force(acts, synth_dir, Q)
    assert (iou.max(1) > 0.04).sum() >= 2  # something to get right
    return t, iou


def dissect(model, ds, scale, offset, calibrate=True):
    h = find_module(model, LAYER).register_forward_hook(lambda m, i, out: out * scale + offset)
    try:
        idx = np.arange(len(ds))
        stores, hists, maxima = extract.extract_shard(model, [LAYER], ds, idx, calibrate=calibrate,
                                                     **KW)
        t = extract.unit_thresholds(hists[LAYER], Q)
        counts = tally.tally_shard(ds, idx, stores[LAYER], t, device=KW["device"],
                                   progress=False)
    finally:
        h.remove()
    return t, counts.iou(ds.concept_category)[0], maxima[LAYER], counts


@pytest.mark.parametrize("scale, offset", [(1e-7, 0.0), (1.0, 0.0), (1e5, 0.0), (1.0, -50.0),
                                           (1e-9, 0.0), (3e4, 7.0)])
def test_iou_invariant_to_scale_and_offset(model, prepared_dir, reference, scale, offset):
    ds = PreparedDataset(prepared_dir)
    ref_t, ref_iou = reference
    t, iou, maxima, _ = dissect(model, ds, scale, offset)
    assert np.array_equal(iou.argmax(1), ref_iou.argmax(1))  # the same top concepts
    assert np.abs(iou - ref_iou).max() <= 0.005
    assert np.abs(iou.max(1) - ref_iou.max(1)).max() <= 0.005
    back = (t - offset) / scale
    assert np.abs(back - ref_t).max() <= 2e-3 * max(np.abs(ref_t).max(), 1e-30)
    assert maxima.dtype == np.float32 and np.isfinite(maxima).all()


def test_plain_float16_fails_where_the_scaled_storage_does_not(model, prepared_dir, reference):
    """The defect the issue reports, reproduced on the old storage (so the test above can fail)."""
    ds = PreparedDataset(prepared_dir)
    _ref_t, ref_iou = reference
    _t, iou, _, _ = dissect(model, ds, 1e-7, 0.0, calibrate=False)  # below float16's normals
    assert np.abs(iou - ref_iou).max() > 0.005
    with pytest.raises(Exception, match="NaN or infinite"):  # beyond 65504
        dissect(model, ds, 1e6, 0.0, calibrate=False)
    t, iou, _, _ = dissect(model, ds, 1e6, 0.0)  # fine in per-unit coordinates
    assert np.abs(iou - ref_iou).max() <= 0.005


def test_affine_is_exact_where_it_matters():
    # A ReLU-like unit (zero is stored exactly) and a unit near -50 (finest around T_k).
    relu = np.r_[np.zeros(60), np.linspace(0.1, 3.0, 40)]
    shifted = np.linspace(-50.0, -48.5, 100)
    acts = torch.tensor(np.stack([relu, shifted]), dtype=torch.float32).view(1, 2, 10, 10)
    a = affine.Affine.calibrate(acts, 0.05)
    assert (np.log2(a.scale) == np.round(np.log2(a.scale))).all()  # powers of two
    q = a.encode(acts)
    assert q.dtype == torch.float16
    back = a.from_stored(q.double().numpy().reshape(2, -1).T).T
    assert (back[0][:60] == 0.0).all()  # zero stays exactly zero
    err = np.abs(back - acts.double().numpy().reshape(2, -1))
    near = np.abs(shifted - np.quantile(shifted, 0.95)) < 0.1
    assert err[1].max() < 1e-3 and err[1][near].max() < 1e-4  # plain float16: 0.016 near 50
    plain = np.abs(acts[0, 1].half().double().numpy().reshape(-1) - shifted)
    assert plain.max() > 0.005
    # On-grid thresholds survive the round trip exactly (the tally compares stored values).
    grid = q.double().numpy().reshape(2, -1).T
    assert np.array_equal(a.to_stored(a.from_stored(grid)), grid)


def test_shards_with_different_storage_do_not_merge(model, prepared_dir):
    h1 = affine.StoredHistogram(2, affine=affine.Affine([0.0, 1.0], [1.0, 2.0]))
    h2 = affine.StoredHistogram(2, affine=affine.Affine([0.0, 1.0], [1.0, 4.0]))
    with pytest.raises(Exception, match="different per-unit scales"):
        h1.merge(h2)
    again = affine.StoredHistogram.from_state(h1.state())
    assert again.affine.same_as(h1.affine)


def test_unit_activity_ok_sparse_dead(prepared_dir):
    ds = PreparedDataset(prepared_dir)
    tally = ConceptTally(3, len(ds.concepts), len(ds.categories))
    cells = len(ds) * int(np.prod(ds.seg_size))
    tally.unit_area[:] = torch.tensor([cells // 4, 5, 0])
    frac, act = unit_activity(tally, ds, np.array([1.5, 0.0, 0.0]))
    assert act == ["ok", "sparse", "dead"]
    np.testing.assert_allclose(frac, [(cells // 4) / cells, 5 / cells, 0.0])


def test_active_fraction_counts_upsampled_cells(model, prepared_dir):
    ds = PreparedDataset(prepared_dir)
    _t, _iou, _m, tally = dissect(model, ds, 1.0, 0.0)
    frac, _ = unit_activity(tally, ds, _t)
    # Upsampled masks of the top Q of raw cells: a few times Q, never all.
    assert 0 < np.median(frac) < 10 * Q and (frac < 1).all()
    # A unit that is zero everywhere is dead.
    h = find_module(model, LAYER).register_forward_hook(
        lambda m, i, out: out * torch.tensor([0.0] + [1.0] * (out.shape[1] - 1)).view(1, -1, 1, 1))
    try:
        t2, _, _, tally2 = dissect(model, ds, 1.0, 0.0)
    finally:
        h.remove()
    _f, act2 = unit_activity(tally2, ds, t2)
    assert act2[0] == "dead" and t2[0] == 0.0


def test_tf32_is_off_unless_asked():
    cpu = torch.device("cpu")
    assert extract.set_precision("tf32", cpu) == "fp32"  # no TF32 on a CPU
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert extract.set_precision("fp32", cpu) == "fp32"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    assert extract.set_precision("bf16", cpu) == "fp32"  # autocast is CUDA-only here
    with pytest.raises(Exception, match="precision"):
        extract.set_precision("fp16", cpu)


def _shifted_reference(model, ds, synth_dir, scale, offset):
    """Float64 brute force on the layer's float32 output shifted as the hook shifts it (what
    the extraction receives: only the storage may lose anything beyond this)."""
    outs = []
    h = find_module(model, LAYER).register_forward_hook(lambda m, i, out: out * scale + offset)
    try:
        with LayerRecorder(model, [LAYER]) as rec, torch.no_grad():
            for s in range(0, len(ds), 16):
                idx = np.arange(s, min(len(ds), s + 16))
                x = images_to_input(np.array(ds.images[idx]), None, KW["mean"], KW["std"],
                                    KW["device"])
                outs.append(rec.run(x)[LAYER].numpy().astype(np.float64))
    finally:
        h.remove()
    acts = np.concatenate(outs)
    spread = np.percentile(acts, 99.9, axis=(0, 2, 3)) - np.percentile(acts, 0.1, axis=(0, 2, 3))
    return brute_force(acts, synth_dir, Q), spread


@pytest.mark.parametrize("scale, offset", [(1.0, -1e5), (1.0, 4e5), (1e-3, -50.0), (30.0, 1e6)])
def test_large_offsets_keep_full_resolution(model, prepared_dir, synth_dir, scale, offset):
    """An offset of 1e4 to 1e5 times the units' spread: the stored coordinates keep float16's
    resolution near T_k (the offset is float32, not a float16 number of scales)."""
    ds = PreparedDataset(prepared_dir)
    (ref_t, ref_iou, _, _), spread = _shifted_reference(model, ds, synth_dir, scale, offset)
    live = spread > 0
    assert (np.abs(offset) > 1e3 * spread[live]).all()
    t, iou, _, _ = dissect(model, ds, scale, offset)
    assert np.array_equal(iou.argmax(1), ref_iou.argmax(1))
    assert np.abs(iou - ref_iou).max() <= 2e-3
    assert np.abs(t - ref_t)[live].max() <= 1e-3 * spread[live].min()
