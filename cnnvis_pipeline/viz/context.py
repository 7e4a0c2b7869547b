"""What every view of one layer works with, and the view interface.

- LayerContext: the job, the layer, the prepared dataset, the model (on its device, with its
  layouts), the dissection tables of the layer (units, top images, thresholds), the temporary
  viz/ directory the views write into.
- View: a name, a title, settings(views) -> the part of the `views:` settings it reads (the
  manifest records it), compute(context, units, views) -> ViewResult, and every_detector:
  whether its units are the selected ones plus every other detector of the layer (the top
  images: every detector gets a card) or the selected ones only.
- ViewResult: what a view hands the manifest and the tables: per unit its card entry, the layer
  entry, a note (why there is nothing: switched off, refused) and the columns of its tables.
  The entries follow tables.VIEW_ENTRIES[name]; the report shows them through the template
  reports/templates/views/<name>.html.
- Clock: wall-clock and CPU seconds of each view.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.models.hooks import LayerRecorder
from cnnvis_pipeline.models.input import images_to_input, to_unit_float
from cnnvis_pipeline.settings import Job, Views


def unit_file(unit: int, view: str) -> str:
    return f"unit{unit:04d}_{view}.png"


@dataclass
class LayerContext:
    job: Job
    layer: str
    ds: PreparedDataset
    model: torch.nn.Module
    device: torch.device
    out: Path  # the temporary viz/ directory
    units: pd.DataFrame  # units.parquet, by unit
    top: pd.DataFrame  # top_images.parquet
    thresholds: np.ndarray  # T_k per unit
    selected: list[int] = field(default_factory=list)  # the units that get every view

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def spec(self) -> dict:
        return self.job.model

    @property
    def layouts(self) -> dict:
        return dict(self.spec.get("layouts") or {})

    @property
    def norm(self) -> dict:
        """The keyword arguments of the viz algorithms: normalisation, name, layouts."""
        return {"mean": self.spec["mean"], "std": self.spec["std"], "model_name": self.name,
                "layouts": self.layouts}

    @property
    def input_size(self) -> tuple[int, int]:
        """The dataset's input size: the model's input_size, else the prepared images' size."""
        size = self.spec.get("input_size")
        return tuple(size) if size is not None else tuple(int(v)
                                                          for v in self.ds.images.shape[1:3])

    def images(self, idx) -> torch.Tensor:
        """[N, 3, h, w] in [0, 1] as the model sees them before normalisation."""
        x = np.ascontiguousarray(self.ds.images[np.asarray(idx, np.int64)])
        return to_unit_float(x, self.spec.get("input_size"), self.device)

    def top_rows(self, unit: int) -> pd.DataFrame:
        """The unit's top images, best first."""
        return self.top[self.top["unit"] == unit].sort_values("rank")

    def dataset_top(self, unit: int) -> float | None:
        """The highest maximum activation among the unit's top images (None without any)."""
        v = self.top.loc[self.top["unit"] == unit, "max_activation"]
        return float(v.max()) if len(v) else None

    @torch.no_grad()
    def activations(self, idx) -> torch.Tensor:
        """float32 [N, U, h, w] activations of the layer for dataset images `idx` (the
        dissection's input pipeline: models.input.images_to_input), in batches."""
        idx = np.asarray(idx, np.int64)
        batch = self.job.resources.batch_size
        outs = []
        with LayerRecorder(self.model, [self.layer], model_name=self.name, stop_after_last=True,
                           layouts=self.layouts) as rec:
            for start in range(0, len(idx), batch):
                x = images_to_input(np.ascontiguousarray(self.ds.images[idx[start:start + batch]]),
                                    self.spec.get("input_size"), self.spec["mean"],
                                    self.spec["std"], self.device)
                outs.append(rec.run(x)[self.layer].float())
        return torch.cat(outs)


@dataclass
class ViewResult:
    cards: dict[int, dict] = field(default_factory=dict)  # unit -> its card entry
    layer: dict = field(default_factory=dict)
    note: str | None = None
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # name -> columns


@dataclass(frozen=True)
class View:
    name: str  # a key of tables.VIEW_ENTRIES and the name of its report template
    title: str  # what the report calls it
    settings: Callable[[Views], dict]
    compute: Callable[[LayerContext, list[int], Views], ViewResult]
    # True: the view also runs for every detector of the layer beyond the selected units (the
    # report gives every detector a card); False: the selected units only
    every_detector: bool = False


def columns(*names: str) -> dict[str, list]:
    return {n: [] for n in names}


def append(rows: dict[str, list], **values) -> None:
    for key, v in values.items():
        rows[key].append(v)


class Clock:
    """Wall-clock and process CPU seconds of each view, synchronised with the device."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}  # this process, all threads

    @contextmanager
    def time(self, key: str):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.sync()
        self.seconds[key] = time.perf_counter() - t0
        self.cpu_seconds[key] = time.process_time() - c0
