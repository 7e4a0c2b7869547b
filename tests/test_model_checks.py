"""The model check without weights or data (what `snakemake -n` runs), layouts that are not
plausibly [N, C, H, W], and the model room's messages for a bad `--spec` or checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cnnvis_pipeline import config as cc
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models import precheck
from cnnvis_pipeline.models.check import check_architectures, check_model
from cnnvis_pipeline.models.layouts import grid_fits
from cnnvis_pipeline.models.probe import check_layers, probe_layers
from cnnvis_pipeline.models.registry import build_architecture, load_state_dict_file, materialize


def specs(**models) -> dict:
    return cc.model_specs({"models": models})


def problems_of(entries: dict) -> list[str]:
    """The lines of check_architectures' error, each without the valid-names tail."""
    with pytest.raises(CnnvisError) as e:
        check_architectures(entries)
    lines = str(e.value).splitlines()
    body = [ln.strip() for ln in lines[1:]] if lines[0].endswith("problems:") else lines
    assert lines[0] == f"{len(body)} problems:" or len(body) == 1
    return [ln.split("; valid layer names:")[0] for ln in body]


# -- the parse-time check: every mistake of every model at once, naming its key --------------

def test_every_mistake_of_every_model_is_listed_with_its_key():
    s = specs(r18={"torchvision": "resnet18", "weights": "IMAGENET1K_V9",
                   "layers": ["layer5", "layer4"], "units": {"layer4": [3, 512]}},
              syn={"arch": "synthnet", "layers": ["features.relu3"],
                   "units": {"features.relu3": [63, 64, 70]}},
              fine={"torchvision": "resnet18", "layers": ["layer3.1.relu@2"],
                    "units": {"layer3.1.relu@2": [255]}})
    got = problems_of({name: (spec, [64, 64]) for name, spec in s.items()})
    assert got == [
        "config: models.r18.weights: unknown weights 'IMAGENET1K_V9' for resnet18; known: "
        "DEFAULT, IMAGENET1K_V1",
        "config: models.r18.layers: no layer named 'layer5'",
        "config: models.r18.units.layer4: [512] out of range (the layer has units 0..511)",
        "config: models.syn.units.features.relu3: [64, 70] out of range (the layer has units "
        "0..63)",
    ]


def test_valid_layer_names_show_the_blocks_first():
    s = specs(r={"torchvision": "resnet50", "layers": ["layer5"]})
    with pytest.raises(CnnvisError) as e:
        check_architectures({"r": (s["r"], [64, 64])})
    shown = str(e.value).split("valid layer names: ")[1]
    assert "layer4, layer4.0, layer4.1, layer4.2, avgpool, fc" in shown
    assert "layer1.0.conv1" not in shown and "(150 in all" in shown


def test_reuse_and_input_size_problems_depend_on_what_is_known():
    s = specs(v={"torchvision": "vit_b_32", "layers": ["encoder.ln"], "units": {
        "encoder.ln": [767, 768]}}, r={"torchvision": "resnet18", "layers": ["layer3.1.relu"]})
    # The real size: ViT-B/32 needs 224 px.
    assert problems_of({"v": (s["v"], [64, 64])}) == [
        "config: models.v.input_size: the model fails on a 64x64 input: Wrong image height! "
        "Expected 224 but got 64!"]
    assert problems_of({"v": (s["v"], [224, 224])}) == [
        "config: models.v.units.encoder.ln: [768] out of range (the layer has units 0..767)"]
    # A size only the data tells: a stand-in input, and no problem that depends on the size.
    assert problems_of({"v": (s["v"], None), "r": (s["r"], None)}) == [
        "config: models.v.units.encoder.ln: [768] out of range (the layer has units 0..767)",
        "config: models.r.layers: layer 'layer3.1.relu' is a module that runs 2 times in one "
        "forward pass, so its output is ambiguous; name the enclosing block ('layer3.1') to "
        "get its output, or choose one call with 'layer3.1.relu@1' .. 'layer3.1.relu@2'"]


