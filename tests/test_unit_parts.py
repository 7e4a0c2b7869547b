"""A layer's units in parts (dissection/parts.py): `cnnvis layer-units` per part then `cnnvis
tables --parts`, as the rules layer_units and layer_tables run them, give tables byte-identical
to the layer in one job, for any number of parts; the parts read only their units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_one_path import LAYERS, TABLES, spec

from cnnvis_pipeline.cli import main
from cnnvis_pipeline.dissection.affine import Affine
from cnnvis_pipeline.dissection.parts import load_part, unit_bounds
from cnnvis_pipeline.dissection.stores import ActivationStore, read_columns
from cnnvis_pipeline.errors import CnnvisError


def _extract(prepared: Path, out: Path, text: str, shards: int) -> list[Path]:
    extracts = [out / "extract" / str(k) for k in range(shards)]
    for k, d in enumerate(extracts):
        assert main(["extract", "--prepared", str(prepared), "--spec", text, "--shard", str(k),
                     "--shards", str(shards), "--out", str(d), "--quiet"]) == 0
    return extracts


def _in_parts(prepared: Path, text: str, extracts: list[Path], out: Path, parts: int) -> Path:
    """What the rules layer_units (per part) and layer_tables (the merge) run, via the CLI."""
    for layer in LAYERS:
        files = [out / "parts" / layer / f"{k}-{parts}.npz" for k in range(parts)]
        for k, f in enumerate(files):
            assert main(["layer-units", "--prepared", str(prepared), "--spec", text, "--layer",
                         layer, "--extracts", *map(str, extracts), "--part", str(k),
                         "--parts", str(parts), "--out", str(f), "--quiet"]) == 0
        assert main(["tables", "--prepared", str(prepared), "--spec", text, "--layers", layer,
                     "--parts", *map(str, files[::-1]), "--out-dir", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def extracted(prepared_dir, tmp_path_factory) -> list[Path]:
    return _extract(prepared_dir, tmp_path_factory.mktemp("ext"), json.dumps(spec()), 2)


@pytest.fixture(scope="module")
def one_job(prepared_dir, extracted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onejob")
    for layer in LAYERS:
        assert main(["tables", "--prepared", str(prepared_dir), "--spec", json.dumps(spec()),
                     "--layers", layer, "--extracts", *map(str, extracted), "--out-dir",
                     str(out), "--quiet"]) == 0
    return out


def _same_tables(a: Path, b: Path, why: str) -> None:
    for layer in LAYERS:
        for name in (*(f"{t}.parquet" for t in TABLES), "sweep.png", "detectors.png"):
            x, y = (a / layer / name).read_bytes(), (b / layer / name).read_bytes()
            assert x == y, f"{layer}/{name} differs {why}"


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_unit_parts_give_the_tables_of_one_job(prepared_dir, extracted, one_job, tmp_path,
                                               parts):
    out = _in_parts(prepared_dir, json.dumps(spec()), extracted, tmp_path, parts)
    _same_tables(one_job, out, f"in {parts} unit part(s)")
    units = pq.read_table(out / LAYERS[1] / "units.parquet").to_pandas()
    assert units["p_value"].notna().all() and units["q_value"].notna().all()
    sig = pq.read_table(out / LAYERS[1] / "significance.parquet").to_pandas()
    # the q-values are over the whole layer: more pairs than any one part tested
    assert len(sig) == 8 * 5 and sig["q_value"].nunique() > 1


def test_parts_without_statistics(prepared_dir, extracted, tmp_path):
    text = json.dumps(spec(dissection={"quantile": 0.02, "statistics": {"enabled": False}}))
    whole = tmp_path / "whole"
    for layer in LAYERS:
        assert main(["tables", "--prepared", str(prepared_dir), "--spec", text, "--layers",
                     layer, "--extracts", *map(str, extracted), "--out-dir", str(whole),
                     "--quiet"]) == 0
    _same_tables(whole, _in_parts(prepared_dir, text, extracted, tmp_path / "p", 3),
                 "in 3 parts without statistics")
    units = pq.read_table(whole / LAYERS[1] / "units.parquet").to_pandas()
    assert units["p_value"].isna().all()


def test_a_part_holds_only_its_units(prepared_dir, extracted, one_job, tmp_path):
    layer = LAYERS[1]
    f = tmp_path / "1-3.npz"
    assert main(["layer-units", "--prepared", str(prepared_dir), "--spec", json.dumps(spec()),
                 "--layer", layer, "--extracts", *map(str, extracted), "--part", "1",
                 "--parts", "3", "--out", str(f), "--quiet"]) == 0
    part, meta = load_part(f)
    assert (part.first, len(part.thresholds), meta["units"]) == (2, 3, 8)  # 8 units: 2, 3, 3
    assert part.tally.intersection.shape[0] == 3
    assert set(part.significance["unit"]) == {2, 3, 4}
    thresholds = pq.read_table(one_job / layer / "thresholds.parquet").to_pandas()
    assert np.array_equal(part.thresholds, thresholds["threshold"].to_numpy()[2:5])


def test_merge_refuses_parts_that_do_not_cover_the_layer(prepared_dir, extracted, tmp_path):
    layer = LAYERS[1]
    files = []
    for k in (0, 2):
        files.append(tmp_path / f"{k}-3.npz")
        assert main(["layer-units", "--prepared", str(prepared_dir), "--spec",
                     json.dumps(spec()), "--layer", layer, "--extracts", *map(str, extracted),
                     "--part", str(k), "--parts", "3", "--out", str(files[-1]), "--quiet"]) == 0
    from cnnvis_pipeline.dissection.parts import run_merge
    from cnnvis_pipeline.settings import Job

    with pytest.raises(CnnvisError, match="cover 5 of 8 units"):
        run_merge(Job.from_spec(spec()), prepared_dir, files, tmp_path / "out")
    with pytest.raises(CnnvisError, match=f"of layer {layer}, not of"):
        run_merge(Job.from_spec(spec()), prepared_dir, files, tmp_path / "out", [LAYERS[0]])
    assert not (tmp_path / "out" / layer / "units.parquet").exists()


def test_unit_bounds_split_consecutively():
    assert [unit_bounds(8, 3, k) for k in range(3)] == [(0, 2), (2, 5), (5, 8)]
    assert [unit_bounds(5, 5, k) for k in range(5)] == [(k, k + 1) for k in range(5)]
    with pytest.raises(CnnvisError, match="out of range"):
        unit_bounds(4, 5, 0)


def test_a_store_of_a_unit_range_reads_only_those_units(tmp_path):
    acts = torch.arange(5 * 6 * 2 * 3, dtype=torch.float16).view(5, 6, 2, 3)
    store = ActivationStore(5, (6, 2, 3), tmp_path / "a.npy", torch.device("cpu"),
                            Affine(np.arange(6.0), np.full(6, 2.0)))
    store.write(0, acts)
    store.close()
    full = ActivationStore.open(tmp_path / "a.npy")
    view = full.unit_range(2, 5)
    assert view.shape == (5, 3, 2, 3)
    assert torch.equal(view.read(1, 4, torch.device("cpu")), acts[1:4, 2:5])
    assert np.array_equal(view.affine.offset, [2.0, 3.0, 4.0])
    view.close()  # its own descriptor: the store still reads
    assert torch.equal(full.read(0, 2, torch.device("cpu")), acts[:2])
    full.close()
    mem = ActivationStore(5, (6, 2, 3), None, torch.device("cpu"))
    mem.write(0, acts)
    assert torch.equal(mem.unit_range(1, 3).read(0, 5, torch.device("cpu")), acts[:, 1:3])
    m = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    np.save(tmp_path / "m.npy", m)
    assert np.array_equal(read_columns(tmp_path / "m.npy", 1, 3, chunk_bytes=20), m[:, 1:3])
