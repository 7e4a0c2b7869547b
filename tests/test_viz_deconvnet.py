"""DeconvNet projections: equality with an explicit unpool / ReLU / transposed-conv stack,
in-place ReLUs, refusal of functional ReLUs, and receptive-field boxes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.viz import deconvnet, receptive_field, strongest_locations


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def vgg_like(inplace: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),   # 0
        nn.ReLU(inplace=inplace),        # 1
        nn.Conv2d(4, 6, 3, padding=1),   # 2
        nn.ReLU(inplace=inplace),        # 3
        nn.MaxPool2d(2),                 # 4
        nn.Conv2d(6, 5, 3, padding=1),   # 5
        nn.ReLU(inplace=inplace),        # 6
    )


def manual_deconv(net: nn.Sequential, unit: int, images: torch.Tensor, top: str) -> torch.Tensor:
    """Zeiler & Fergus by hand: forward keeping the pooling switches, then unpool / ReLU /
    conv_transpose2d back to the pixels."""
    conv1, conv2, conv3 = net[0], net[2], net[5]
    out = []
    with torch.no_grad():
        for img in images:
            x = img[None]
            r1 = F.relu(conv1(x))
            r2 = F.relu(conv2(r1))
            p, switches = F.max_pool2d(r2, 2, return_indices=True)
            a3 = conv3(p)
            act = F.relu(a3) if top == "6" else a3
            flat = act[0, unit].flatten()
            pos = int(flat.argmax())
            g = torch.zeros_like(act)
            g[0, unit].view(-1)[pos] = flat[pos]
            if top == "6":
                g = F.relu(g)
            g = F.conv_transpose2d(g, conv3.weight, padding=1)
            g = F.max_unpool2d(g, switches, 2, output_size=r2.shape[-2:])
            g = F.relu(g)
            g = F.conv_transpose2d(g, conv2.weight, padding=1)
            g = F.relu(g)
            g = F.conv_transpose2d(g, conv1.weight, padding=1)
            out.append(g[0])
    return torch.stack(out)


@pytest.mark.parametrize("layer", ["6", "5"])
@pytest.mark.parametrize("unit", [0, 3])
def test_deconvnet_equals_explicit_unpool_relu_convtranspose(layer, unit):
    net = vgg_like()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = deconvnet(net, layer, unit, images)
    want = manual_deconv(net, unit, images, layer)
    assert got.shape == images.shape
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # It is not the plain gradient (the ReLU backward really was replaced).
    x = images.clone().requires_grad_(True)
    act = net[:int(layer) + 1](x)
    n = images.shape[0]
    vals, pos = act[:, unit].reshape(n, -1).max(dim=1)
    seed = torch.zeros_like(act)
    seed.view(n, act.shape[1], -1)[torch.arange(n), unit, pos] = vals.detach()
    act.backward(seed)
    assert not torch.allclose(x.grad, got)


def test_inplace_relus_give_the_same_projection_and_are_restored():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    net = vgg_like(inplace=True)
    net.train()
    got = deconvnet(net, "6", 1, images)
    torch.testing.assert_close(got, manual_deconv(vgg_like(inplace=False), 1, images, "6"),
                               rtol=1e-5, atol=1e-6)
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        if isinstance(m, nn.ReLU):
            assert m.inplace is True
    assert net.training and all(p.requires_grad for p in net.parameters())


class FunctionalNet(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.how = how

    def forward(self, x):
        x = self.conv1(x)
        if self.how == "F.relu":
            x = F.relu(x)
        elif self.how == "torch.relu":
            x = torch.relu(x)
        elif self.how == "method":
            x = x.relu()
        elif self.how == "inplace":
            x = F.relu(x, inplace=True)
        elif self.how == "relu6":
            x = F.relu6(x)
        elif self.how == "clamp":
            x = x.clamp(min=0)
        elif self.how == "torch.clamp":
            x = torch.clamp(x, 0.0)
        elif self.how == "clamp_min":
            x = torch.clamp_min(x, 0)
        elif self.how == "clip":
            x = x.clip(0, None)
        return F.relu(self.conv2(x))


@pytest.mark.parametrize("how", ["F.relu", "torch.relu", "method", "inplace", "relu6", "clamp",
                                 "torch.clamp", "clamp_min", "clip"])
def test_functional_relu_is_refused(how):
    net = FunctionalNet(how)
    with pytest.raises(CnnvisError) as err:
        deconvnet(net, "conv2", 0, torch.rand(1, 3, 8, 8), model_name="funcnet")
    msg = str(err.value)
    assert "funcnet" in msg and "conv2" in msg
    if how.startswith(("clamp", "torch.clamp", "clip")):
        assert "clamp used as a rectifier" in msg
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_functional_relu_after_the_layer_is_fine():
    net = FunctionalNet("none")  # conv1 -> conv2 -> F.relu: the F.relu comes after conv2
    images = torch.rand(2, 3, 8, 8)
    out = deconvnet(net, "conv2", 1, images)
    assert out.shape == images.shape


def test_bad_unit_and_layer():
    net = vgg_like()
    with pytest.raises(CnnvisError, match="units 0..4"):
        deconvnet(net, "6", 5, torch.rand(1, 3, 16, 16))
    with pytest.raises(CnnvisError, match="no layer named"):
        deconvnet(net, "nope", 0, torch.rand(1, 3, 16, 16))


def test_strongest_locations_match_argmax():
    net = vgg_like()
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    values, ys, xs = strongest_locations(net, "6", 2, images)
    with torch.no_grad():
        act = net(images)[:, 2]
    for i in range(4):
        assert float(act[i, ys[i], xs[i]]) == pytest.approx(float(act[i].max()))
        assert float(values[i]) == pytest.approx(float(act[i].max()))


def test_receptive_field_of_vgg_like_net():
    net = vgg_like()
    # conv3 after a 2x2 pool after two 3x3 convs: 10 x 10 pixels, starting at 2y - 4.
    assert receptive_field(net, "6", 32, 5, 7) == (6, 10, 16, 20)
    assert receptive_field(net, "6", (32, 24), 0, 0) == (0, 0, 6, 6)
    assert receptive_field(net, "6", 32, 15, 15) == (26, 26, 32, 32)
    assert receptive_field(net, "0", 32, 4, 4) == (3, 3, 6, 6)
    assert receptive_field(vgg_like(inplace=True), "6", 32, 5, 7) == (6, 10, 16, 20)
    with pytest.raises(CnnvisError, match="no location"):
        receptive_field(net, "6", 32, 16, 0)


def test_receptive_field_with_functional_relu_and_strided_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 5, stride=2, padding=2)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.b(F.max_pool2d(F.relu(self.a(x)), 3, stride=2, padding=1))

    # a: rows 2y-2..2y+2; pool(3, s2, p1): a-rows 2y-1..2y+1; b: pool rows y-1..y+1.
    # b at y=4: pool rows 3..5 -> a rows 5..11 -> input rows 8..24.
    assert receptive_field(Net(), "b", 64, 4, 4) == (8, 8, 25, 25)


def test_clamp_after_the_layer_is_fine():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(self.relu(self.conv1(x))).clamp(min=0)

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    net = Net()
    got = deconvnet(net, "conv2", 1, images)
    want = deconvnet(nn.Sequential(net.conv1, nn.ReLU(), net.conv2), "2", 1, images)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)


def test_receptive_field_spreads_max_pool_windows():
    # A 1x1 conv sees one pixel; MaxPool2d(4, 4) after it sees a 4x4 window, whichever pixel of
    # the window holds the maximum.
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.MaxPool2d(4, 4))
    assert receptive_field(net, "1", 16, 0, 0) == (0, 0, 4, 4)
    assert receptive_field(net, "1", 16, 2, 1) == (8, 4, 12, 8)
    functional = nn.Sequential(nn.Conv2d(3, 2, 1))

    class Pool(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 4, 4, return_indices=True)[0]

    functional.add_module("pool", Pool())
    assert receptive_field(functional, "pool", 16, 3, 3) == (12, 12, 16, 16)


def analytic_box(chain, size: int, y: int) -> tuple[int, int]:
    """Rows [lo, hi) of the input that output row y of a chain of (kernel, stride, padding)
    layers depends on, clipped to the image."""
    lo = hi = y
    for k, s, p in reversed(chain):
        lo, hi = lo * s - p, hi * s - p + k - 1
    return max(lo, 0), min(hi, size - 1) + 1


ALEXNET = [(11, 4, 2), (3, 2, 0), (5, 1, 2), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1),
           (3, 2, 0)]  # features: conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5
ALEXNET_LAYERS = {"features.2": 2, "features.5": 4, "features.7": 5, "features.12": 8}


@pytest.mark.parametrize("layer", list(ALEXNET_LAYERS))
def test_receptive_field_of_alexnet_is_analytic(layer):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    net = alexnet(weights=None)
    chain = ALEXNET[:ALEXNET_LAYERS[layer]]
    size = 160
    with torch.no_grad():
        h = net.features[:int(layer.split(".")[1]) + 1](torch.zeros(1, 3, size, size)).shape[-1]
    for y, x in [(0, 0), (h // 2, h // 3), (h - 1, h - 1)]:
        top, bottom = analytic_box(chain, size, y)
        left, right = analytic_box(chain, size, x)
        assert receptive_field(net, layer, size, y, x) == (top, left, bottom, right)


RESNET_STEM = [(7, 2, 3), (3, 2, 1)]  # conv1, maxpool
RESNET_STAGE = {1: [(3, 1, 1)] * 4, 2: [(3, 2, 1)] + [(3, 1, 1)] * 3,
                3: [(3, 2, 1)] + [(3, 1, 1)] * 3}


@pytest.mark.parametrize("layer", ["maxpool", "layer1", "layer2", "layer3"])
def test_receptive_field_of_resnet18_is_analytic(layer):
    # The main path of each BasicBlock (two 3x3 convs) contains its shortcut's field (identity or
    # 1x1 stride 2), so the analytic field is that of the chain of main-path convolutions.
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = resnet18(weights=None)
    chain = list(RESNET_STEM)
    for stage in range(1, 4):
        if layer == "maxpool" or int(layer[-1]) < stage:
            break
        chain += RESNET_STAGE[stage]
    size = 96
    h = analytic_size = size
    for k, s, p in chain:
        analytic_size = (analytic_size + 2 * p - k) // s + 1
    h = analytic_size
    for y, x in [(0, 0), (h // 2, h // 2 + 1), (h - 1, 0)]:
        top, bottom = analytic_box(chain, size, y)
        left, right = analytic_box(chain, size, x)
        assert receptive_field(net, layer, size, y, x) == (top, left, bottom, right)
