"""Network inversion on a tiny net: the representation error falls and ends small, an invertible
layer is reconstructed almost exactly without regularisers, and the spread matches its
definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.viz import invert, layer_representation, representation_spread


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
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


def blobs(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=size, mode="bilinear",
                         align_corners=False)


def test_error_decreases_and_is_small():
    net = tiny_net()
    x0 = blobs()
    _, start = invert(net, "6", x0, steps=0)
    recon, errors = invert(net, "6", x0, steps=120)
    assert recon.shape == x0.shape and errors.shape == (3,)
    assert recon.min() >= 0 and recon.max() <= 1
    assert (errors < 0.3 * start).all()
    assert (errors < 0.05).all()
    # errors are those of the returned reconstructions
    phi0 = layer_representation(net, "6", x0)
    phi = layer_representation(net, "6", recon)
    want = ((phi - phi0) ** 2).flatten(1).sum(1) / (phi0**2).flatten(1).sum(1)
    torch.testing.assert_close(errors, want, rtol=1e-4, atol=1e-7)


def test_invertible_layer_is_reconstructed_without_regularisers():
    net = tiny_net()
    x0 = blobs(2)
    recon, errors = invert(net, "2", x0, steps=200, lambda_alpha=0.0, lambda_tv=0.0)
    assert (errors < 1e-4).all()
    assert (recon - x0).abs().mean() < 0.01


def test_regularisers_smooth_the_reconstruction():
    net = tiny_net()
    x0 = blobs(2)
    rough, _ = invert(net, "6", x0, steps=60, lambda_tv=0.0)
    smooth, _ = invert(net, "6", x0, steps=60, lambda_tv=1.0)

    def tv(x):
        return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()

    assert tv(smooth) < 0.7 * tv(rough)


def test_deterministic_and_normalised_input():
    net = tiny_net()
    x0 = blobs(2)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    a, ea = invert(net, "6", x0, steps=20, seed=1, mean=mean, std=std)
    b, eb = invert(net, "6", x0, steps=20, seed=1, mean=mean, std=std)
    assert torch.equal(a, b) and torch.equal(ea, eb)
    phi0 = layer_representation(net, "6", x0, mean=mean, std=std)
    with torch.no_grad():
        direct = net((x0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(phi0, direct)


def test_representation_spread_is_mean_pairwise_squared_distance():
    net = tiny_net()
    x = blobs(5, seed=3)
    phi = layer_representation(net, "4", x, batch_size=2).flatten(1).double()
    pairs = [((phi[i] - phi[j]) ** 2).sum() for i in range(5) for j in range(5) if i != j]
    want = float(torch.stack(pairs).mean())
    assert representation_spread(net, "4", x, batch_size=2) == pytest.approx(want, rel=1e-9)
    with pytest.raises(CnnvisError, match="at least 2"):
        representation_spread(net, "4", x[:1])


def test_errors():
    net = tiny_net()
    with pytest.raises(CnnvisError, match=r"\[N, 3, H, W\]"):
        invert(net, "6", torch.rand(3, 32, 32), steps=1)
    with pytest.raises(CnnvisError, match="no layer named"):
        invert(net, "9", blobs(1), steps=1)
    with pytest.raises(CnnvisError, match="all zeros"):
        invert(net, "6", torch.zeros(1, 3, 32, 32), steps=1)
