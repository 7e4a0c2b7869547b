"""A model with hand-planted colour detectors: the dissection must recover their labels."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.pipeline import dissect
from cnnvis_pipeline.settings import Job


class PlantedColours(nn.Module):
    """Units 0-2 fire on red, green and blue paint; unit 3 is a fixed random pattern."""

    def __init__(self):
        super().__init__()
        self.colour = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.colour.weight.zero_()
            for unit in range(3):
                self.colour.weight[unit, :, 0, 0] = -0.5
                self.colour.weight[unit, unit, 0, 0] = 1.0
            self.colour.bias.copy_(torch.tensor([-0.3, -0.3, -0.3, 0.0]))
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("pattern", torch.rand(1, 1, 16, 16, generator=g))

    def forward(self, x):
        out = self.pool(self.relu(self.colour(x)))
        return torch.cat([out[:, :3], self.pattern.expand(len(x), 1, *out.shape[-2:])], 1)


def test_pipeline_recovers_planted_detectors(prepared_dir, tmp_path):
    ds = PreparedDataset(prepared_dir)
    spec = {"name": "planted", "layers": ["pool"], "mean": [0, 0, 0], "std": [1, 1, 1],
            "dissection": {"quantile": 0.01, "iou_threshold": 0.04},
            "resources": {"batch_size": 16, "device": "cpu"}}
    model = PlantedColours()
    wrapper = nn.Sequential()
    wrapper.add_module("pool", model)
    out = dissect(Job.from_spec(spec), ds, tmp_path / "out", model=wrapper, keep_on_device=True,
                  progress=False)
    units = out["units"]["pool"].set_index("unit")
    assert units.loc[0, "concept"] == "red" and units.loc[2, "concept"] == "blue"
    assert units.loc[0, "category"] == units.loc[2, "category"] == "color"
    # green paint is also grass (material and object): either label is right
    assert units.loc[1, "concept"] in ("green", "grass")
    assert (units.loc[[0, 1, 2], "iou"] > 0.04).all() and units.loc[[0, 1, 2], "detector"].all()
    assert not units.loc[3, "detector"]  # the random pattern detects nothing
    assert (tmp_path / "out/pool/iou.parquet").exists()
    assert np.isfinite(out["thresholds"]["pool"]).all()
