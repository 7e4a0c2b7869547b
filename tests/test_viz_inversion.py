"""Network inversion on a tiny net: the representation error falls and ends small, an invertible
layer is reconstructed almost exactly without regularisers, and the spread matches its
definition."""

from __future__ import annotations

import dataclasses

import numpy as np
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
from cnnvis_pipeline.viz.inversion import (
    PAPER_TV_BANDS,
    TV_RATIO,
    TYPICAL_PIXEL_NORM,
    alpha_norm,
    tv_norm,
    unrelated_baseline,
)

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
    # The paper's bands of AlexNet's 20 layers: 1-6 -> 0.001, 7-12 -> 0.005, 13-20 -> 0.025.
    assert [paper_lambda_tv(p / 20) for p in (1, 6, 7, 12, 13, 20)] == [
        0.001, 0.001, 0.005, 0.005, 0.025, 0.025]
    from torchvision.models import alexnet

    a = alexnet(weights=None)
    img = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    depths = {layer: relative_depth(a, layer, img)
              for layer in ("features.1", "features.4", "features.7", "classifier.5")}
    assert [paper_lambda_tv(d) for d in depths.values()] == [0.001, 0.001, 0.005, 0.025]
    # A container's depth is that of its last module.
    assert relative_depth(a, "features", img) == relative_depth(a, "features.12", img)


# Per layer of the tiny net, with the TV weight for its depth (0.001, 0.001, 0.005, 0.025,
# 0.025): the relative feature error of 120 steps stays below these bounds (measured 0.002,
# 0.003, 0.013, 0.035, 0.035), and below the error of the (near-grey) start.
ERROR_BOUNDS = {"0": 0.01, "1": 0.01, "3": 0.03, "4": 0.07, "6": 0.07}


@pytest.mark.parametrize("layer", list(ERROR_BOUNDS))
def test_inversion_error_bounds_per_layer(layer):
    net = tiny_net()
    x0 = blobs()
    _, start = invert(net, layer, x0, steps=0)
    recon, errors = invert(net, layer, x0, steps=120)
    assert (errors < ERROR_BOUNDS[layer]).all(), errors
    assert (errors < start).all()
    # The deep layers are smoothed as the paper smooths them: smoother than without TV.
    if paper_lambda_tv(relative_depth(net, layer, x0)) == PAPER_TV_BANDS[-1][1]:
        fixed, _ = invert(net, layer, x0, steps=120, lambda_tv=0.0)

        def tv(x):
            return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
                    + (x[..., 1:] - x[..., :-1]).abs().mean())

        assert tv(recon) < tv(fixed)


# --- the paper's normalised objective, and the unrelated-image baseline -------------------------

def test_regularisers_are_the_papers_normalised_terms():
    """R_alpha = (1 / (H W B^alpha)) sum ||x_uv - c||^alpha and R_TV = (1 / (H W V^beta))
    sum (|dx|^2 + |dy|^2)^(beta / 2), with numpy; the same value at twice the size."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 12, 10, generator=g)
    c = np.array([0.485, 0.456, 0.406])
    b, v = 80 / 255, 80 / 255 / 6.5
    assert TYPICAL_PIXEL_NORM == pytest.approx(b) and TYPICAL_PIXEL_NORM / TV_RATIO == v
    xn = x.double().numpy()
    for alpha in (6.0, 2.0):
        norm = np.sqrt(((xn - c[None, :, None, None]) ** 2).sum(axis=1))
        want = (norm**alpha).sum(axis=(1, 2)) / (12 * 10 * b**alpha)
        got = alpha_norm(x, torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1), alpha, b)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)
    dx = np.zeros_like(xn)
    dy = np.zeros_like(xn)
    dx[..., :, :-1] = xn[..., :, 1:] - xn[..., :, :-1]
    dy[..., :-1, :] = xn[..., 1:, :] - xn[..., :-1, :]
    for beta in (2.0, 1.0):
        want = (((dx**2 + dy**2).sum(axis=1)) ** (beta / 2)).sum(axis=(1, 2)) / (120 * v**beta)
        np.testing.assert_allclose(tv_norm(x, beta, v).numpy(), want, rtol=1e-3)
    # Normalised by the number of pixels: a 2x nearest upsampling keeps the alpha term exactly.
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    centre = torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1)
    torch.testing.assert_close(alpha_norm(up, centre, 6.0, b), alpha_norm(x, centre, 6.0, b))


def test_unrelated_baseline_is_the_mean_relative_error_of_the_other_images():
    g = torch.Generator().manual_seed(5)
    phi0 = torch.rand(3, 4, 5, 5, generator=g)
    others = torch.rand(40, 4, 5, 5, generator=g)
    others[7] = phi0[1]  # the target itself among the others: left out
    got = unrelated_baseline(phi0, others, [[], [7], [0, 1]])
    a, o = phi0.double().numpy().reshape(3, -1), others.double().numpy().reshape(40, -1)
    for k, skip in enumerate([[], [7], [0, 1]]):
        rows = [j for j in range(40) if j not in skip]
        want = np.mean([((o[j] - a[k]) ** 2).sum() for j in rows]) / (a[k] ** 2).sum()
        assert float(got[k]) == pytest.approx(want, rel=1e-9)


def _dataset_images(n: int, size: int, tmp_path) -> torch.Tensor:
    from PIL import Image

    from cnnvis_pipeline.data.synth import generate_broden_synth

    root = generate_broden_synth(tmp_path / f"ds{size}", n_images=n, image_size=size, seed=7)
    files = sorted((root / "images").rglob("*.jpg"))[:n]
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32)
                                         ).permute(2, 0, 1) / 255 for f in files])


def _check_against_baseline(model, names, x0, others, mean, std, steps, mid):
    """Per layer of `model.features` (names: child name -> its index): the reconstruction's
    relative error against the baseline computed here with torch on the Sequential's slices;
    below the baseline everywhere, below a fifth of it at the mid-depth layers."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    ratios = {}
    for name, k in names.items():
        with torch.no_grad():
            phi0 = model.features[:k + 1]((x0 - m) / s).flatten(1).double()
            phi = model.features[:k + 1]((others - m) / s).flatten(1).double()
        base = torch.stack([((phi - p0) ** 2).sum(1).mean() / (p0**2).sum() for p0 in phi0])
        _, err = invert(model, f"features.{name}", x0, steps=steps, mean=mean, std=std)
        ratios[name] = (err.double() / base).max().item()
        assert ratios[name] < (0.2 if name in mid else 1.0), (name, ratios)
    return ratios


