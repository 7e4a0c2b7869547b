"""Activation maximisation reaches the optimum where it is known, checked with numpy code that
shares nothing with the package: linear colour units (1x1 convolution on the normalised image,
ReLU, global average or max pooling) against the best uniform frame (the corner of the colour
cube), oriented-edge units (a Gabor filter) against the best grating of a small search, and a
trained model's units against the best image of its dataset."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from cnnvis_pipeline.settings import Views
from cnnvis_pipeline.viz import activation_maximization as _activation_maximization
from cnnvis_pipeline.viz._common import layer_forward

AM = dataclasses.asdict(Views.parse(None).activation_max)  # the library's defaults
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
NORM = {"mean": MEAN.tolist(), "std": STD.tolist()}
# Colour directions w (on the normalised image) and bias: saturated primaries, a mixture
# (yellow), a dark and a desaturated direction.
UNITS = {"red": ((1.0, -0.5, -0.5), 0.1), "blue": ((-0.5, -0.5, 1.0), 0.1),
         "yellow": ((1.0, 1.0, -1.0), 0.1), "dark": ((-1.0, -1.0, -1.0), 0.1),
         "desaturated": ((0.3, -0.2, 0.1), 0.1), "white": ((0.4, 0.3, 0.3), -0.5)}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def am(net, units, **kw):
    return _activation_maximization(net, "2", units, **{**AM, "seed": 0, **NORM, **kw})


def colour_net(pool: str) -> nn.Sequential:
    conv = nn.Conv2d(3, len(UNITS), 1)
    with torch.no_grad():
        for u, (w, b) in enumerate(UNITS.values()):
            conv.weight[u, :, 0, 0] = torch.tensor(w)
            conv.bias[u] = b
    return nn.Sequential(conv, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1))


def unit_value(w, b, rgb: np.ndarray) -> np.ndarray:
    """relu(w . (rgb - mean) / std + b) for rgb [..., 3]."""
    return np.maximum(((rgb - MEAN) / STD) @ np.asarray(w) + b, 0.0)


def best_frame(w, b) -> float:
    """The best uniform frame of a linear unit: the best corner of the colour cube."""
    corners = np.array(list(itertools.product([0.0, 1.0], repeat=3)))
    return float(unit_value(w, b, corners).max())


@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("steps,size", [(96, 64), (AM["steps"], AM["size"])],
                         ids=["demo", "library"])
def test_linear_colour_units_reach_the_best_uniform_frame(pool, steps, size):
    net = colour_net(pool)
    images, acts = am(net, range(len(UNITS)), steps=steps, size=size)
    pixels = images.permute(0, 2, 3, 1).double().numpy()  # [N, H, W, 3]
    for u, (name, (w, b)) in enumerate(UNITS.items()):
        best = best_frame(w, b)
        assert best > 1.0
        per_pixel = unit_value(w, b, pixels[u])
        achieved = per_pixel.mean() if pool == "avg" else per_pixel.max()
        assert achieved >= 0.95 * best, (name, achieved, best)
        assert float(acts[u]) == pytest.approx(achieved, rel=1e-4)
        if pool == "avg":  # the whole image takes the best corner's colour
            corner = np.array(list(itertools.product([0.0, 1.0], repeat=3)))[
                unit_value(w, b, np.array(list(itertools.product([0.0, 1.0], repeat=3)))).argmax()]
            assert np.abs(pixels[u].mean(axis=(0, 1)) - corner).max() < 0.05, (name,)


def test_lucid_preset_stays_short_of_the_uniform_frame():
    """The Lucid-faithful preset keeps Lucid's behaviour: at the demo's cost it falls short."""
    images, _ = am(colour_net("avg"), range(len(UNITS)), steps=96, size=64, preset="lucid")
    pixels = images.permute(0, 2, 3, 1).double().numpy()
    ratios = [unit_value(w, b, pixels[u]).mean() / best_frame(w, b)
              for u, (w, b) in enumerate(UNITS.values())]
    assert min(ratios) < 0.5, ratios


# --- a unit whose optimum is a spatial pattern: a grating of the filter's orientation ----------

K, PERIOD, SIGMA = 9, 6.0, 2.5
THETAS = (30.0, 120.0)  # degrees, the direction in which the filter's stripes alternate


def gabor(theta_deg: float) -> np.ndarray:
    r = np.arange(K) - K // 2
    y, x = np.meshgrid(r, r, indexing="ij")
    t = math.radians(theta_deg)
    g = np.exp(-(x**2 + y**2) / (2 * SIGMA**2)) * np.cos(2 * np.pi * (x * math.cos(t)
                                                                     + y * math.sin(t)) / PERIOD)
    return g - g.mean()


def gabor_net(pool: str) -> nn.Sequential:
    conv = nn.Conv2d(3, len(THETAS), K)
    with torch.no_grad():
        for u, t in enumerate(THETAS):
            conv.weight[u] = torch.from_numpy(gabor(t)).float()[None].expand(3, K, K)
        conv.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1))


def gabor_value(theta_deg: float, rgb: np.ndarray, pool: str) -> float:
    """The unit on an image [H, W, 3] with numpy: valid correlation of the normalised image with
    the filter on every channel, ReLU, mean or max."""
    x = ((rgb - MEAN) / STD).sum(axis=2)
    windows = sliding_window_view(x, (K, K))
    out = np.maximum(np.einsum("ijkl,kl->ij", windows, gabor(theta_deg)), 0.0)
    return float(out.mean() if pool == "avg" else out.max())


def best_grating(theta_deg: float, pool: str, size: int = 64) -> float:
    """The best of square-wave gratings over 12 orientations, 5 periods and 8 phases."""
    r = np.arange(size)
    y, x = np.meshgrid(r, r, indexing="ij")
    best = 0.0
    for angle in np.arange(0, 180, 15):
        u = x * math.cos(math.radians(angle)) + y * math.sin(math.radians(angle))
        for period in (5.0, 5.5, 6.0, 6.5, 7.0):
            for phase in np.linspace(0, 2 * np.pi, 8, endpoint=False):
                g = (np.cos(2 * np.pi * u / period + phase) > 0).astype(float)
                best = max(best, gabor_value(theta_deg, np.repeat(g[..., None], 3, 2), pool))
    return best


def dominant_orientation(gray: np.ndarray) -> float:
    """The direction (degrees in [0, 180)) of the strongest frequency of the image's spectrum,
    among frequencies above 1/16 cycles per pixel."""
    p = np.abs(np.fft.fft2(gray - gray.mean())) ** 2
    fy = np.fft.fftfreq(gray.shape[0])[:, None] * np.ones(gray.shape)
    fx = np.fft.fftfreq(gray.shape[1])[None, :] * np.ones(gray.shape)
    p[np.hypot(fx, fy) < 1 / 16] = 0
    k = np.unravel_index(p.argmax(), p.shape)
    return math.degrees(math.atan2(fy[k], fx[k])) % 180


@pytest.mark.parametrize("steps,size", [(96, 64), (AM["steps"], AM["size"])],
                         ids=["demo", "library"])
def test_oriented_edge_units_make_gratings_of_their_orientation(steps, size):
    avg, _ = am(gabor_net("avg"), range(len(THETAS)), steps=steps, size=size)
    mx, _ = am(gabor_net("max"), range(len(THETAS)), steps=steps, size=size)
    for u, theta in enumerate(THETAS):
        pixels = avg[u].permute(1, 2, 0).double().numpy()
        angle = dominant_orientation(pixels.mean(axis=2))
        assert min(abs(angle - theta), 180 - abs(angle - theta)) <= 15, (theta, angle)
        # Average pooling needs one coherent grating over the whole image (measured 0.99-1.01
        # of the best grating at both costs; patches of different phase give about 0.8).
        ratio = gabor_value(theta, pixels, "avg") / best_grating(theta, "avg")
        assert ratio >= 0.95, (theta, ratio)
        # Max pooling needs the grating under one window.
        pixels = mx[u].permute(1, 2, 0).double().numpy()
        ratio = gabor_value(theta, pixels, "max") / best_grating(theta, "max")
        assert ratio >= 0.95, (theta, ratio)


# --- a trained model: beyond the best natural image, at the dataset's size and at twice it --------

GREY = {"mean": [0.5] * 3, "std": [0.25] * 3}


def activation_maximization(*args, **kw):
    return _activation_maximization(*args, **{**AM, **kw})


@pytest.fixture(scope="module")
def trained_tiny(prepared_dir):
    from cnnvis_pipeline.data.prepared import PreparedDataset
    from cnnvis_pipeline.models.synthnet import train_synthnet

    torch.set_num_threads(1)
    ds = PreparedDataset(prepared_dir)
    model, _history, _names = train_synthnet(ds, epochs=3, width=8, progress=False, **GREY)
    images = torch.from_numpy(np.array(ds.images)).permute(0, 3, 1, 2).float() / 255
    return model.eval(), images


def test_am_beats_the_best_natural_image_of_a_trained_model(trained_tiny):
    model, images = trained_tiny
    layer = "features.relu3"
    with torch.no_grad():
        acts = layer_forward(model, layer, (images - 0.5) / 0.25)
    dataset_top = acts.amax(dim=(0, 2, 3))  # per unit: max over images and positions
    units = [u for u in range(acts.shape[1]) if dataset_top[u] > 0]
    assert len(units) >= 8
    size = images.shape[-1]
    am, _ = activation_maximization(model, layer, units, steps=48, size=size, preset="default",
                                   **GREY)
    with torch.no_grad():
        a = layer_forward(model, layer, (am - 0.5) / 0.25)
    achieved = a[torch.arange(len(units)), torch.tensor(units)].amax(dim=(1, 2))
    ratio = achieved / dataset_top[units]
    assert (ratio >= 1.0).all(), ratio
    # At twice the size, fed at the dataset's input size, it still does.
    big, _ = activation_maximization(model, layer, units[:4], steps=48, size=2 * size,
                                     input_size=size, **GREY)
    with torch.no_grad():
        x = F.interpolate(big, size=(size, size), mode="bilinear", align_corners=False)
        a = layer_forward(model, layer, (x - 0.5) / 0.25)
    achieved = a[torch.arange(4), torch.tensor(units[:4])].amax(dim=(1, 2))
    assert (achieved >= dataset_top[units[:4]]).all()


def test_polish_window_is_exactly_zero_outside_its_disk():
    """Outside the nucleation window the image is exactly grey (a tiny residue would be
    amplified by the ReLUs' masks into a pattern of its own once the window reaches it)."""
    from cnnvis_pipeline.viz.polish import disk

    w = disk(20, 20, 4.0).numpy()
    y, x = np.meshgrid(np.arange(20) - 9.5, np.arange(20) - 9.5, indexing="ij")
    r = np.hypot(y, x)
    assert (w[r >= 4.5] == 0).all() and (w[r <= 3.5] == 1).all()
    assert ((w > 0) & (w < 1)).sum() > 0  # a one-pixel linear edge
