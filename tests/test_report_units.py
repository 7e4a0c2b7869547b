"""Unit selection, report settings, the visualize step's tables/manifest on a tiny dissection,
the DeconvNet refusal path and the self-contained HTML (no browser needed)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.pipeline import dissect
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.hooks import find_module
from cnnvis_pipeline.models.registry import build_model
from cnnvis_pipeline.reports.html import build_model_report, build_summary_page
from cnnvis_pipeline.settings import ActivationMax, Job, Views
from cnnvis_pipeline.tables import SCHEMAS, check_manifest, read_provenance
from cnnvis_pipeline.viz import representation_spread
from cnnvis_pipeline.viz.images import GAP, mask_overlay
from cnnvis_pipeline.viz.selection import requested_units, select_units
from cnnvis_pipeline.viz.views.inversion import candidates as inversion_candidates
from cnnvis_pipeline.viz.visualize import run_visualize

LAYER = "features.relu4"
TINY_VIEWS = {"views": {"units": 3, "activation_max": {"steps": 24, "size": 32},
                        "inversion": {"images": 2, "steps": 8}},
              "report": {"top_images": 4}}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def layer_output(model, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for [0, 1] images, by a plain forward hook (mean 0.5, std 0.25)."""
    feats = {}
    h = find_module(model, LAYER).register_forward_hook(lambda m, i, o: feats.update(a=o.clone()))
    with torch.no_grad():
        model((x - 0.5) / 0.25)
    h.remove()
    return feats["a"]


def units_frame(ious):
    return pd.DataFrame({"unit": np.arange(len(ious), dtype=np.int32), "iou": ious})


# --- selection and settings ------------------------------------------------------------------


def test_select_units_top_iou_ties_by_unit_then_requested():
    units = units_frame([0.1, 0.3, 0.3, 0.0, 0.2, 0.05])
    assert select_units(units, 3) == [1, 2, 4]
    assert select_units(units, 3, [5, 2, 0, 5]) == [1, 2, 4, 5, 0]  # no repeats, given order
    assert select_units(units, 0, [3]) == [3]
    assert select_units(units, 100) == [1, 2, 4, 0, 5, 3]
    with pytest.raises(CnnvisError, match=r"units 0\.\.5; cannot visualise units \[6\]"):
        select_units(units, 2, [6], where="m layer")


def test_requested_units_from_the_model_spec():
    spec = {"name": "m", "layers": ["a", "b"], "units": {"b": [3, 1]}}
    assert requested_units(spec, "b") == [3, 1]
    assert requested_units(spec, "a") == []
    assert requested_units({"name": "m", "layers": ["a"], "units": []}, "a") == []  # the default
    with pytest.raises(CnnvisError, match="not among its layers"):
        requested_units({"name": "m", "layers": ["a"], "units": {"c": [1]}}, "a")


def test_inversion_weights_by_depth_unless_set_per_layer():
    s = Views.parse({"inversion": {"layers": {"layer3": {"lambda_tv": 0.5}}}}).inversion
    assert s.weights("layer1") == (None, 1e-4)  # None: the paper's for the depth
    assert s.weights("layer3") == (0.5, 1e-4)
    s = Views.parse({"inversion": {"lambda_tv": 0.02, "lambda_alpha": 0.0,
                                   "layers": {"b": {"lambda_alpha": 1e-3}}}}).inversion
    assert s.weights("a") == (0.02, 0.0) and s.weights("b") == (0.02, 1e-3)
    with pytest.raises(CnnvisError, match=r"config: views\.inversion\.layers\.x"):
        Views.parse({"inversion": {"layers": {"x": {"lambda": 1}}}})
    with pytest.raises(CnnvisError, match=r"config: views\.inversion\.layers\.x"):
        Views.parse({"inversion": {"layers": {"x": {"lambda_tv": -1}}}})