def _mid(model, names, x, mean, std) -> list[str]:
    """The layers in the paper's second band (relative depth in (6/20, 12/20])."""
    return [n for n in names if 6 / 20 < relative_depth(model, f"features.{n}", x, mean=mean,
                                                        std=std) <= 12 / 20]


def test_reconstruction_beats_the_unrelated_image_on_every_layer(tmp_path):
    """A random VGG-11 at 32 px (the library's 300 steps) and a random synthnet at 64 px (the
    demo's 100 steps), on broden-synth images: every layer's reconstruction is nearer its target
    than an unrelated image is, and at mid-depth (the paper's second band) within a fifth."""
    from torchvision.models import vgg11

    from cnnvis_pipeline.models.synthnet import SynthNet

    torch.manual_seed(0)
    vgg = vgg11(weights=None).eval()
    imgs = _dataset_images(18, 32, tmp_path)
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    names = {str(k): k for k in (4, 9, 14, 19)}
    mid = _mid(vgg, names, imgs[:1], *imagenet)
    assert mid == ["9", "14"]
    _check_against_baseline(vgg, names, imgs[:2], imgs[2:], *imagenet, 300, mid)

    torch.manual_seed(0)
    synth = SynthNet().eval()
    imgs = _dataset_images(18, 64, tmp_path)
    names = {n: k for k, n in enumerate(dict(synth.features.named_children()))
             if n in ("relu2", "relu3", "relu4")}
    mid = _mid(synth, names, imgs[:1], [0.5] * 3, [0.25] * 3)
    assert mid == ["relu2"]
    _check_against_baseline(synth, names, imgs[:2], imgs[2:], [0.5] * 3, [0.25] * 3, 100, mid)


def test_trained_synthnet_reconstruction_beats_the_unrelated_image(prepared_dir):
    """The demo's model, trained (a small one: width 8, 3 epochs on the test dataset), its demo
    layers relu3 and relu4 at the demo's 100 steps."""
    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models.synthnet import train_synthnet

    ds = PreparedDataset(prepared_dir)
    grey = ([0.5] * 3, [0.25] * 3)
    model, _history, _names = train_synthnet(ds, epochs=3, width=8, progress=False,
                                             mean=grey[0], std=grey[1])
    imgs = torch.from_numpy(np.array(ds.images)).permute(0, 3, 1, 2).float() / 255
    names = {n: k for k, n in enumerate(dict(model.features.named_children()))
             if n in ("relu3", "relu4")}
    ratios = _check_against_baseline(model.eval(), names, imgs[:2], imgs[2:], *grey, 100, [])
    assert max(ratios.values()) < 0.1, ratios  # measured 0.025 (0.19 with 10x the TV weights)
