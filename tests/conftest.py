"""Shared fixtures: tiny broden-synth datasets and their prepared arrays (session-scoped), and
running the workflow on the tiny configs of .test/config (see .test/README.md).

The `workflow` fixture (session-scoped) gathers them:

- workflow.config(name): a fresh copy of .test/config/<name>.yaml to change.
- workflow.run(workdir, config, *args, env=None, timeout=900, cwd=None): writes `config` to
  <workdir>/cfg.yaml and runs `snakemake *args -s <repo>/Snakefile --directory <workdir>
  --cores 2 --configfile <workdir>/cfg.yaml` (flags and targets first: --configfile takes every
  word after it); prints the output's tail when it fails; returns the CompletedProcess.
- workflow.write(workdir, config) and workflow.cmd(workdir, *args): the config file and that
  command line (for a run the test starts itself).
- workflow.env(*pythonpath): os.environ with `pythonpath` before PYTHONPATH and this
  interpreter's bin/ first on PATH (the rules run `python -m cnnvis_pipeline` with it).
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIGS = REPO / ".test" / "config"


@functools.cache
def _load(name: str) -> dict:
    return yaml.safe_load((TEST_CONFIGS / f"{name}.yaml").read_text())


def load_test_config(name: str) -> dict:
    return copy.deepcopy(_load(name))


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args, "-s", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--cores", "2", "--configfile",
            str(Path(workdir) / "cfg.yaml")]


def workflow_env(*pythonpath) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, pythonpath),
                                                      env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def write_config(workdir: Path, config: dict) -> Path:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cfg.yaml").write_text(yaml.safe_dump(config))
    return workdir


def _run_workflow(workdir: Path, config: dict, *args: str, env: dict | None = None,
                  timeout: float = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    write_config(workdir, config)
    proc = subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)
    if proc.returncode:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


class Workflow:
    repo = REPO
    config = staticmethod(load_test_config)
    write = staticmethod(write_config)
    cmd = staticmethod(snakemake_cmd)
    env = staticmethod(workflow_env)
    run = staticmethod(_run_workflow)


@pytest.fixture(scope="session")
def workflow() -> Workflow:
    return Workflow()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from cnnvis_pipeline.data.synth import generate_broden_synth

    return generate_broden_synth(tmp_path_factory.mktemp("synth") / "ds", n_images=48, image_size=32, seed=3)


@pytest.fixture(scope="session")
def prepared_dir(synth_dir, tmp_path_factory) -> Path:
    from cnnvis_pipeline.data.prepared import prepare_dataset

    return prepare_dataset(synth_dir, tmp_path_factory.mktemp("prep") / "p", progress=False)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """A tiny broden-synth dataset (8 images, 16 px) that no test writes into."""
    from cnnvis_pipeline.data.synth import generate_broden_synth

    return generate_broden_synth(tmp_path_factory.mktemp("pristine") / "ds", 8, 16, seed=2)


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    """A fresh, writable copy of `pristine`, for tests that damage a dataset."""
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "ds"))