def test_view_settings_defaults_come_from_the_schema():
    import yaml

    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml")
                            .read_text())["properties"]["views"]["properties"]
    s = Views.parse({"activation_max": {"steps": 7}}, seed=3)
    am = schema["activation_max"]["properties"]
    assert s.activation_max == ActivationMax(**{**{k: v["default"] for k, v in am.items()},
                                                "steps": 7, "seed": 3})
    assert s.activation_max.size == 128 and s.activation_max.lr == 0.05
    assert s.units == schema["units"]["default"] == 16
    assert s.inversion.images == schema["inversion"]["properties"]["images"]["default"] == 4
    # The caller's dict is not filled in place.
    user = {"inversion": {"steps": 3}}
    Views.parse(user)
    assert user == {"inversion": {"steps": 3}}
    with pytest.raises(CnnvisError, match=r"config: views.activation_max: unknown key\(s\) 'step'"):
        Views.parse({"activation_max": {"step": 7}})
    with pytest.raises(CnnvisError, match="config: views.units: -1 is less than"):
        Views.parse({"units": -1})


def test_dissection_settings_for_library_callers_come_from_the_schema():
    s = Job.from_spec({"name": "m", "layers": ["a"], "dissection": {"quantile": 0.01}})
    assert s.dissection.quantile == 0.01 and s.dissection.iou_threshold == 0.04
    assert s.dissection.top_k == 9
    assert s.resources.batch_size == 64 and s.resources.device == "auto"
    with pytest.raises(CnnvisError, match="config: dissection.precision: 'fp8' is not one of"):
        Job.from_spec({"name": "m", "layers": ["a"], "dissection": {"precision": "fp8"}})


# --- the visualize step on a tiny dissection -------------------------------------------------


def tiny_spec(**extra):
    return {"name": "tiny", "arch": "synthnet", "kwargs": {"width": 4}, "seed": 0,
            "layers": ["features.relu3", LAYER], "mean": [0.5] * 3, "std": [0.25] * 3,
            "units": {LAYER: [7]}, "dissection": {"top_k": 5}, "resources": {"device": "cpu"},
            **TINY_VIEWS, **extra}


