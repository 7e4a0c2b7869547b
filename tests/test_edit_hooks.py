"""Hooks that edit a layer's output (models.edits), each checked against the same intervention
written out by hand in the test: the layer's output computed step by step, edited with plain
indexing in the module's own layout, and the rest of the model run on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.models.edits import (
    ablate_groups,
    edit_layers,
    fix_units,
    run_groups,
    zero_units,
)
from cnnvis_pipeline.models.hooks import LayerRecorder

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4),
    ).eval()


class ChannelsLast(nn.Module):
    """A convolution whose output is channels-last [N, H, W, C]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


class NhwcNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stem = ChannelsLast()
        self.mix = nn.Linear(6, 5)  # over the last (channel) axis
        self.head = nn.Linear(5, 3)

    def rest(self, a):
        return self.head(torch.relu(self.mix(a)).mean(dim=(1, 2)))

    def forward(self, x):
        return self.rest(self.stem(x))


class TokenBlock(nn.Module):
    """Per-token MLP plus a mixing of all tokens, so the class token depends on the patches."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, t):
        return torch.tanh(self.fc(t)) + t.mean(dim=1, keepdim=True)


class TinyViT(nn.Module):
    """A class token and a 4x4 grid of patch tokens (patch size 4 on a 16x16 input)."""

    def __init__(self, c: int = 6):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.block1 = TokenBlock(c)
        self.block2 = TokenBlock(c)
        self.head = nn.Linear(c, 3)

    def tokens(self, x):
        p = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), p], 1)

    def rest(self, t1):
        return self.head(self.block2(t1)[:, 0])

    def forward(self, x):
        return self.rest(self.block1(self.tokens(x)))


class Reused(nn.Module):
    """One ReLU module called twice per forward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv2(self.act(self.conv1(x)))).sum(dim=(2, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_zeroing_an_nchw_unit_equals_the_rest_of_the_model_on_the_zeroed_map(device):
    model = cnn().to(device)
    x = torch.randn(3, 3, 8, 8, device=device)
    with torch.no_grad():
        a = model[0](x)
        a[:, 2] = 0
        want = model[1:](a)
        with edit_layers(model, {"0": zero_units([2])}):
            got = model(x)
        after = model(x)
    assert torch.equal(got, want)
    assert not torch.equal(after, want)  # the edit ends with the context
    assert torch.equal(after, model[1:](model[0](x)))


def test_zeroing_an_nhwc_unit():
    model = NhwcNet().eval()
    x = torch.randn(2, 3, 6, 7)
    with torch.no_grad():
        a = model.stem(x)  # [N, H, W, C]
        a[..., 4] = 0
        want = model.rest(a)
        with edit_layers(model, {"stem": zero_units([4])}, layouts={"stem": "nhwc"}):
            got = model(x)
        # Read as nchw, unit 4 would be row 4 of the map: another intervention altogether.
        with edit_layers(model, {"stem": zero_units([4])}):
            other = model(x)
    assert torch.equal(got, want)
    assert not torch.allclose(other, want)


def test_zeroing_a_token_unit_keeps_the_class_token():
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        t1 = model.block1(model.tokens(x))  # [N, 1 + 16, C]
        edited = t1.clone()
        edited[:, 1:, 3] = 0
        want = model.rest(edited)
        seen = {}
        # A plain hook registered after the editor's sees the module's edited output.
        with edit_layers(model, {"block1": zero_units([3])}, layouts={"block1": "tokens:1"}):
            h = model.block1.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
            got = model(x)
            h.remove()
    assert torch.equal(seen["out"][:, 0], t1[:, 0])  # the class token, unit 3 included
    assert float(t1[:, 0, 3].abs().min()) > 0
    assert torch.equal(seen["out"], edited)
    assert torch.equal(got, want)


@pytest.mark.parametrize("enter_recorder_first", [True, False])
def test_fix_units_sets_exactly_those_values(enter_recorder_first):
    model = cnn()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = model[0](x)
    editor = edit_layers(model, {"0": fix_units([1, 3], [2.5, -1.0])})
    recorder = LayerRecorder(model, ["0", "2"])
    first, second = (recorder, editor) if enter_recorder_first else (editor, recorder)
    with first, second, torch.no_grad():
        got = model(x)
    rec = recorder.outputs["0"]
    assert bool((rec[:, 1] == 2.5).all()) and bool((rec[:, 3] == -1.0).all())
    keep = [0, 2, 4, 5]
    assert torch.equal(rec[:, keep], plain[:, keep])
    a = plain.clone()
    a[:, 1], a[:, 3] = 2.5, -1.0
    with torch.no_grad():
        assert torch.equal(recorder.outputs["2"], model[2](model[1](a)))
        assert torch.equal(got, model[1:](a))
    # A map per unit.
    maps = torch.randn(2, 8, 8)
    with edit_layers(model, {"0": fix_units([5, 0], maps)}), \
            LayerRecorder(model, ["0"]) as r, torch.no_grad():
        model(x)
    assert torch.equal(r.outputs["0"][:, 5], maps[0].expand(2, 8, 8))
    assert torch.equal(r.outputs["0"][:, 0], maps[1].expand(2, 8, 8))
    with pytest.raises(CnnvisError, match="listed twice"):
        fix_units([1, 1], [0.0, 1.0])


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_ablation_in_one_pass_equals_separate_passes(device):
    model = cnn().to(device)
    x = torch.randn(3, 3, 8, 8, device=device)
    groups = [[0], [1, 2], [], [4, 0, 3]]
    with torch.no_grad():
        got = run_groups(model, x, "2", groups)
        separate = []
        for units in groups:
            a = model[:3](x)
            a[:, units] = 0
            separate.append(model[3:](a))
    assert got.shape == (4, 3, 4)
    assert float((got - torch.stack(separate)).abs().max()) < 1e-6
    assert not torch.allclose(got[0], got[1])
    with pytest.raises(CnnvisError, match=r"a batch of 6, not 4 groups x 3 images"), \
            edit_layers(model, {"2": ablate_groups(groups, 3)}), torch.no_grad():
        model(x[:, :, :, :].repeat(2, 1, 1, 1))


def test_grouped_ablation_of_token_units():
    model = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    groups = [[1], [0, 4]]
    with torch.no_grad():
        got = run_groups(model, x, "block1", groups, layouts={"block1": "tokens:1"})
        t1 = model.block1(model.tokens(x))
        want = []
        for units in groups:
            e = t1.clone()
            e[:, 1:, units] = 0
            want.append(model.rest(e))
    assert float((got - torch.stack(want)).abs().max()) < 1e-6


def test_a_reused_module_is_edited_at_the_chosen_call_only():
    model = Reused().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        first = torch.relu(model.conv1(x))
        second = torch.relu(model.conv2(first))
        second[:, 1] = 0
        want = second.sum(dim=(2, 3))
        with edit_layers(model, {"act@2": zero_units([1])}):
            got = model(x)
        a1 = torch.relu(model.conv1(x))
        a1[:, 1] = 0
        want1 = torch.relu(model.conv2(a1)).sum(dim=(2, 3))
        with edit_layers(model, {"act@1": zero_units([1])}):
            got1 = model(x)
    assert torch.equal(got, want) and bool((got[:, 1] == 0).all())
    assert torch.equal(got1, want1) and not torch.equal(got1, want)
    with pytest.raises(CnnvisError, match=r"'act' is a module that runs 2 times.*'act@2'"), \
            edit_layers(model, {"act": zero_units([1])}), torch.no_grad():
        model(x)
    with pytest.raises(CnnvisError, match=r"'act@3'.*runs 2 time\(s\).*no call 3"), \
            edit_layers(model, {"act@3": zero_units([1])}), torch.no_grad():
        model(x)


def test_bad_layers_and_units_are_refused_naming_them():
    model = cnn()
    with pytest.raises(CnnvisError, match=r"no layer named 'features\.9'"):
        edit_layers(model, {"features.9": zero_units([0])}, model_name="tiny")
    with pytest.raises(CnnvisError, match=r"tiny: layer '0': units \[6\] out of range .*0\.\.5"), \
            edit_layers(model, {"0": zero_units([6])}, model_name="tiny"), torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(CnnvisError, match=r"layer '6' outputs \(1, 4\), not a 4-D feature map"), \
            edit_layers(model, {"6": zero_units([0])}), torch.no_grad():
        model(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_flow_through_the_units_an_edit_keeps(device):
    model = cnn().to(device)
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    with edit_layers(model, {"0": zero_units([2, 4])}):
        model(x).sum().backward()
    grad_w = model[0].weight.grad
    assert bool((grad_w[[2, 4]] == 0).all())
    assert bool((grad_w[[0, 1, 3, 5]].flatten(1).abs().amax(dim=1) > 0).all())
    # The gradient with respect to the input equals that of the hand-written intervention.
    x2 = x.detach().clone().requires_grad_(True)
    a = model[0](x2)
    mask = torch.ones(1, 6, 1, 1, device=device)
    mask[:, [2, 4]] = 0
    model[1:](a * mask).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