def test_correct_entries_pass_on_either_device():
    s = specs(syn={"arch": "synthnet", "layers": ["features.relu3", "features.relu4"],
                   "units": {"features.relu4": [0, 63]}},
              r={"torchvision": "resnet18", "weights": "DEFAULT", "layers": ["layer4"]},
              sw={"torchvision": "swin_t", "weights": "IMAGENET1K_V1", "layers": ["norm"]})
    check_architectures({name: (spec, [64, 64]) for name, spec in s.items()})
    # the weights are never read: the parameters are on the meta device until materialised
    model = build_architecture("r", s["r"])
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert materialize(model, 10**9) == "cpu" and not any(p.abs().sum() for p in
                                                           model.parameters())
    assert materialize(build_architecture("r", s["r"]), 10) == "meta"


def test_what_is_checked_at_parse_time_without_torch():
    m = {"layers": ["x"]}
    assert precheck.input_size({"dataset": {"synth": {"size": 48}}}, m) == [48, 48]
    assert precheck.input_size({"dataset": {"synth": None}}, m) == [64, 64]
    assert precheck.input_size({"dataset": {"download": "broden1_227"}}, m) == [227, 227]
    assert precheck.input_size({"dataset": {"path": "/data/b"}}, m) is None
    assert precheck.input_size({"dataset": {"path": "/data/b"}}, dict(m, input_size=[9, 7])) \
        == [9, 7]
    cfg = {"dataset": {"synth": {"size": 32}}, "models": {
        "s": {"arch": "synthnet", "layers": ["features.relu3"], "checkpoints": ["a.pt", "b.pt"]},
        "f": {"factory": "m:build", "layers": ["x"]},
        "r": {"torchvision": "resnet18", "layers": ["layer4"], "input_size": [64, 48]}}}
    entries = precheck.parse_time_entries(cfg, cc.model_specs(cfg))
    assert {k: v[1] for k, v in entries.items()} == {"s": [32, 32], "r": [64, 48]}
    key = precheck.check_key(entries)
    other = dict(cfg, dataset={"path": "/d"})
    assert key == precheck.check_key(entries) != precheck.check_key(
        precheck.parse_time_entries(other, cc.model_specs(other)))
    # what the Snakefile imports to decide this does not load torch
    import subprocess
    import sys

    code = ("import sys, cnnvis_pipeline.models.precheck, cnnvis_pipeline.config; "
            "print(sorted({'torch', 'torchvision'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


@pytest.mark.slow  # two dry runs, each importing torch and torchvision: about 30 s
def test_the_workflow_refuses_all_mistakes_at_a_dry_run(tmp_path, workflow):
    cfg = workflow.config("tiny")
    good = {"torchvision": "resnet18", "weights": None, "layers": ["layer3", "layer4"]}
    cfg["models"] = {"r18": good}
    proc = workflow.run(tmp_path, cfg, "-n", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a passed check is remembered; a changed entry is checked again
    cfg["models"] = {"r18": dict(good, weights="IMAGENET1K_V9", layers=["layer5", "layer4"],
                                 units={"layer4": [1, 600]})}
    proc = workflow.run(tmp_path, cfg, "-n", timeout=600)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "invalid configuration: 3 problems:" in err, err[-3000:]
    for line in ("config: models.r18.weights: unknown weights 'IMAGENET1K_V9' for resnet18",
                 "config: models.r18.layers: no layer named 'layer5'; valid layer names: conv1,",
                 "config: models.r18.units.layer4: [600] out of range (the layer has units "
                 "0..511)"):
        assert line in err, (line, err[-3000:])
    assert "Traceback" not in err and "results/r18" not in err
    # A factory model's units, against the layer shapes measured at parse time.
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "units_factory.py").write_text(
        "from cnnvis_pipeline.models.synthnet import SynthNet\n"
        "def build():\n    return SynthNet(width=4)\n")
    cfg["models"] = {"f": {"factory": "units_factory:build", "layers": ["features.relu3"],
                           "units": {"features.relu3": [2, 64]}}}
    proc = workflow.run(tmp_path, cfg, "-n", timeout=600, env=workflow.env(lib))
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("invalid configuration: config: models.f.units.features.relu3: [64] out of range "
            "(the layer has units 0..7)") in err, err[-3000:]


# -- outputs that are not plausibly [N, C, H, W] ------------------------------------------------

class ChannelsLastConv(nn.Module):
    """A conv block that returns its output channels-last: [N, H/2, W/2, 8]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ChannelsLastConv()
        self.mlp = nn.Linear(8, 8)  # applied channels-last
        self.act = nn.ReLU()
        self.back = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.mlp(self.block(x)).permute(0, 3, 1, 2)
        return self.back(self.act(y))


class Concat(nn.Module):
    """A densenet-like block: its last weighted module's channels (16) equal its width (16)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(3, 16, 3, stride=4, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_the_channels_last_block_of_the_issue_is_refused_with_the_fix():
    model = Custom().eval()
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(CnnvisError) as e:
        check_layers(model, ["block", "mlp", "back"], x, model_name="m")
    msg = str(e.value)
    assert ("layer 'block' outputs (1, 32, 32, 8): read as [N, C, H, W] its grid 32x8 does not "
            "follow from the 64x64 input by a stride") in msg
    assert "give `layouts: {block: nhwc}` if it is channels-last" in msg
    assert ("layer 'mlp' outputs (1, 32, 32, 8): its last dimension is the 8 output channels "
            "of its weight") in msg and "`layouts: {mlp: nhwc}`" in msg
    assert "'back'" not in msg
    shapes = check_layers(model, ["block", "mlp", "back"], x, model_name="m",
                          layouts={"block": "nhwc", "mlp": "nhwc"})
    assert shapes == {"block": [8, 32, 32], "mlp": [8, 32, 32], "back": [16, 16, 16]}
    # An explicit nchw reads it as it is (the user's word).
    assert check_layers(model, ["block"], x, layouts={"block": "nchw"}) == {"block": [32, 32, 8]}
    # The `layers` listing shows the same verdict.
    rows = {r.name: r for r in probe_layers(model, x)}
    assert rows["block"].feature_map is None and "layouts: {block: nhwc}" in rows["block"].problem
    assert rows["back"].feature_map == (16, 16, 16) and rows["back"].problem is None


def test_a_linear_applied_channels_last_on_a_plausible_grid_is_refused_by_its_weight():
    # 64x32 input: the grid 16x8 of [N, 32, 16, 8] read as nchw follows by stride 4, but the
    # Linear's 8 output channels are the last dimension.
    model = Custom().eval()
    with pytest.raises(CnnvisError, match=r"'mlp' outputs \(1, 32, 16, 8\): its last dimension "
                                          r"is the 8 output channels"):
        check_layers(model, ["mlp"], torch.rand(1, 3, 64, 32))


def test_nchw_maps_whose_channels_equal_a_side_are_not_refused():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()).eval()
    # [N, 8, 32, 8] from 64x16: channels == width, the conv's weight says dim 1
    assert check_layers(conv, ["0", "1"], torch.rand(1, 3, 64, 16)) == {
        "0": [8, 32, 8], "1": [8, 32, 8]}
    # a concatenation whose last conv's channels equal the width: no refusal either
    model = nn.Sequential(Concat()).eval()
    assert check_layers(model, ["0"], torch.rand(1, 3, 64, 64)) == {"0": [24, 16, 16]}