@pytest.fixture(scope="module")
def visualized(prepared_dir, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("vis")
    spec = tiny_spec()
    dissect(Job.from_spec(spec), prepared_dir, out, progress=False)
    manifest = run_visualize(Job.from_spec(spec), prepared_dir, LAYER, out / LAYER)
    return spec, out, manifest


def test_selected_units_and_activation_max_table(visualized):
    spec, out, manifest = visualized
    units = pq.read_table(out / LAYER / "units.parquet").to_pandas()
    want = select_units(units, 3, [7])
    others = units[units["detector"] & ~units["unit"].isin(want)].sort_values(
        ["iou", "unit"], ascending=[False, True])["unit"].tolist()
    # the selected units (every view), then every other detector (its top images only)
    assert [c["unit"] for c in manifest["units"]] == want + others
    assert [c["selected"] for c in manifest["units"]] == [True] * len(want) + [False] * len(others)
    assert all(set(c["views"]) == {"top_images"} for c in manifest["units"][len(want):])
    manifest = dict(manifest, units=manifest["units"][:len(want)])
    assert [c["requested"] for c in manifest["units"]] == [u == 7 for u in want]
    t = pq.read_table(out / LAYER / "activation_max.parquet")
    assert t.schema.remove_metadata() == SCHEMAS["activation_max"]
    am = t.to_pandas()
    top = pq.read_table(out / LAYER / "top_images.parquet").to_pandas()
    assert am["unit"].tolist() == want
    assert (am["model"] == "tiny").all() and (am["layer"] == LAYER).all()
    for r in am.itertuples():
        assert r.dataset_top_activation == top[top["unit"] == r.unit]["max_activation"].max()
        if r.dataset_top_activation > 0:
            assert r.activation_ratio == pytest.approx(r.achieved_activation
                                                       / r.dataset_top_activation)
            # AM beats the best natural image, measured the same way (max of the map at the
            # dataset's input size).
            assert r.activation_ratio >= 1.0, r
        else:
            assert np.isnan(r.activation_ratio)
    model, _ = build_model("tiny", spec)
    for card in manifest["units"]:
        e = card["views"]["activation_max"]
        assert am.set_index("unit").loc[card["unit"], "achieved_activation"] == e["achieved"]
        # the PNG is the optimised image: fed back (as the dataset is), its map's maximum is the
        # table's up to the 8-bit quantisation, and its mean the objective's final value
        img = np.asarray(Image.open(out / LAYER / "viz" / e["file"]))
        assert img.shape == (32, 32, 3)  # views.activation_max.size
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
        a = layer_output(model, x)[0, card["unit"]]
        assert float(a.amax()) == pytest.approx(e["achieved"], rel=0.05, abs=1e-3)
        assert float(a.mean()) == pytest.approx(e["objective"], rel=0.05, abs=1e-3)
    prov = read_provenance(out / LAYER / "activation_max.parquet")
    assert prov["model"] == "tiny" and prov["dataset_digest"] and prov["layer"] == LAYER


def test_inversion_table_and_normalisation(visualized, prepared_dir):
    spec, out, manifest = visualized
    t = pq.read_table(out / LAYER / "inversion.parquet")
    assert t.schema.remove_metadata() == SCHEMAS["inversion"]
    inv = t.to_pandas()
    ds = PreparedDataset(prepared_dir)
    cand = inversion_candidates(ds)
    assert ds.meta["splits"][cand[0]] == "val"
    assert inv["image_index"].tolist() == [int(i) for i in cand[:2]]  # no all-zero images here
    assert inv["image"].tolist() == [ds.meta["images"][i] for i in inv["image_index"]]
    # normalized_error = ||Phi(x*) - Phi0||^2 / spread, from the relative error and ||Phi0||^2
    model, _ = build_model("tiny", spec)
    x = torch.from_numpy(np.asarray(ds.images[inv["image_index"].to_numpy()])).permute(0, 3, 1, 2)
    x = x.float() / 255
    spread_x = torch.from_numpy(np.asarray(ds.images[cand[:64]])).permute(0, 3, 1, 2).float() / 255
    spread = representation_spread(model, LAYER, spread_x, mean=spec["mean"], std=spec["std"])
    norm2 = layer_output(model, x).flatten(1).double().pow(2).sum(1).numpy()
    np.testing.assert_allclose(inv["normalized_error"], inv["error"] * norm2 / spread, rtol=1e-5)
    # baseline: the mean relative error of the other spread images (the image itself left out)
    phi0 = layer_output(model, x).flatten(1).double()
    phis = layer_output(model, spread_x).flatten(1).double()
    for k, i in enumerate(inv["image_index"]):
        others = phis[torch.from_numpy(cand[:64] != i)]
        want = float(((others - phi0[k]) ** 2).sum(1).mean() / (phi0[k] ** 2).sum())
        assert inv["baseline"][k] == pytest.approx(want, rel=1e-6)
    # The TV weight for the layer's depth (features.relu4: 14 of 16 leaf calls -> last band).
    entry = manifest["views"]["inversion"]["layer"]
    assert entry["weights"] == {"relative_depth": 14 / 16, "lambda_tv": 0.025,
                                "lambda_alpha": 1e-4}
    assert [r["baseline"] for r in entry["images"]] == inv["baseline"].tolist()
    assert "1/n^2" in entry["normalized_error_formula"]
    assert [r["image_index"] for r in entry["images"]] == inv["image_index"].tolist()
    for r, err in zip(entry["images"], inv["error"], strict=True):
        orig = np.asarray(Image.open(out / LAYER / "viz" / r["original_file"]))
        np.testing.assert_array_equal(orig, ds.images[r["image_index"]])  # the image itself
        rec = np.asarray(Image.open(out / LAYER / "viz" / r["reconstruction_file"]))
        # the reconstruction's relative feature error is the table's (up to 8-bit rounding)
        xs = torch.from_numpy(np.stack([orig, rec])).permute(0, 3, 1, 2).float() / 255
        phi = layer_output(model, xs).flatten(1).double()
        got = float((phi[1] - phi[0]).pow(2).sum() / phi[0].pow(2).sum())
        assert got == pytest.approx(err, rel=0.1, abs=1e-3) and r["error"] == err


def test_masks_are_the_thresholded_upsampled_maps(visualized, prepared_dir):
    spec, out, manifest = visualized
    ds = PreparedDataset(prepared_dir)
    model, _ = build_model("tiny", spec)
    thr = pq.read_table(out / LAYER / "thresholds.parquet").to_pandas().set_index("unit")
    top = pq.read_table(out / LAYER / "top_images.parquet").to_pandas()
    # same maxima as the dissection's pass
    assert manifest["views"]["top_images"]["layer"] == {"max_abs_diff": 0.0}
    for card in manifest["units"]:
        u, e = card["unit"], card["views"]["top_images"]
        rows = top[top["unit"] == u].sort_values("rank")
        assert e["image_index"] == rows["image_index"].tolist()  # all top_k = 5, best first
        idx = np.asarray(e["image_index"])
        x = torch.from_numpy(np.asarray(ds.images[idx])).permute(0, 3, 1, 2).float() / 255
        a = layer_output(model, x)[:, u : u + 1].float()  # the layer's own float32 values
        up = F.interpolate(a, size=ds.images.shape[1:3], mode="bilinear", align_corners=False)
        masks = (up[:, 0] > thr.loc[u, "threshold"]).numpy()
        np.testing.assert_allclose(e["mask_fraction"], masks.mean(axis=(1, 2)), atol=1e-9)
        for i, f, m in zip(idx, e["files"], masks, strict=True):  # the image, mask drawn on it
            tile = np.asarray(Image.open(out / LAYER / "viz" / f))
            np.testing.assert_array_equal(tile, mask_overlay(np.asarray(ds.images[i]), m))
        d = card["views"]["deconvnet"]
        assert len(d["receptive_fields"]) == 5
        strip = np.asarray(Image.open(out / LAYER / "viz" / d["file"]))
        boxes = np.asarray(d["receptive_fields"])
        th, tw = (boxes[:, 2] - boxes[:, 0]).max(), (boxes[:, 3] - boxes[:, 1]).max()
        assert strip.shape == (2 * th + GAP, 5 * tw + 4 * GAP, 3)  # patches over projections
    assert manifest["views"]["deconvnet"]["note"] is None
    assert manifest["order"] == ["top_images", "activation_max", "deconvnet", "inversion"]


class FunctionalReLUNet(nn.Module):
    """Named like synthnet's layers, but with F.relu inside forward: DeconvNet must refuse."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(3, 4, 3, padding=1))
        self.features.add_module("relu4", nn.Identity())

    def forward(self, x):
        return self.features.relu4(F.relu(self.features.conv1(x)))


def test_deconv_refusal_is_recorded_and_reported(prepared_dir, tmp_path):
    spec = tiny_spec(layers=[LAYER], units={})
    net = FunctionalReLUNet().eval()
    dissect(Job.from_spec(spec), prepared_dir, tmp_path, progress=False, model=net)
    m = run_visualize(Job.from_spec(spec), prepared_dir, LAYER, tmp_path / LAYER, model=net)
    assert "functional ReLU" in m["views"]["deconvnet"]["note"]
    assert [sorted(c["views"]) for c in m["units"]] == [["activation_max", "top_images"]] * 3
    assert len(m["views"]["inversion"]["layer"]["images"]) == 2
    html = build_model_report("tiny", {LAYER: tmp_path / LAYER}, tmp_path / "r" / "index.html",
                              top_images=3)
    text = html.read_text()
    assert text.count("functional ReLU") == 1  # one note for the layer, in no card
    assert re.search(r'<p class="note layer-note view-deconvnet">DeconvNet: [^<]*functional ReLU',
                     text)


def test_report_html_is_self_contained(visualized, tmp_path):
    spec, out, manifest = visualized
    units = pq.read_table(out / LAYER / "units.parquet").to_pandas()
    page = build_model_report("tiny", {LAYER: out / LAYER}, tmp_path / "tiny" / "report" /
                              "index.html", top_images=4)
    text = page.read_text()
    n_det = int(units["detector"].sum())
    uniq = units[units["detector"]][["category", "label"]].drop_duplicates().shape[0]
    assert f"{n_det}/{len(units)} units are detectors, {uniq} unique concepts" in text
    srcs = re.findall(r'<img[^>]* src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<link" not in text and '<script src' not in text
    cards = re.findall(r'<article class="card" id="[^"]+" data-unit="(\d+)"', text)
    assert sorted(map(int, cards)) == sorted(c["unit"] for c in manifest["units"])
    # every inversion error is shown with its unrelated-image baseline
    shown = re.findall(r'class="baseline">unrelated-image baseline ([^<]+)<', text)
    want = [r["baseline"] for r in manifest["views"]["inversion"]["layer"]["images"]]
    assert len(shown) == len(want) and want
    assert [float(v) for v in shown] == pytest.approx(want, rel=0.01)
    # the IoU figure written beside the page is the one the page embeds
    figure = base64.b64encode((page.parent / "iou_distribution.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{figure}" alt="tiny: IoU distribution' in text
    # the summary page links the report relatively and embeds the figure
    from cnnvis_pipeline.dissection.pipeline import run_summary

    summary = tmp_path / "summary"
    run_summary([out / LAYER / "units.parquet"], summary / "detectors.parquet",
                summary / "unique_detectors.png")
    idx = build_summary_page({"tiny": page}, summary / "detectors.parquet",
                             summary / "unique_detectors.png", summary / "index.html",
                             units=[out / LAYER / "units.parquet"])
    s = idx.read_text()
    assert 'href="../tiny/report/index.html"' in s
    assert re.search(r'<img[^>]* src="data:image/png;base64,', s)


def test_manifest_is_json_and_tables_are_deterministic(visualized, prepared_dir, tmp_path):
    spec, out, manifest = visualized
    on_disk = json.loads((out / LAYER / "viz" / "manifest.json").read_text())
    assert on_disk == manifest
    assert check_manifest(on_disk, "manifest.json") is on_disk
    # a second run on a copy gives byte-identical tables (no time in the provenance)
    import shutil

    copy = tmp_path / LAYER
    shutil.copytree(out / LAYER, copy)
    run_visualize(Job.from_spec(spec), prepared_dir, LAYER, copy)
    for name in ("activation_max.parquet", "inversion.parquet"):
        assert (copy / name).read_bytes() == (out / LAYER / name).read_bytes()


def test_no_units_selected_gives_empty_views_and_tables(visualized, prepared_dir, tmp_path):
    import shutil

    spec, out, _ = visualized
    copy = tmp_path / LAYER
    shutil.copytree(out / LAYER, copy)
    job = Job.from_spec(dict(spec, units={}, views=dict(TINY_VIEWS["views"], units=0)))
    m = run_visualize(job, prepared_dir, LAYER, copy)
    units = pq.read_table(copy / "units.parquet").to_pandas()
    detectors = set(units.loc[units["detector"], "unit"])
    assert detectors, "the tiny layer has no detector to check"
    # no unit selected: only the detectors' cards, with their top images
    assert {c["unit"] for c in m["units"]} == detectors and m["top_units"] == 0
    assert all(not c["selected"] and set(c["views"]) == {"top_images"} for c in m["units"])
    assert pq.read_table(copy / "activation_max.parquet").num_rows == 0
    assert len(m["views"]["inversion"]["layer"]["images"]) == 2  # the layer's views still run
    tops = {f for c in m["units"] for f in c["views"]["top_images"]["files"]}
    assert sorted(p.name for p in (copy / "viz").iterdir()) == sorted(tops | {
        "inversion_0_original.png", "inversion_0_reconstruction.png",
        "inversion_1_original.png", "inversion_1_reconstruction.png", "manifest.json"})


def test_am_benchmark_shows_both_presets(visualized, prepared_dir):
    from cnnvis_pipeline.bench.am import benchmark_presets, summarise

    spec, out, manifest = visualized
    model, _ = build_model("tiny", spec)
    df = benchmark_presets(model, spec, prepared_dir, LAYER, out / LAYER, steps=24, size=32,
                           top_units=3)
    units = [c["unit"] for c in manifest["units"]]
    assert df["preset"].tolist() == ["default"] * len(units) + ["lucid"] * len(units)
    assert df["unit"].tolist() == units * 2
    active = df[df["dataset_top_activation"] > 0]
    np.testing.assert_allclose(active["activation_ratio"],
                               active["achieved_activation"] / active["dataset_top_activation"])
    # Same settings as the visualize step: the default preset's row is the table's.
    am = pq.read_table(out / LAYER / "activation_max.parquet").to_pandas()
    np.testing.assert_allclose(df[df["preset"] == "default"]["achieved_activation"],
                               am["achieved_activation"], rtol=1e-5)
    s = summarise(df).set_index("preset")
    assert s.loc["default", "fraction_ge_1"] == 1.0
    assert s.loc["default", "ratio_min"] == pytest.approx(
        active[active["preset"] == "default"]["activation_ratio"].min())

