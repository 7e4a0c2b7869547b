"""A representative subset of the torchvision zoo check (the full sweep: benchmarks/zoo.md).

Each architecture is built with random weights at a small input, its late layer is chosen from
one probe forward and dissected on 8 images; the layouts chosen are the families' defaults."""

from __future__ import annotations

import pytest

from cnnvis_pipeline.bench.zoo import check_arch, late_layer, zoo_spec


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    from cnnvis_pipeline.data.prepared import prepare_dataset
    from cnnvis_pipeline.data.synth import generate_broden_synth

    root = tmp_path_factory.mktemp("zoo")
    ds = generate_broden_synth(root / "ds", n_images=8, image_size=32, seed=1)
    return prepare_dataset(ds, root / "prep", progress=False)


@pytest.mark.parametrize("arch, layer, layout, fmap", [
    ("resnet18", "layer4.1", "nchw", "512x4x4"),
    ("swin_t", "norm", "nhwc", "768x4x4"),
    ("vit_b_32", "encoder.ln", "tokens:1", "768x4x4"),
    ("mobilenet_v3_small", "features.12", "nchw", "576x4x4"),
])
def test_zoo_subset(tiny_prepared, arch, layer, layout, fmap):
    row = check_arch(arch, tiny_prepared, batch_size=8)
    assert row["status"] == "dissected", row
    assert (row["layer"], row["layout"], row["feature_map"]) == (layer, layout, fmap)
    assert row["message"] == f"{fmap.split('x')[0]} units"


def test_zoo_specs_and_layer_choice():
    assert zoo_spec("vit_h_14")["kwargs"] == {"image_size": 56}
    assert zoo_spec("maxvit_t")["input_size"] == [224, 224]

    class Row:
        def __init__(self, name, calls, fmap):
            self.name, self.calls, self.feature_map = name, calls, fmap

    rows = [Row("layer3", 1, (4, 2, 2)), Row("layer4", 1, (8, 2, 2)), Row("layer4.0.relu", 2,
            (8, 2, 2)), Row("avgpool", 1, (8, 1, 1)), Row("head", 1, (8, 2, 2)),
            Row("late.deep.x", 1, (8, 2, 2)), Row("fc", 1, None)]
    assert late_layer(rows) == "layer4"
