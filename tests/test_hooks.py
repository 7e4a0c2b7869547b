"""Which activations a layer name means: re-used modules, layouts (nhwc, tokens), the model check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from cnnvis_pipeline import config as cc
from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection import extract as engine
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.check import check_model
from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.layouts import default_layout, to_feature_map, token_grid
from cnnvis_pipeline.models.probe import probe_layers
from cnnvis_pipeline.viz import strongest_locations


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def record(model, layers, x, **kw):
    with LayerRecorder(model, layers, stop_after_last=True, **kw) as rec, torch.no_grad():
        rec.run(x)  # the first pass runs to the end and checks the calls
        return rec.run(x)


# -- re-used modules ------------------------------------------------------------------------

def test_reused_module_is_refused_with_the_fix(resnet):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(CnnvisError) as e:
        record(resnet, ["layer3.1.relu"], x)
    msg = str(e.value)
    assert "'layer3.1.relu'" in msg and "runs 2 times" in msg
    assert "'layer3.1'" in msg and "layer3.1.relu@1" in msg and "layer3.1.relu@2" in msg
    # Also when another, later layer is listed (the forward would have run past it).
    with pytest.raises(CnnvisError, match="runs 2 times"):
        record(resnet, ["layer4", "layer3.1.relu"], x)
    with pytest.raises(CnnvisError, match="runs 3 times"):
        record(torchvision.models.resnet50().eval(), ["layer1.0.relu"], x)


def test_chosen_call_does_not_depend_on_the_other_layers(resnet):
    x = torch.randn(2, 3, 32, 32)
    alone = record(resnet, ["layer3.1.relu@2"], x)["layer3.1.relu@2"]
    with_later = record(resnet, ["layer3.1.relu@2", "layer4"], x)["layer3.1.relu@2"]
    block = record(resnet, ["layer3.1"], x)["layer3.1"]
    first = record(resnet, ["layer3.1.relu@1", "layer3.1.relu@2"], x)["layer3.1.relu@1"]
    assert torch.equal(alone, with_later)
    assert torch.equal(alone, block)  # the block's last op is its relu's second call
    bn1 = record(resnet, ["layer3.1.bn1"], x)["layer3.1.bn1"]
    assert torch.equal(first, bn1.clamp(min=0)) and not torch.equal(first, alone)
    with pytest.raises(CnnvisError, match="runs 2 time.*no call 3"):
        record(resnet, ["layer3.1.relu@3"], x)


def test_extraction_of_a_layer_is_the_same_whatever_else_is_listed(resnet, prepared_dir):
    ds = PreparedDataset(prepared_dir)
    idx = np.arange(6)
    kw = dict(input_size=None, mean=[0.5] * 3, std=[0.25] * 3, device=torch.device("cpu"),
              batch_size=4, progress=False)
    one, _, max1 = engine.extract_shard(resnet, ["layer3.1.relu@2"], ds, idx, **kw)
    two, _, max2 = engine.extract_shard(resnet, ["layer4", "layer3.1.relu@2"], ds, idx, **kw)
    a = one["layer3.1.relu@2"].read(0, 6, torch.device("cpu"))
    b = two["layer3.1.relu@2"].read(0, 6, torch.device("cpu"))
    assert torch.equal(a, b) and float(a.float().abs().sum()) > 0
    np.testing.assert_array_equal(max1["layer3.1.relu@2"], max2["layer3.1.relu@2"])
    with pytest.raises(CnnvisError, match="runs 2 times"):
        engine.extract_shard(resnet, ["layer3.1.relu", "layer4"], ds, idx, **kw)


def test_visualisations_refuse_a_reused_module(resnet):
    with pytest.raises(CnnvisError, match="runs 2 times"):
        strongest_locations(resnet, "layer2.0.relu", 0, torch.rand(1, 3, 32, 32))
    v, ys, xs = strongest_locations(resnet, "layer2.0.relu@2", 0, torch.rand(1, 3, 32, 32))
    assert v.shape == (1,) and 0 <= int(ys[0]) < 4 and 0 <= int(xs[0]) < 4


def test_probe_marks_reused_modules(resnet):
    rows = {r.name: r for r in probe_layers(resnet, torch.zeros(1, 3, 32, 32))}
    assert rows["layer3.1.relu"].calls == 2 and "runs 2 times" in rows["layer3.1.relu"].problem
    assert rows["layer3.1"].calls == 1 and rows["layer3.1"].problem is None
    assert rows["layer3.1"].feature_map == (256, 2, 2)
    assert "not a 4-D" in rows["fc"].problem


# -- layouts --------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, hw, prefix, want", [
    (197, (224, 224), None, (1, 14, 14)),   # ViT-B/16: one class token
    (201, (224, 224), None, (5, 14, 14)),   # class + 4 register tokens
    (9, (32, 64), 1, (1, 2, 4)),            # non-square input: h follows H
    (9, (64, 32), 1, (1, 4, 2)),
    (50, (224, 224), 1, (1, 7, 7)),         # ViT-B/32
    (16, (60, 60), 0, (0, 4, 4)),           # ceil division (padding)
    (13, (64, 64), 0, None),                # no grid of a square input
])
def test_token_grid(tokens, hw, prefix, want):
    assert token_grid(tokens, hw, prefix) == want


def test_layouts_restore_the_map():
    fmap = torch.randn(2, 5, 3, 4)
    nhwc = fmap.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(to_feature_map("x", nhwc, "nhwc", (24, 32)), fmap)
    cls = torch.randn(2, 2, 5)
    tokens = torch.cat([cls, fmap.flatten(2).transpose(1, 2)], 1)  # [N, 2 + 12, C]
    assert torch.equal(to_feature_map("x", tokens, "tokens:2", (24, 32)), fmap)
    with pytest.raises(CnnvisError, match="form no patch grid"):
        to_feature_map("x", tokens, "tokens:1", (24, 32))
    with pytest.raises(CnnvisError, match=r"not a 4-D feature map.*layouts"):
        to_feature_map("x", tokens, None, (24, 32))


def test_swin_is_channels_last_by_default():
    torch.manual_seed(0)
    swin = torchvision.models.swin_t().eval()
    x = torch.randn(1, 3, 64, 64)
    raw = {}
    h = swin.features[1].register_forward_hook(lambda m, i, o: raw.update(a=o.detach()))
    got = record(swin, ["features.1", "features.0.0"], x)
    h.remove()
    assert raw["a"].shape == (1, 16, 16, 96)  # [N, H, W, C]: 96 units, not 16
    assert got["features.1"].shape == (1, 96, 16, 16)
    assert torch.equal(got["features.1"], raw["a"].permute(0, 3, 1, 2))
    assert got["features.0.0"].shape == (1, 96, 16, 16)  # the patch conv stays nchw
    # A layout in the config wins over the family default.
    bad = record(swin, ["features.1"], x, layouts={"features.1": "nchw"})["features.1"]
    assert bad.shape == (1, 16, 16, 96)


def test_vit_tokens_drop_the_class_token():
    torch.manual_seed(0)
    vit = torchvision.models.vit_b_32(image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    raw = {}
    layer = vit.encoder.layers.encoder_layer_3
    h = layer.register_forward_hook(lambda m, i, o: raw.update(a=o.detach()))
    got = record(vit, ["encoder.layers.encoder_layer_3"], x)["encoder.layers.encoder_layer_3"]
    h.remove()
    assert raw["a"].shape == (2, 5, 768)
    assert got.shape == (2, 768, 2, 2)
    assert torch.equal(got[:, :, 1, 0], raw["a"][:, 3])  # token 1 + (1 * 2 + 0): row-major


def test_maxvit_window_tensors_are_refused():
    m = torchvision.models.maxvit_t()
    inner = "blocks.0.layers.0.layers.window_attention.attn_layer"
    why = default_layout(m, inner, m.get_submodule(inner))
    assert why.startswith("refuse:") and "'blocks.0.layers.0.layers.window_attention'" in why
    block = "blocks.0.layers.0.layers.window_attention"
    assert default_layout(m, block, m.get_submodule(block)) is None


# -- the model check (rule check_model) -------------------------------------------------------

def spec_of(**model) -> dict:
    model = {"arch": "synthnet", "kwargs": {"width": 4}, "layers": ["features.relu3"],
             "mean": [0.5] * 3, "std": [0.25] * 3, **model}
    return dict(cc.model_specs({"models": {"tiny": model}})["tiny"], name="tiny")


def test_check_reports_every_layer_problem_at_once(prepared_dir):
    ds = PreparedDataset(prepared_dir)
    spec = spec_of(layers=["features.relu3", "features.relu9", "classifier", "pool"])
    with pytest.raises(CnnvisError) as e:
        check_model(spec, ds)
    assert "no layer named 'features.relu9'" in str(e.value)
    spec = spec_of(layers=["features.relu3", "classifier", "features.relu4"])
    with pytest.raises(CnnvisError) as e:
        check_model(spec, ds)
    assert "'classifier' outputs (1, 9), not a 4-D" in str(e.value)
    spec = spec_of(layers=["features.relu4"], units={"features.relu4": [3, 8]})
    with pytest.raises(CnnvisError, match=r"units.features.relu4: \[8\] out of range"):
        check_model(spec, ds)
    ok = check_model(spec_of(layers=["features.relu3", "features.relu4"]), ds)
    assert ok["layers"]["features.relu4"]["feature_map"] == [8, 8, 8]


def test_extraction_checks_the_model_first(prepared_dir, tmp_path, capsys):
    """`cnnvis extract` (the workflow's extract_shard) reports the layer problems at once, as
    check_model does, before it computes or writes any activation."""
    from cnnvis_pipeline.cli import main

    def extract(layers, **model):
        spec = dict(spec_of(layers=layers, **model), resources={"batch_size": 4, "device": "cpu"})
        out = tmp_path / "extract" / "0"
        rc = main(["extract", "--prepared", str(prepared_dir), "--spec", json.dumps(spec),
                   "--shard", "0", "--shards", "1", "--out", str(out), "--quiet"])
        assert not out.parent.exists() or list(out.parent.iterdir()) == []
        return rc, capsys.readouterr().err

    rc, err = extract(["features.relu3", "features.relu9", "features.relu7"])
    assert rc != 0 and "'features.relu9'" in err and "'features.relu7'" in err, err
    rc, err = extract(["features.relu3", "classifier"])
    assert rc != 0 and "'classifier' outputs (1, 9), not a 4-D" in err, err
    rc, err = extract(["features.relu4"], units={"features.relu4": [3, 8]})
    assert rc != 0 and "units.features.relu4: [8] out of range" in err, err


def test_train_class_count_is_derived_or_refused(prepared_dir, tmp_path, capsys):
    ds = PreparedDataset(prepared_dir)
    scene = ds.categories.index("scene") if "scene" in ds.categories else None
    cat = "scene" if scene is not None else ds.categories[-1]
    n = int((ds.concept_category == ds.categories.index(cat)).sum())
    assert n != 9  # else the default head would hide the bug
    spec = spec_of(train={"category": cat, "epochs": 1})
    assert check_model(spec, ds)["num_classes"] == n
    bad = spec_of(train={"category": cat, "epochs": 1}, kwargs={"width": 4, "num_classes": 9})
    with pytest.raises(CnnvisError) as e:
        check_model(bad, ds)
    assert "models.tiny.kwargs.num_classes is 9" in str(e.value)
    assert f"models.tiny.train.category {cat!r} has {n} labels" in str(e.value)
    # Trained without kwargs.num_classes, the model is built from its checkpoint with n classes.
    from cnnvis_pipeline.cli import main

    ckpt = tmp_path / "ckpt.pt"
    assert main(["train", "--prepared", str(prepared_dir), "--spec", json.dumps(spec),
                 "--out", str(ckpt), "--quiet"]) == 0
    from cnnvis_pipeline.models.registry import build_model

    model, _ = build_model("tiny", dict(spec, checkpoint=str(ckpt)))
    assert model.classifier.out_features == n
    assert main(["train", "--prepared", str(prepared_dir), "--spec", json.dumps(bad),
                 "--out", str(tmp_path / "bad.pt"), "--quiet"]) == 2
    assert "kwargs.num_classes is 9" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_layer_call_syntax_in_config():
    spec = cc.model_specs({"models": {"r": {"torchvision": "resnet18",
                                            "layers": ["layer3.1.relu@2"],
                                            "layouts": {"layer3.1.relu@2": "nchw"}}}})["r"]
    assert spec["layers"] == ["layer3.1.relu@2"]
    with pytest.raises(CnnvisError, match="not allowed"):
        cc.model_specs({"models": {"r": {"torchvision": "resnet18", "layers": ["relu@0"]}}})
    with pytest.raises(CnnvisError, match="layouts: 'layer4' not among"):
        cc.model_specs({"models": {"r": {"torchvision": "resnet18", "layers": ["layer3"],
                                         "layouts": {"layer4": "nhwc"}}}})


def test_a_specs_layouts_reach_every_caller(prepared_dir, tmp_path):
    """Layouts are a parameter, not a property of the built model: the spec's `layouts` reach
    the model check, the `layers` listing, the extraction and the visualisations' forward. An
    nhwc layout on an nchw layer reads its [N, C, H, W] output as [N, W, C, H]."""
    from cnnvis_pipeline.dissection.pipeline import run_extract
    from cnnvis_pipeline.models.check import describe_layers
    from cnnvis_pipeline.models.registry import build_model
    from cnnvis_pipeline.settings import Job
    from cnnvis_pipeline.viz._common import layer_forward

    ds = PreparedDataset(prepared_dir)
    layer = "features.relu2"  # [N, 8, 16, 16] on the 32x32 images
    spec = spec_of(layers=[layer], layouts={layer: "nhwc"})
    assert check_model(spec_of(layers=[layer]), ds)["layers"][layer]["feature_map"] == [8, 16, 16]
    assert check_model(spec, ds)["layers"][layer]["feature_map"] == [16, 8, 16]
    row = next(r for r in describe_layers(spec, (32, 32)) if r["layer"] == layer)
    assert row["layout"] == "nhwc" and row["feature_map"] == (16, 8, 16)
    model, _ = build_model("tiny", spec)
    x = torch.rand(2, 3, 32, 32)
    plain = layer_forward(model, layer, x)
    assert plain.shape == (2, 8, 16, 16)
    assert torch.equal(layer_forward(model, layer, x, layouts=spec["layouts"]),
                       plain.permute(0, 3, 1, 2))
    spec = dict(spec, resources={"batch_size": 16, "device": "cpu"})
    out = run_extract(Job.from_spec(spec), prepared_dir, 0, 1, tmp_path / "extract",
                      progress=False)
    shapes = json.loads((out / "info.json").read_text())["shapes"]
    assert shapes[layer] == [len(ds), 16, 8, 16]
    with pytest.raises(CnnvisError, match=r"tiny: layouts.features.relu2: 'chw' is not one of"):
        check_model(dict(spec, layouts={layer: "chw"}), ds)
