"""Network inversion on a tiny net: the representation error falls and ends small, an invertible
layer is reconstructed almost exactly without regularisers, and the spread matches its
definition."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import (
    NORMALIZED_ERROR_FORMULA,
    layer_representation,
    paper_lambda_tv,
    relative_depth,
    representation_spread,
)
from cnnvis_pipeline.viz import invert as _invert

# the schema's views.inversion settings (what a test does not set)
INVERSION = {k: v for k, v in dataclasses.asdict(Views.parse(None).inversion).items()
             if k not in ("images", "layers")}


def invert(*args, **kw):
    return _invert(*args, **{**INVERSION, **kw})


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
    # A light TV weight (the paper's for this depth, 1.2, is tested below): the data term wins.
    recon, errors = invert(net, "6", x0, steps=120, lambda_tv=0.01)
    assert recon.shape == x0.shape and errors.shape == (3,)
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


def test_representation_spread_is_the_mean_over_all_n_squared_pairs():
    # As the paper's reference code: the mean of the whole n x n matrix of squared distances,
    # its zero diagonal included (not the mean over the n (n - 1) pairs i != j).
    net = tiny_net()
    x = blobs(5, seed=3)
    phi = layer_representation(net, "4", x, batch_size=2).flatten(1).double()
    pairs = [((phi[i] - phi[j]) ** 2).sum() for i in range(5) for j in range(5)]
    want = float(torch.stack(pairs).mean())
    assert "1/n^2" in NORMALIZED_ERROR_FORMULA and "diagonal included" in NORMALIZED_ERROR_FORMULA
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


def test_relative_depth_and_the_papers_tv_schedule():
    net = tiny_net()  # 7 leaf modules
    x = blobs(1)
    assert relative_depth(net, "0", x) == pytest.approx(1 / 7)
    assert relative_depth(net, "4", x) == pytest.approx(5 / 7)
    assert relative_depth(net, "6", x) == 1.0
    # AlexNet's 20 layers: 1-6 -> 0.012, 7-12 -> 0.12, 13-20 -> 1.2 (the paper's 1 / 10 / 100).
    assert [paper_lambda_tv(p / 20) for p in (1, 6, 7, 12, 13, 20)] == [
        0.012, 0.012, 0.12, 0.12, 1.2, 1.2]
    from torchvision.models import alexnet

    a = alexnet(weights=None)
    img = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    depths = {layer: relative_depth(a, layer, img)
              for layer in ("features.1", "features.4", "features.7", "classifier.5")}
    assert [paper_lambda_tv(d) for d in depths.values()] == [0.012, 0.012, 0.12, 1.2]
    # A container's depth is that of its last module.
    assert relative_depth(a, "features", img) == relative_depth(a, "features.12", img)


# Per layer of the tiny net, with the paper's TV weight for its depth (0.012, 0.012, 0.12, 1.2,
# 1.2): the relative feature error of 120 steps stays below these bounds (measured 0.033, 0.026,
# 0.072, 0.081, 0.165), and below the error of the (near-grey) start.
ERROR_BOUNDS = {"0": 0.05, "1": 0.05, "3": 0.11, "4": 0.12, "6": 0.25}


@pytest.mark.parametrize("layer", list(ERROR_BOUNDS))
def test_inversion_error_bounds_per_layer(layer):
    net = tiny_net()
    x0 = blobs()
    _, start = invert(net, layer, x0, steps=0)
    recon, errors = invert(net, layer, x0, steps=120)
    assert (errors < ERROR_BOUNDS[layer]).all(), errors
    assert (errors < start).all()
    # The deep layers are smoothed as the paper smooths them: a larger TV weight than the
    # former fixed 0.01 gives a smoother image.
    if paper_lambda_tv(relative_depth(net, layer, x0)) > 0.1:
        fixed, _ = invert(net, layer, x0, steps=120, lambda_tv=0.01)

        def tv(x):
            return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
                    + (x[..., 1:] - x[..., :-1]).abs().mean())

        assert tv(recon) < tv(fixed)