def test_grid_rule():
    assert grid_fits((32, 32), (64, 64)) and grid_fits((35, 35), (299, 299))  # inception
    assert grid_fits((55, 55), (224, 224)) and grid_fits((1, 1), (64, 64))   # alexnet, pooled
    assert grid_fits((16, 8), (64, 32)) and grid_fits((128, 128), (64, 64))  # upsampled
    assert not grid_fits((32, 8), (64, 64)) and not grid_fits((32, 64), (128, 128))


@pytest.mark.parametrize("arch, size", [("resnet18", 224), ("swin_t", 64),
                                        ("vit_b_32", 224), ("mobilenet_v3_small", 96)])
def test_zoo_modules_are_never_doubted(arch, size):
    """Every module of these architectures (and synthnet's) passes the [N, C, H, W] rule."""
    model = build_architecture(arch, {"torchvision": arch})
    device = materialize(model, 30_000_000)
    rows = probe_layers(model, torch.zeros(1, 3, size, size, device=device), model_name=arch)
    doubted = [r.name for r in rows if r.problem and "if it is channels-last" in r.problem]
    assert not doubted and sum(r.feature_map is not None for r in rows) > 10


def test_synthnet_and_a_factory_model_through_check_model(prepared_dir, tmp_path, monkeypatch):
    from cnnvis_pipeline.data.prepared import PreparedDataset

    ds = PreparedDataset(prepared_dir)  # 32 px images
    layers = ["features.relu1", "features.relu2", "features.relu3", "features.relu4"]
    syn = dict(specs(s={"arch": "synthnet", "kwargs": {"width": 4}, "layers": layers})["s"],
               name="s")
    assert len(check_model(syn, ds)["layers"]) == 4
    (tmp_path / "cl_factory.py").write_text(
        "from torch import nn\n"
        "class Block(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x).permute(0, 2, 3, 1)\n"
        "def build():\n"
        "    return nn.Sequential(Block(), nn.Flatten(), nn.LazyLinear(2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = {"factory": "cl_factory:build", "layers": ["0"], "input_size": [64, 64]}
    with pytest.raises(CnnvisError) as e:
        check_model(dict(specs(f=entry)["f"], name="f"), ds)
    assert str(e.value).startswith("f: layer '0' outputs (1, 32, 32, 8): read as [N, C, H, W] "
                                   "its grid 32x8 does not follow from the 64x64 input")
    assert "give `layouts: {0: nhwc}`" in str(e.value)
    fixed = dict(specs(f=dict(entry, layouts={"0": "nhwc"}))["f"], name="f")
    assert check_model(fixed, ds)["layers"]["0"]["feature_map"] == [8, 32, 32]


# -- the model room's messages -----------------------------------------------------------------

def test_a_text_file_is_not_a_checkpoint_and_pickled_code_is_still_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("# my model\nlayers: [layer4]\n")
    with pytest.raises(CnnvisError) as e:
        load_state_dict_file(text, where="config: models.m.checkpoint")
    assert str(e.value) == (f"{text}: not a readable PyTorch checkpoint: not a zip or pickle "
                            "file (config: models.m.checkpoint: give a state dict written by "
                            "torch.save)")
    import os

    class Code:
        def __reduce__(self):
            return (os.getcwd, ())

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Code()}, evil)
    with pytest.raises(CnnvisError, match="refused: the checkpoint holds pickled objects"):
        load_state_dict_file(evil)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_state_dict_file(good)["w"], torch.ones(2))


def test_layers_takes_a_plain_name_and_explains_a_bad_spec(capsys):
    from cnnvis_pipeline.cli import main

    assert main(["layers", "--spec", "resnet18", "--input-size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# resnet18 on a 32x32 input") and "\nlayer4\t1\t1x512x1x1\t" in out
    assert main(["layers", "--spec", "synthnet", "--names-only"]) == 0
    assert "features.relu4" in capsys.readouterr().out.split()
    assert main(["layers", "--spec", "{resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --spec: expected a model name or a model entry as a JSON "
                          "object (e.g. --spec resnet18,") and "Traceback" not in err
    assert "got '{resnet18'" in err
    with pytest.raises(SystemExit):
        main(["layers", "--help"])
    assert "Examples: --spec resnet18, --spec synthnet, or --spec '{" in capsys.readouterr().out
    # the JSON form still works
    assert main(["layers", "--spec", json.dumps({"arch": "synthnet"}), "--names-only"]) == 0
