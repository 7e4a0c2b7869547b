"""Shared fixtures: tiny broden-synth datasets and their prepared arrays (session-scoped)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from cnnvis_pipeline.data.synth import generate_broden_synth

    return generate_broden_synth(tmp_path_factory.mktemp("synth") / "ds", n_images=48, image_size=32, seed=3)


@pytest.fixture(scope="session")
def prepared_dir(synth_dir, tmp_path_factory) -> Path:
    from cnnvis_pipeline.data.prepared import prepare_dataset

    return prepare_dataset(synth_dir, tmp_path_factory.mktemp("prep") / "p", progress=False)
