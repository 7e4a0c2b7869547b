"""Compositional explanations: bit kernels, exactness against independent brute force, planted
formulas, length-1 == the units table, shards == one process, pruning == no pruning."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from cnnvis_pipeline.data.broden import load_broden
from cnnvis_pipeline.data.prepared import PreparedDataset, prepare_dataset
from cnnvis_pipeline.data.synth import generate_broden_synth
from cnnvis_pipeline.dissection import compositional as cp
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Compositional, Job

# -- an independent reading of the definitions ---------------------------------------------------


def dense_labels(broden_dir):
    """bool [N, C, sh*sw] label masks and bool [N, K] annotated categories, from the Broden
    reader (PNG decoding), not the prepared arrays."""
    ds = load_broden(broden_dir)
    cats = list(ds.categories)
    n, c = len(ds.records), len(ds.concepts)
    rec0 = ds.records[0]
    s = rec0.sh * rec0.sw
    labels = np.zeros((n, c, s), bool)
    annotated = np.zeros((n, len(cats)), bool)
    for i, rec in enumerate(ds.records):
        planes = ds.read_planes(i)
        for k, cat in enumerate(cats):
            annotated[i, k] = cat in planes or cat in rec.labels
        for j, con in enumerate(ds.concepts):
            if con.category in planes:
                labels[i, j] = (planes[con.category] == con.label).any(axis=0).reshape(-1)
            elif con.category in rec.labels:
                labels[i, j] = con.label in rec.labels[con.category]
    category = np.array([cats.index(con.category) for con in ds.concepts])
    return labels, annotated, category


def brute_force_length2(unit: np.ndarray, labels, annotated, category, names):
    """{formula text: iou} of every formula of one or two distinct concepts with IoU > 0, all
    scored on the images annotated for any category (a label is absent where its category is
    not annotated). unit: bool [N, S]."""
    n, c, _ = labels.shape
    out = {}

    def iou(mask, cats):
        keep = annotated.any(1)
        inter = (unit[keep] & mask[keep]).sum()
        union = (unit[keep] | mask[keep]).sum()
        return inter / union if union else 0.0

    for a in range(c):
        v = iou(labels[:, a], {category[a]})
        if v > 0:
            out[names[a]] = v
    for a, b in itertools.permutations(range(c), 2):
        cats = {category[a], category[b]}
        la, lb = labels[:, a], labels[:, b]
        if a < b:
            for op, m in (("AND", la & lb), ("OR", la | lb)):
                v = iou(m, cats)
                if v > 0:
                    out[f"{names[a]} {op} {names[b]}"] = v
        v = iou(la & ~lb, cats)
        if v > 0:
            out[f"{names[a]} AND NOT {names[b]}"] = v
    return out


@pytest.fixture(scope="module")
def planted_data(tmp_path_factory):
    """A broden-synth with red discs, boxes and hbars (120 images, 16 x 16 segmentations)."""
    root = tmp_path_factory.mktemp("comp")
    ds_dir = generate_broden_synth(root / "ds", n_images=120, image_size=32, seed=5)
    prep = prepare_dataset(ds_dir, root / "p", progress=False)
    return ds_dir, PreparedDataset(prep)


def batches_of(acts: np.ndarray, size: int = 16):
    for i in range(0, len(acts), size):
        yield i, torch.from_numpy(acts[i : i + size])


# -- kernels --------------------------------------------------------------------------------------


def test_popcount_and_packing_match_plain_bit_counting():
    rng = np.random.default_rng(0)
    bits = rng.random((37, 200)) < 0.3
    bits[0] = True  # every bit of a row, including bit 63 of each word (the sign bit)
    rows = cp.pack_rows(torch.from_numpy(bits), cp.words_for(200))
    assert rows.shape == (37, 4)
    assert (rows[0, :3] == -1).all()  # full words: all 64 bits set
    np.testing.assert_array_equal(cp.unpack_rows(rows, 200), bits)
    want = bits.sum(1)
    np.testing.assert_array_equal(cp.popcount_rows(rows).numpy(), want)
    np.testing.assert_array_equal(cp.popcount_rows(rows, swar=True).numpy(), want)
    # the device (non-numpy) packing gives the same words
    buf = torch.zeros((37, 256), dtype=torch.int64)
    buf[:, :200] = torch.from_numpy(bits).long()
    dev_rows = (buf.view(37, 4, 64) << torch.arange(64)).sum(-1)
    assert torch.equal(dev_rows, rows)


class _UnmappedPlanes(np.memmap):
    """A prepared array whose memory map must not be read (ConceptMasks reads it with pread,
    so a full-size dataset's label planes never become resident in the job)."""

    def __getitem__(self, key):
        raise AssertionError("the label planes were read through their memory map")

    def __array__(self, *args, **kwargs):
        raise AssertionError("the label planes were read through their memory map")


def test_concept_masks_read_the_planes_without_their_memory_map(planted_data):
    _, ds = planted_data
    want = cp.ConceptMasks(ds)
    guarded = PreparedDataset(ds.path)
    guarded.planes = guarded.planes.view(_UnmappedPlanes)
    with pytest.raises(AssertionError, match="memory map"):
        guarded.planes[:1]  # the guard works
    got = cp.ConceptMasks(guarded, batch_size=7)  # batches that do not divide the images
    assert torch.equal(got.rows, want.rows)
    np.testing.assert_array_equal(got.area, want.area)
    assert got.rows.shape[0] > len(ds) and got.area.sum() > 0


def test_concept_masks_are_the_label_planes(planted_data):
    ds_dir, ds = planted_data
    labels, annotated, category = dense_labels(ds_dir)
    cm = cp.ConceptMasks(ds)
    for c in range(cm.concepts):
        m = cm.concept_mask(c)
        dense = np.zeros_like(labels[:, c])
        dense[m.images] = cp.unpack_rows(m.rows, cm.pixels)
        np.testing.assert_array_equal(dense, labels[:, c], err_msg=cm.names[c])
    # combining masks is the boolean algebra of the dense masks
    a, b = cm.names.index("disc"), cm.names.index("red")
    for op, want in ((cp.AND, labels[:, a] & labels[:, b]), (cp.OR, labels[:, a] | labels[:, b]),
                     (cp.AND_NOT, labels[:, a] & ~labels[:, b])):
        m = cp.combine(cm.concept_mask(a), cm.concept_mask(b), op)
        dense = np.zeros_like(want)
        dense[m.images] = cp.unpack_rows(m.rows, cm.pixels)
        np.testing.assert_array_equal(dense, want)
        assert all(dense[i].any() for i in m.images)  # only images where the mask is not empty
    # annotation groups: an image's group lists exactly its annotated categories
    np.testing.assert_array_equal(cm.group_categories[cm.image_group], annotated)

    def per_group(mask):  # dense |mask ∩ c| per (concept, group)
        counts = (labels & mask[:, None, :]).sum(2)  # [N, C]
        return np.stack([counts[cm.image_group == g].sum(0) for g in range(cm.groups)], 1)

    cooc = cm.cooccurrence()
    np.testing.assert_array_equal(cooc[a], per_group(labels[:, a]))
    np.testing.assert_array_equal(cooc[np.arange(cm.concepts), np.arange(cm.concepts)], cm.area)
    # |F ∩ c| of two-concept formulas, from the decomposition the search uses
    s = cp.Searcher(cm)
    single = cp.Item(node=("c", a), length=1, groups=np.ones(cm.groups, bool),
                     area=cm.area[a], hit=cm.area[a], intersection=0, union=0, iou=0.0, score=0.0)
    for op, want in ((cp.AND, labels[:, a] & labels[:, b]), (cp.OR, labels[:, a] | labels[:, b]),
                     (cp.AND_NOT, labels[:, a] & ~labels[:, b])):
        item = cp.Item(node=cp.extend(single.node, op, b), length=2, groups=single.groups,
                       area=single.area, hit=single.hit, intersection=0, union=0, iou=0.0,
                       score=0.0, parent=single, op=op, concept=b)
        np.testing.assert_array_equal(s.formula_overlap(item), per_group(want))


# -- planted units ---------------------------------------------------------------------------------


def test_planted_compositional_units_get_exactly_their_formulas(planted_data):
    ds_dir, ds = planted_data
    labels, _, _ = dense_labels(ds_dir)
    cm = cp.ConceptMasks(ds)
    n = cm.names.index
    red, disc, box, hbar = n("red"), n("disc"), n("box"), n("hbar")
    planted = [labels[:, red] & labels[:, disc], labels[:, box] | labels[:, hbar],
               labels[:, disc] & ~labels[:, red]]
    assert all(p.sum() > 100 for p in planted)  # the dataset has them
    sh, sw = ds.seg_size
    # activation maps at the segmentation size (bilinear upsampling is then the identity)
    acts = np.stack(planted, 1).reshape(len(ds), 3, sh, sw).astype(np.float16)
    masks = cp.unit_masks(batches_of(acts), np.full(3, 0.5), [0, 1, 2], (sh, sw),
                          torch.device("cpu"))
    for m, p in zip(masks, planted, strict=True):
        dense = np.zeros_like(p)
        dense[m.images] = cp.unpack_rows(m.rows, cm.pixels)
        np.testing.assert_array_equal(dense, p)
    results, _ = cp.explain_units(cm, masks, Compositional.parse({}))
    got = [(cp.formula_text(beam[0].node, cm.text), beam[0].length, beam[0].iou)
           for beam, _ in results]
    assert got == [("disc AND red", 2, 1.0), ("box OR hbar", 2, 1.0),
                   ("disc AND NOT red", 2, 1.0)]
    # the best single concepts are not exact: the formulas beat them
    assert all(single.iou < 0.9 for _, single in results)
    singles = [cm.names[single.node[1]] for _, single in results]
    assert singles[0] in ("red", "disc") and singles[1] in ("box", "hbar") and singles[2] == "disc"


# -- exhaustive search -----------------------------------------------------------------------------


def mixed_units(labels, seg, rng, units=6):
    """float16 [N, U, sh/2, sw/2] activations: pooled sums of a few concept masks plus noise."""
    n, c, s = labels.shape
    sh, sw = seg
    picks = [rng.choice(c, 3, replace=False) for _ in range(units)]
    maps = np.stack([
        sum(w * labels[:, k].reshape(n, sh, sw) for w, k in zip((1.0, 0.7, -0.5), p, strict=True))
        for p in picks], 1).astype(np.float32)
    maps += rng.normal(0, 0.15, maps.shape)
    pooled = F.avg_pool2d(torch.from_numpy(maps), 2).numpy()
    return pooled.astype(np.float16)


def dense_unit_masks(acts16, thresholds, seg):
    up = F.interpolate(torch.from_numpy(acts16).float(), size=seg, mode="bilinear",
                       align_corners=False)
    return (up > torch.as_tensor(thresholds, dtype=torch.float32).view(1, -1, 1, 1)).numpy()


def test_beam_as_wide_as_the_candidates_equals_brute_force_up_to_length_2(planted_data):
    ds_dir, ds = planted_data
    labels, annotated, category = dense_labels(ds_dir)
    cm = cp.ConceptMasks(ds)
    rng = np.random.default_rng(1)
    acts = mixed_units(labels, ds.seg_size, rng)
    t = np.quantile(acts.astype(np.float64).transpose(1, 0, 2, 3).reshape(acts.shape[1], -1),
                    0.9, axis=1)
    units = list(range(acts.shape[1]))
    masks = cp.unit_masks(batches_of(acts), t, units, ds.seg_size, torch.device("cpu"))
    dense = dense_unit_masks(acts, t, ds.seg_size).reshape(len(ds), len(units), -1)
    wide = cm.concepts * (1 + 3 * cm.concepts)
    for prune in (True, False):
        searcher = cp.Searcher(cm, max_length=2, beam=wide, penalty=1.0, prune=prune)
        for u in units:
            want = brute_force_length2(dense[:, u], labels, annotated, category, cm.text)
            beam, single = searcher.explain(masks[u])
            got = {cp.formula_text(it.node, cm.text): it.iou for it in beam if it.iou > 0}
            assert got == want, f"unit {u}"
            best = max(want.values())
            assert beam[0].iou == best
            assert len([k for k in want if " " in k]) > 10  # compound formulas were compared


def test_pruning_gives_the_unpruned_beam_and_skips_work(planted_data):
    ds_dir, ds = planted_data
    labels, _, _ = dense_labels(ds_dir)
    cm = cp.ConceptMasks(ds)
    acts = mixed_units(labels, ds.seg_size, np.random.default_rng(2), units=8)
    t = np.quantile(acts.astype(np.float64).transpose(1, 0, 2, 3).reshape(acts.shape[1], -1),
                    0.9, axis=1)
    masks = cp.unit_masks(batches_of(acts), t, range(8), ds.seg_size, torch.device("cpu"))
    out = {}
    for prune in (True, False):
        s = cp.Searcher(cm, max_length=3, beam=4, penalty=0.9, prune=prune)
        out[prune] = ([[(it.node, it.iou, it.score, it.intersection, it.union)
                        for it in s.explain(m)[0]] for m in masks], dict(s.stats))
    assert out[True][0] == out[False][0]
    assert out[True][1]["candidates"] == out[False][1]["candidates"]
    assert out[True][1]["evaluated"] < out[False][1]["evaluated"] / 4
    # the penalty is applied: scores are iou * 0.9 ** (length - 1)
    for beam in out[True][0]:
        for node, iou, score, *_ in beam:
            length = len(cp.node_concepts(node))
            assert score == pytest.approx(iou * 0.9 ** (length - 1), rel=1e-12)


def test_settings_are_checked():
    assert Compositional.parse(None) == Compositional(max_length=3, beam=5, penalty=1.0,
                                                      units="all", null_replicates=100)
    for bad, key in (({"beam": 0}, "compositional.beam"),
                     ({"null_replicates": 0}, "compositional.null_replicates"),
                     ({"max_length": 1.5}, "compositional.max_length"),
                     ({"penalty": 0}, "compositional.penalty"),
                     ({"units": [1, -2]}, "compositional.units"),
                     ({"units": "some"}, "compositional.units")):
        with pytest.raises(CnnvisError, match=key):
            Compositional.parse(bad)
    with pytest.raises(CnnvisError, match=r"units \[9\] do not exist"):
        cp.select_units([1, 9], 8, "conv")
    np.testing.assert_array_equal(cp.select_units([3, 1, 3], 8, "conv"), [1, 3])


# -- through the file steps: length 1 == the units table, shards == one process ----------------


@pytest.fixture(scope="module")
def dissected(planted_data, tmp_path_factory):
    from cnnvis_pipeline.dissection import pipeline

    _, ds = planted_data
    root = tmp_path_factory.mktemp("dissected")
    spec = {"name": "rand", "arch": "synthnet", "seed": 0, "layers": ["features.relu3"],
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "dissection": {"quantile": 0.02}, "resources": {"batch_size": 32, "device": "cpu"}}
    extracts = [root / "extract" / str(k) for k in range(2)]
    for k, d in enumerate(extracts):
        pipeline.run_extract(Job.from_spec(spec), ds.path, k, 2, d, progress=False)
    pipeline.run_layers(Job.from_spec(spec), ds.path, extracts, root, progress=False)
    return spec, ds, root, extracts


def _job(spec: dict, compositional: dict) -> Job:
    return Job.from_spec(dict(spec, compositional=compositional))


def test_length_1_formulas_are_the_best_concept_on_the_scored_images(dissected, planted_data,
                                                                      tmp_path):
    ds_dir, _ = planted_data
    spec, ds, root, extracts = dissected
    layer = "features.relu3"
    out = cp.run_compositional(_job(spec, {"max_length": 1, "null_replicates": 3}), ds.path,
                               extracts,
                               root / layer / "thresholds.parquet", layer, 0, 1,
                               tmp_path / "f.parquet", progress=False)
    f = pq.read_table(out).to_pandas()
    units = pq.read_table(root / layer / "units.parquet").to_pandas()
    iou = pq.read_table(root / layer / "iou.parquet").to_pandas()
    assert len(f) == len(units) > 8
    assert (units["iou"] > 0).sum() > 8  # not a table of zeros
    assert f["unit"].tolist() == units["unit"].tolist()
    assert (f["length"] == 1).all()
    names = [cp._concept_texts(*zip(*[(c["name"], c["category"]) for c in ds.concepts],
                                    strict=True))[ds.concepts.index(next(
                                        c for c in ds.concepts if c["name"] == n
                                        and c["category"] == k))]
             for n, k in zip(units["concept"], units["category"], strict=True)]
    # Formulas are scored on every image annotated for any category (here: all images); a
    # concept is absent where its category is not annotated, so its intersection is the tally's
    # and its union that of the whole mask with its label.
    labels, annotated, _ = dense_labels(ds_dir)
    assert annotated.any(1).all()
    area = labels.sum((0, 2))  # [C]
    cells = len(ds) * int(np.prod(ds.seg_size))
    mask_area = np.round(units["active_fraction"].to_numpy() * cells).astype(np.int64)
    inter = np.stack([iou[(iou["concept"] == c["name"]) & (iou["category"] == c["category"])]
                      .sort_values("unit")["intersection"].to_numpy() for c in ds.concepts], 1)
    union = mask_area[:, None] + area[None, :] - inter
    want = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    best = want.argmax(1)
    texts = cp._concept_texts(*zip(*[(c["name"], c["category"]) for c in ds.concepts],
                                   strict=True))
    assert f["formula"].tolist() == [texts[b] for b in best]
    assert f["iou"].tolist() == want[np.arange(len(best)), best].tolist()  # exactly, as floats
    assert f["single_iou"].tolist() == f["iou"].tolist()
    assert f["intersection"].tolist() == inter[np.arange(len(best)), best].tolist()
    assert f["union"].tolist() == union[np.arange(len(best)), best].tolist()
    # where the label's category is annotated on every image, it is the units table's label
    full = np.isin(units["category"], [k for j, k in enumerate(ds.categories)
                                       if annotated[:, j].all()])
    assert full.sum() > 4 and (~full).sum() >= 1
    assert f["formula"][full].tolist() == np.asarray(names)[full].tolist()
    assert f["iou"][full].tolist() == units["iou"][full].tolist()
    # elsewhere a concept's IoU can only fall (the same intersection, a larger union)
    assert (f["iou"] <= units["iou"]).all()


def test_unit_shards_merge_to_the_one_process_table(dissected, tmp_path):
    spec, ds, root, extracts = dissected
    layer = "features.relu3"
    settings = {"max_length": 3, "beam": 3, "units": [0, 2, 3, 5, 7, 8, 11], "null_replicates": 9}
    job = _job(spec, settings)
    one = cp.run_compositional(job, ds.path, extracts, root / layer / "thresholds.parquet",
                               layer, 0, 1, tmp_path / "one.parquet", progress=False)
    parts = [cp.run_compositional(job, ds.path, list(reversed(extracts)),
                                  root / layer / "thresholds.parquet", layer, k, 3,
                                  tmp_path / f"part{k}.parquet", progress=False)
             for k in range(3)]
    merged = cp.run_formulas(list(reversed(parts)), tmp_path / "merged.parquet")
    single = cp.run_formulas([one], tmp_path / "single.parquet")
    assert merged.read_bytes() == single.read_bytes()
    f = pq.read_table(merged).to_pandas()
    assert f["unit"].tolist() == [0, 2, 3, 5, 7, 8, 11]
    assert (f["iou"] >= f["single_iou"]).all() and (f["length"] > 1).any()
    assert (f["iou"] == f["intersection"] / f["union"]).all()
    # q-values over the merged table's units (numpy step-up BH), not over a shard's
    p = f["p_value"].to_numpy()
    assert ((p * 10) == np.round(p * 10)).all() and (p >= 0.1).all()  # multiples of 1/(R+1)
    order = np.argsort(p, kind="stable")
    q = np.minimum.accumulate((p[order] * len(p) / np.arange(1, len(p) + 1))[::-1])[::-1]
    want = np.empty(len(p))
    want[order] = np.minimum(q, 1)
    np.testing.assert_allclose(f["q_value"], want, rtol=1e-12)
    assert (f["formula_detector"] == (f["iou"] > 0.04) & (f["q_value"] < 0.05)).all()
    assert ((f["iou_low"] <= f["iou"]) & (f["iou"] <= f["iou_high"])).all()
    prov = json.loads(pq.read_schema(merged).metadata[b"cnnvis.provenance"])
    assert json.loads(prov["compositional"])["beam"] == 3
    # overlapping shards are refused
    with pytest.raises(CnnvisError, match="overlap"):
        cp.run_formulas([parts[0], parts[0]], tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def test_bounds_are_upper_bounds_of_every_candidate(planted_data):
    """Every candidate's exact score is <= its bound (and the bound is often tight)."""
    ds_dir, ds = planted_data
    labels, _, _ = dense_labels(ds_dir)
    cm = cp.ConceptMasks(ds)
    n = cm.names.index
    planted = [labels[:, n("red")] & labels[:, n("disc")],
               labels[:, n("box")] | labels[:, n("hbar")],
               labels[:, n("disc")] & ~labels[:, n("red")]]
    acts = np.concatenate([
        np.stack(planted, 1).reshape(len(ds), 3, *ds.seg_size).astype(np.float16) * 2,
        np.repeat(mixed_units(labels, ds.seg_size, np.random.default_rng(3), units=3), 2, -1)
        .repeat(2, -2)], 1)
    t = np.array([1.0, 1.0, 1.0, 0.6, 0.6, 0.6])
    masks = cp.unit_masks(batches_of(acts), t, range(6), ds.seg_size, torch.device("cpu"))
    s = cp.Searcher(cm, max_length=3, beam=3, penalty=0.95, prune=False)
    checked = tight = 0
    for m in masks:
        ctx = s.context(m)
        beam, _ = s.explain(m)
        parents = [it for it in beam if it.length == 2]
        parents += [it.parent for it in beam if it.parent is not None]
        for parent in parents:
            ub, x, groups = s.bounds(parent, ctx, 0.95 ** parent.length)
            everyone = np.ones(cm.concepts, bool)
            y = s._unit_overlap(ctx, parent, everyone)
            others = sorted(set(range(cm.concepts)) - set(cp.node_concepts(parent.node)))
            cs = np.repeat(others, 3)
            ops = np.tile(cp.OPS, len(others))
            _, _, inter, union, iou = s._exact(parent, cs, ops, x, y, ctx)
            for c, op, i, n_, v in zip(cs, ops, inter, union, iou, strict=True):
                it = s._candidate(parent, cp.extend(parent.node, op, c), c, op, x[c], y[c],
                                  groups[c], ctx, 0.95 ** parent.length)
                assert (it.intersection, it.union, it.iou) == (i, n_, v)  # vectorised == one
                assert it.score <= ub[c, op], (cp.formula_text(it.node, cm.text), op)
                checked += 1
                tight += it.score > 0 and it.score == ub[c, op]
    assert checked > 2000 and tight > 50, (checked, tight)


@pytest.mark.slow
def test_workflow_step_writes_formulas_and_shards_merge_as_one_process(tmp_path):
    """`compositional:` in the config adds the step; its 2 unit shards == one process."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = {
        "seed": 1,
        "dataset": {"synth": {"images": 24, "size": 32}},
        "models": {"tiny": {"arch": "synthnet", "kwargs": {"width": 4},
                            "layers": ["features.relu4"]}},
        "resources": {"shards": 2, "batch_size": 8, "keep_activations": True},
        "compositional": {"beam": 3, "max_length": 2, "null_replicates": 5},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    layers = ("features.relu4",)
    targets = [f"results/tiny/{layer}/formulas.parquet" for layer in layers]
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(repo / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "2", "--configfile", str(tmp_path / "cfg.yaml"),
         "--printshellcmds", *targets], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for layer in layers:
        got = pq.read_table(tmp_path / f"results/tiny/{layer}/formulas.parquet").to_pandas()
        units = pq.read_table(tmp_path / f"results/tiny/{layer}/units.parquet").to_pandas()
        assert got["unit"].tolist() == units["unit"].tolist()
        # scored on every annotated image: a concept's IoU is at most its tally IoU
        assert (got["single_iou"] <= units["iou"]).all() and (got["single_iou"] > 0).any()
        assert set(got["length"]) <= {1, 2} and (got["iou"] >= got["single_iou"]).all()
        assert not list((tmp_path / "results/tiny/compositional").rglob("*.parquet"))  # temp
    prov = json.loads(pq.read_schema(tmp_path / f"results/tiny/{layers[0]}/formulas.parquet")
                      .metadata[b"cnnvis.provenance"])
    assert json.loads(prov["compositional"]) == {"beam": 3, "max_length": 2, "penalty": 1.0,
                                                 "units": "all", "null_replicates": 5}
    # the workflow's own command for a shard of relu4, run as one shard over all units
    line = next(ln for ln in (proc.stdout + proc.stderr).splitlines()
                if " compositional " in ln and "--layer features.relu4" in ln)
    args = shlex.split(line.split(" > ")[0])
    args = args[next(i for i, a in enumerate(args) if a == "-m") - 1 :]  # from the interpreter
    for flag, value in (("--shard", "0"), ("--shards", "1"),
                        ("--out", str(tmp_path / "one.parquet"))):
        args[args.index(flag) + 1] = value
    assert subprocess.run(args, cwd=tmp_path, capture_output=True, timeout=600).returncode == 0
    merged = tmp_path / "merged.parquet"
    assert subprocess.run([*args[: args.index("compositional")], "formulas", "--parts",
                           str(tmp_path / "one.parquet"), "--out", str(merged)],
                          cwd=tmp_path, capture_output=True, timeout=600).returncode == 0
    assert merged.read_bytes() == \
        (tmp_path / f"results/tiny/{layers[0]}/formulas.parquet").read_bytes()
