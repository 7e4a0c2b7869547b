"""Activation maximisation on tiny nets: it raises activations, wakes silent units through the
redirected ReLU gradient, batches units, is deterministic, and leaves the model as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import activation_maximization as _activation_maximization
from cnnvis_pipeline.viz.objectives import (
    channel,
    channel_max,
    diversity,
    neuron,
    per_image,
)
from cnnvis_pipeline.viz.param import FourierImage, fourier, pixel
from cnnvis_pipeline.viz.relu import relu_backward_override
from cnnvis_pipeline.viz.transform import (
    apply,
    jitter,
    lucid_set,
    pad,
    random_rotate,
    random_scale,
)

# the schema's views.activation_max settings (what a test does not set)
AM = {k: v for k, v in dataclasses.asdict(Views.parse(None).activation_max).items()}


def activation_maximization(*args, **kw):
    return _activation_maximization(*args, **{**AM, **kw})


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread is faster, and much faster on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def colour_net() -> nn.Sequential:
    """Units that detect colours over 3x3 patches: grey and noise give little, a saturated
    image of the right colour gives a lot."""
    g = torch.Generator().manual_seed(0)
    conv1 = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        colours = torch.randn(4, 3, generator=g)
        conv1.weight.copy_(colours[:, :, None, None].expand(4, 3, 3, 3) / 9.0)
        conv1.bias.copy_(-(colours.sum(dim=1) * 0.5) + 0.02)  # 0.02 on grey
    conv2 = nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        conv2.weight.copy_(torch.eye(4)[:, :, None, None])
        conv2.bias.zero_()
    return nn.Sequential(conv1, nn.ReLU(inplace=True), conv2, nn.ReLU())


def random_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def unit_means(net, layer_upto: int, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net[:layer_upto + 1](images).mean(dim=(2, 3))


def test_activation_far_above_grey_and_noise():
    net = colour_net()
    images, acts = activation_maximization(net, "3", [0, 1, 2, 3], steps=64, size=32)
    grey = unit_means(net, 3, torch.full((1, 3, 32, 32), 0.5))[0]
    noise = unit_means(net, 3, torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert images.shape == (4, 3, 32, 32)
    for i in range(4):
        assert acts[i] > 5 * grey[i]
        assert acts[i] > 2.5 * noise[:, i].max()
    # The returned activations are those of the returned, untransformed images.
    torch.testing.assert_close(unit_means(net, 3, images).diagonal(), acts)


def silent_net() -> tuple[nn.Sequential, float]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(inplace=True))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        pre = net[:3](torch.full((1, 3, 32, 32), 0.5))[0, 0]
        net[2].bias[0] = -(pre.max() + 0.2)  # unit 0 is 0 everywhere on grey, with a margin
    return net, float(unit_means(net, 3, torch.full((1, 3, 32, 32), 0.5))[0, 0])


def test_silent_unit_is_woken_by_the_redirected_relu_gradient():
    net, on_grey = silent_net()
    assert on_grey == 0.0
    _, plain = activation_maximization(net, "3", [0, 1], steps=48, size=32, redirect_steps=0)
    assert plain[0] == 0.0  # no gradient ever reaches it
    assert plain[1] > 0
    _, redirected = activation_maximization(net, "3", [0, 1], steps=48, size=32)
    assert redirected[0] > 0
    assert redirected[1] > 0


def test_redirected_relu_backward():
    x = torch.tensor([[-1.0, -2.0, 3.0], [-1.0, -2.0, -3.0]], requires_grad=True)
    relu = nn.Sequential(nn.ReLU())
    with relu_backward_override(relu, "redirected"):
        y = relu(x)
    assert torch.equal(y, F.relu(x))
    y.backward(torch.tensor([[-1.0, 1.0, 2.0], [-1.0, 1.0, -2.0]]))
    # Row 0 gets gradient through the ordinary ReLU: that is used unchanged.
    # Row 1 gets none: the gradient that would raise the input (negative here) passes.
    assert x.grad.tolist() == [[0.0, 0.0, 2.0], [-1.0, 0.0, -2.0]]
    assert not relu[0]._forward_hooks


def test_per_position_redirect_and_overrides():
    x = torch.tensor([[-1.0, -2.0, 3.0], [-1.0, -2.0, -3.0]], requires_grad=True)
    relu = nn.Sequential(nn.ReLU(), nn.ReLU())
    with relu_backward_override(relu, "redirected", overrides={relu[1]: "redirected_per_position"}):
        y = relu[1](x)
    y.backward(torch.tensor([[-1.0, 1.0, 2.0], [-1.0, 1.0, -2.0]]))
    # Row 0 has ordinary gradient at x = 3, yet the -1 that raises x = -1 passes too.
    assert x.grad.tolist() == [[-1.0, 0.0, 2.0], [-1.0, 0.0, -2.0]]
    x.grad = None
    with relu_backward_override(relu, "redirected", overrides={relu[1]: "redirected_per_position"}):
        y = relu[0](x)
    y.backward(torch.tensor([[-1.0, 1.0, 2.0], [-1.0, 1.0, -2.0]]))
    assert x.grad.tolist() == [[0.0, 0.0, 2.0], [-1.0, 0.0, -2.0]]  # the others: per element
    assert not relu[0]._forward_hooks and not relu[1]._forward_hooks


def test_batch_of_units_all_channels_and_repeats():
    net = random_net()
    images, acts = activation_maximization(net, "6", None, steps=48, size=24)
    assert images.shape == (8, 3, 24, 24) and acts.shape == (8,)
    assert images.dtype == torch.float32
    images2, acts2 = activation_maximization(net, "6", [5, 5, 0], steps=24, size=24)
    assert images2.shape == (3, 3, 24, 24)
    # A repeated unit is one image per request, each measured for the unit it was asked for.
    torch.testing.assert_close(unit_means(net, 6, images2)[[0, 1, 2], [5, 5, 0]], acts2)
    # Each unit's image drives that unit harder than the other units' images do (on average),
    # by what the default preset maximises: the mean + the max of the unit's map.
    with torch.no_grad():
        maps = net[:7](images)
    scores = maps.mean(dim=(2, 3)) + maps.amax(dim=(2, 3))
    active = [u for u in range(8) if acts[u] > 0]
    assert len(active) >= 4
    assert all(scores[u, u] > scores[:, u].mean() for u in active)
    wins = sum(int(scores[u, u] >= scores[:, u].max() - 1e-6) for u in active)
    assert wins >= len(active) // 2


def test_deterministic_with_seed():
    net = random_net()
    a_img, a_act = activation_maximization(net, "6", [0, 2], steps=12, size=24, seed=3)
    b_img, b_act = activation_maximization(net, "6", [0, 2], steps=12, size=24, seed=3)
    c_img, _ = activation_maximization(net, "6", [0, 2], steps=12, size=24, seed=4)
    assert torch.equal(a_img, b_img) and torch.equal(a_act, b_act)
    assert not torch.equal(a_img, c_img)


def test_model_left_as_it_was():
    net = random_net()
    net.train()
    net[2].requires_grad_(False)
    activation_maximization(net, "6", [1], steps=20, size=24)
    assert net.training and all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == [True, True, False, False, True, True]
    assert net[1].inplace and net[3].inplace and not net[6].inplace
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_input_size_and_normalisation():
    net = colour_net()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images, acts = activation_maximization(net, "3", [0, 3], steps=8, size=20, input_size=32,
                                           mean=mean, std=std)
    assert images.shape == (2, 3, 20, 20)
    x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    got = unit_means(net, 3, x)
    torch.testing.assert_close(torch.stack([got[0, 0], got[1, 3]]), acts)


def test_errors():
    net = random_net()
    with pytest.raises(CnnvisError, match="units 0..7"):
        activation_maximization(net, "6", [8], steps=1, size=16)
    with pytest.raises(CnnvisError, match="no layer named"):
        activation_maximization(net, "conv9", [0], steps=1, size=16)
    with pytest.raises(CnnvisError, match="both mean and std"):
        activation_maximization(net, "6", [0], steps=1, size=16, mean=[0.5, 0.5, 0.5])
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    with pytest.raises(CnnvisError, match="4-D feature map"):
        activation_maximization(flat, "1", [0], steps=1, size=16)


def test_parameterisation_and_transforms():
    g = torch.Generator().manual_seed(0)
    param = FourierImage(2, (24, 20), generator=g)
    img = param()
    assert img.shape == (2, 3, 24, 20)
    assert (img - 0.5).abs().max() < 0.05  # starts near grey
    out = apply(lucid_set(), img, g)
    assert out.shape == (2, 3, 24 + 12, 20 + 12)
    # Without scaling, rotation or shift the canvas is the image framed by grey.
    same = apply(lucid_set(2, 0, scales=(1.0,), angles=(0,)), img, g)
    torch.testing.assert_close(same[:, :, 2:-2, 2:-2], img, atol=1e-5, rtol=0)
    torch.testing.assert_close(same[:, :, :2], torch.full_like(same[:, :, :2], 0.5))


# --- the default preset reaches the best stimulus; the Lucid preset is kept for comparison ---

PLANTED = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
MEAN_STD = {"mean": [0.5] * 3, "std": [0.25] * 3}


def planted_colour_net() -> nn.Sequential:
    """1x1-conv colour detectors: +w on the colour's channels, -w on the others (sum |w| = 2),
    bias -0.6, after (x - 0.5) / 0.25: silent on grey, 3.4 on a full frame of the pure colour."""
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        for u, rgb in enumerate(PLANTED.values()):
            w = torch.tensor([1.0 if v else -1.0 for v in rgb])
            conv.weight[u, :, 0, 0] = 2 * w / w.abs().sum()
        conv.bias.fill_(-0.6)
    return nn.Sequential(conv, nn.ReLU())


def map_max(net, images: torch.Tensor, units) -> torch.Tensor:
    """The dataset's statistic: the maximum of each unit's map on its image."""
    x = (images - 0.5) / 0.25
    with torch.no_grad():
        return net(x)[torch.arange(len(units)), torch.tensor(units)].amax(dim=(1, 2))


def test_planted_colour_units_get_their_colour():
    net = planted_colour_net()
    full = torch.stack([torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, 32, 32)
                        for c in PLANTED.values()])
    full_frame = map_max(net, full, range(4))
    torch.testing.assert_close(full_frame, torch.full((4,), 3.4))
    assert float(map_max(net, torch.full((4, 3, 32, 32), 0.5), range(4)).max()) == 0.0

    images, means = activation_maximization(net, "1", range(4), steps=96, size=32, **MEAN_STD)
    got = map_max(net, images, range(4))
    assert (got >= 0.95 * full_frame).all(), got
    # The whole frame takes the colour (the per-position redirect at the layer's ReLU), not a
    # few patches on grey: the mean of the map is close to the full frame's too.
    assert (means >= 0.9 * full_frame).all(), means
    colour = images.mean(dim=(2, 3))  # [4, 3] mean RGB of each unit's image
    for u, rgb in enumerate(PLANTED.values()):
        on = [c for c in range(3) if rgb[c]]
        off = [c for c in range(3) if not rgb[c]]
        assert colour[u, on].min() > 0.9 and colour[u, off].max() < 0.1, (u, colour[u])

    # The Lucid-faithful preset, at the same cost, falls short on at least one unit.
    lucid, _ = activation_maximization(net, "1", range(4), steps=96, size=32, preset="lucid",
                                       **MEAN_STD)
    assert (map_max(net, lucid, range(4)) < 0.95 * full_frame).any()


def test_presets_and_overrides():
    net = planted_colour_net()
    with pytest.raises(CnnvisError, match="unknown preset 'lucent'"):
        activation_maximization(net, "1", [0], steps=2, size=8, preset="lucent")
    with pytest.raises(CnnvisError, match="unknown objective"):
        activation_maximization(net, "1", [0], steps=2, size=8, objective="median")
    with pytest.raises(CnnvisError, match="polish_steps"):
        activation_maximization(net, "1", [0], steps=2, size=8, polish_steps=3)
    with pytest.raises(CnnvisError, match="unknown parameterization 'pixels'"):
        activation_maximization(net, "1", [0], steps=2, size=8, parameterization="pixels")
    # No polish, the mean objective and the plain Fourier image on the default preset = the
    # Lucid preset with the same redirect schedule, on a layer that is not a ReLU (no
    # per-position redirect)...
    kw = {"steps": 20, "size": 16, **MEAN_STD}
    same = {"objective": "mean", "polish_steps": 0, "redirect_steps": 16}
    a, _ = activation_maximization(net, "0", [0, 3], preset="lucid", **kw)
    b, _ = activation_maximization(net, "0", [0, 3], parameterization="fourier", **same, **kw)
    assert torch.equal(a, b)
    # ...the default's colour offset changes it...
    c, _ = activation_maximization(net, "0", [0, 3], **same, **kw)
    assert not torch.equal(a, c)
    # ...and so does, at the ReLU, the default's per-position redirect.
    a, _ = activation_maximization(net, "1", [0, 3], preset="lucid", **kw)
    b, _ = activation_maximization(net, "1", [0, 3], parameterization="fourier", **same, **kw)
    assert not torch.equal(a, b)


# --- objectives, transforms and parameterisations compose (Lucent's manner) ------------------

def test_objectives_compose_like_numbers():
    acts = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    a = acts.double()

    def close(obj, want):
        torch.testing.assert_close(obj(acts).double(), want, rtol=1e-6, atol=1e-6)

    close(channel(0) + 2 * channel(1), a[:, 0].mean() + 2 * a[:, 1].mean())
    close(channel(2) - channel_max(3) / 4, a[:, 2].mean() - a[:, 3].amax(dim=(1, 2)).mean() / 4)
    close(-channel(4) * 0.5 + 1.5, -0.5 * a[:, 4].mean() + 1.5)
    close(3 - channel(1), 3 - a[:, 1].mean())
    close(sum([channel(0), channel(1), channel(2)]), a[:, :3].mean(dim=(0, 2, 3)).sum())
    close(channel(1, batch=2), a[2, 1].mean())
    close(neuron(3, 1, 5), a[:, 3, 1, 5].mean())
    close(neuron(3), a[:, 3, 2, 3].mean())  # the centre
    # image i for unit u_i: the sum of the one-image objectives, in one gather
    close(per_image(channel, [4, 0, 4]), a[0, 4].mean() + a[1, 0].mean() + a[2, 4].mean())
    close(per_image(channel_max, [1, 2, 3]), a[0, 1].max() + a[1, 2].max() + a[2, 3].max())
    # diversity: minus the summed cosine similarity of the images' Gram matrices (pairs i != j)
    g = torch.stack([(m := a[i].reshape(5, -1)) @ m.T for i in range(3)]).reshape(3, -1)
    g = g / g.norm(dim=1, keepdim=True)
    sims = sum(float(g[i] @ g[j]) for i in range(3) for j in range(3) if i != j)
    close(diversity(), torch.tensor(-sims / 3, dtype=torch.float64))
    assert repr(channel(0) + 2 * channel(1)) == "Objective(channel(0) + 2 * (channel(1)))"
    with pytest.raises(TypeError):
        channel(0) * channel(1)
    with pytest.raises(TypeError, match="not an objective of one unit's map"):
        per_image(lambda u, batch=None: diversity(), [0])


def test_a_custom_objective_is_what_is_maximised():
    net = colour_net()
    kw = dict(steps=24, size=24, seed=2, preset="lucid")
    a, acts_a = activation_maximization(net, "3", [0, 2], objective="mean", **kw)
    b, acts_b = activation_maximization(net, "3", [0, 2],
                                        objective=lambda units: per_image(channel, units), **kw)
    assert torch.equal(a, b) and torch.equal(acts_a, acts_b)  # the preset's own objective
    # minimising (maximising minus) the mean drives it below the maximising run's
    _, low = activation_maximization(net, "3", [0, 2],
                                     objective=lambda units: -per_image(channel, units), **kw)
    assert (low < acts_a).all()


def test_transforms_compose_into_one_sampling():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 10, 12, generator=g)
    # pad alone: the image framed by grey
    framed = apply([pad(3)], img, torch.Generator())
    assert framed.shape == (2, 3, 16, 18)
    torch.testing.assert_close(framed[:, :, 3:-3, 3:-3], img, atol=1e-5, rtol=0)
    torch.testing.assert_close(framed[:, :, :3], torch.full_like(framed[:, :, :3], 0.5))
    # the list order is the order of the random draws
    ref = apply(lucid_set(), img, torch.Generator().manual_seed(5))
    got = apply([pad(12), random_scale(), random_rotate(), jitter(12)], img,
                torch.Generator().manual_seed(5))
    assert torch.equal(ref, got)
    other = apply([pad(12), random_rotate(), random_scale(), jitter(12)], img,
                  torch.Generator().manual_seed(5))
    assert not torch.equal(ref, other)
    # a jitter of 2 crops 2 pixels and shifts by whole pixels within [-1, 1]
    shifted = apply([jitter(2)], img, torch.Generator().manual_seed(1))
    assert shifted.shape == (2, 3, 8, 10)
    for k in range(2):
        assert any(torch.allclose(shifted[k], img[k, :, 1 + dy:9 + dy, 1 + dx:11 + dx],
                                  atol=1e-5) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_parameterisations_are_functions():
    g = torch.Generator().manual_seed(0)
    params, image_f = fourier(2, (8, 6), generator=g)
    assert [p.shape for p in params] == [(2, 3, 8, 4, 2)]
    ref = FourierImage(2, (8, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_f(), ref())  # the same image for the same draw
    start = torch.rand(1, 3, 4, 4, generator=g) * 0.98 + 0.01
    params, image_f = pixel(start)
    torch.testing.assert_close(image_f(), start, atol=1e-6, rtol=0)
    with torch.no_grad():
        params[0].add_(100.0)
    assert torch.allclose(image_f(), torch.ones_like(start))  # the pixels are the parameters
