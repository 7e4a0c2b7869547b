"""Compositional explanations (Mu & Andreas 2020): per unit, the logical formula of concept masks
whose mask matches the unit's mask best by IoU, found by beam search.

Language: formulas built left to right from concepts with AND, OR and AND NOT, each concept at most
once: ``F := c | F AND c | F OR c | F AND NOT c`` (the reference's language). A formula's *length*
is its number of concepts. Search (as the reference): the beam starts as the unit's best `beam`
single concepts of IoU > 0; each step extends every beam formula of the longest length by every
other concept and operator, and keeps the best `beam` of (old beam + new formulas) by score =
IoU * penalty ** (length - 1). Ties are broken by length, then by the formula's canonical
structure (concept indices), so a length-1 result is the first maximum of the single IoUs.

IoU of a formula (same thresholds, masks at the segmentation size, label planes as the tally):
``IoU(k, F) = Σ |M_k ∩ L_F| / Σ |M_k ∪ L_F|`` with the sums over one set of images for every
formula: the images annotated for at least one category, a concept being absent where its
category is not annotated (so adding a concept never changes which images count). Each best
formula gets a bootstrap interval and a null p-value of the whole search (formula_stats.py);
q-values and formula_detector are over the layer's explained units (run_formulas).

How it is fast (and exact):
- Concept masks and unit masks are bit-packed at the segmentation resolution (64 pixels per int64
  word) and stored only for the images where the concept is present / the unit's mask is not
  empty; every count is a popcount of an AND of two such rows.
- Images fall into a few *annotation groups* (which categories an image is annotated for); every
  count is kept per group, so any category restriction is a sum over groups.
- For a formula F and every concept c, |F ∩ c| (per group) does not depend on the unit: it is
  computed once per formula and cached across units. Given it, the three candidates F op c need
  only y = |M ∩ F ∩ c|, which lies in [max(0, |M∩F| + |M∩c| - |M|, |F∩c| - |F \\ M|),
  min(|M∩F|, |M∩c|, |F∩c|)]; the IoU is monotone in y, so each candidate's IoU has an exact upper
  bound. Candidates are evaluated in descending bound order and the rest are skipped once their
  bound is below the current beam's last score: the beam is the same as without pruning.
- y is counted only over the images where M ∩ F is not empty, and only for surviving concepts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.bitmasks import (  # noqa: F401 (the compositional API)
    AND,
    AND_NOT,
    OPS,
    OR,
    ConceptMasks,
    Mask,
    _concept_texts,
    combine,
    pack_rows,
    popcount_rows,
    unpack_rows,
    words_for,
)
from cnnvis_pipeline.dissection.formula_stats import fdr_columns, formula_statistics
from cnnvis_pipeline.dissection.formulas import (  # noqa: F401 (the compositional API)
    Item,
    Searcher,
    extend,
    formula_text,
    node_concepts,
)
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Compositional, Job

log = logging.getLogger(__name__)


# -- unit masks from stored activations ------------------------------------------------------------

def unit_masks(batches: Iterable[tuple[int, torch.Tensor]], thresholds: np.ndarray,
               units: Sequence[int], seg: tuple[int, int], device: torch.device) -> list[Mask]:
    """Bit-packed masks of the given units from (first image index, float16 [B, U, h, w]) batches
    in image order: the tally's own upsampling and threshold (so the masks are the tally's)."""
    from cnnvis_pipeline.dissection import tally

    units = np.asarray(units, np.int64)
    S = seg[0] * seg[1]
    W = words_for(S)
    t_all = torch.as_tensor(np.array(thresholds, dtype=np.float32), device=device)
    t = t_all[torch.as_tensor(units, device=device)]
    got_units: list[np.ndarray] = []
    got_images: list[np.ndarray] = []
    got_rows: list[torch.Tensor] = []
    scratch = tally.Scratch() if device.type == "cpu" else None
    sel = torch.as_tensor(units, device=device)
    step_maps = max(1, (1 << 26) // (S * 4))
    for start, acts in batches:
        acts = acts.to(device)[:, sel]
        B, U = acts.shape[:2]
        flat = acts.reshape(B, U, -1)
        lo, hi = torch.aminmax(flat, dim=2)
        lo, hi = lo.float(), hi.float()
        reach = hi + tally.SKIP_SLACK * torch.maximum(hi.abs(), lo.abs())
        ab, au = (reach > t.view(1, U)).nonzero(as_tuple=True)
        for i in range(0, len(ab), step_maps):
            b_i, u_i = ab[i : i + step_maps], au[i : i + step_maps]
            r, s = tally.mask_pixels(flat[b_i, u_i], acts.shape[2:], seg, t[u_i], scratch)
            mask = torch.zeros((len(b_i), S), dtype=torch.bool, device=device)
            mask[r, s] = True
            nonempty = mask.any(1)
            got_rows.append(pack_rows(mask[nonempty], W))
            ne = nonempty.cpu().numpy()
            got_units.append(u_i.cpu().numpy()[ne])
            got_images.append(start + b_i.cpu().numpy()[ne])
    if got_rows:
        u_all, i_all = np.concatenate(got_units), np.concatenate(got_images).astype(np.int64)
        order = np.lexsort((i_all, u_all))  # by unit, then image
        u_all, i_all = u_all[order], i_all[order]
        rows_all = torch.cat(got_rows)
        got_rows.clear()  # two copies of the masks at the peak (concatenated, reordered), not three
        rows_all = rows_all[torch.as_tensor(order, device=device)]
        bounds = np.searchsorted(u_all, np.arange(len(units) + 1))
    else:
        bounds = np.zeros(len(units) + 1, np.int64)
        i_all = np.zeros(0, np.int64)
        rows_all = torch.zeros((0, W), dtype=torch.int64, device=device)
    return [Mask(i_all[bounds[j] : bounds[j + 1]], rows_all[bounds[j] : bounds[j + 1]])
            for j in range(len(units))]


# -- the formulas table --------------------------------------------------------------------------

def select_units(units_setting, n_units: int, layer: str) -> np.ndarray:
    if units_setting == "all":
        return np.arange(n_units, dtype=np.int64)
    sel = np.unique(np.asarray(units_setting, np.int64))
    bad = sel[sel >= n_units]
    if len(bad):
        raise CnnvisError(f"compositional.units: units {bad.tolist()} do not exist in layer "
                          f"{layer!r} ({n_units} units)")
    return sel


def formula_columns(model: str, layer: str, units: Sequence[int], results, cm: ConceptMasks,
                    stats: dict, fdr: float, iou_threshold: float) -> dict:
    """The formulas table of the given units; `stats`: formula_stats.formula_statistics."""
    cols = {k: [] for k in ("model", "layer", "unit", "formula", "length", "iou", "intersection",
                            "union", "single_concept", "single_iou")}
    for unit, (beam, single) in zip(units, results, strict=True):
        best = beam[0]
        cols["model"].append(model)
        cols["layer"].append(layer)
        cols["unit"].append(int(unit))
        cols["formula"].append(formula_text(best.node, cm.text))
        cols["length"].append(best.length)
        cols["iou"].append(best.iou)
        cols["intersection"].append(best.intersection)
        cols["union"].append(best.union)
        cols["single_concept"].append(cm.names[single.node[1]])
        cols["single_iou"].append(single.iou)
    cols["unit"] = np.asarray(cols["unit"], np.int32)
    cols["length"] = np.asarray(cols["length"], np.int32)
    cols.update({k: np.asarray(stats[k], np.float64) for k in ("iou_low", "iou_high", "p_value")})
    cols.update(fdr_columns(cols["p_value"], cols["iou"], fdr, iou_threshold))
    return cols


def explain_units(cm: ConceptMasks, masks: Sequence[Mask], settings: Compositional, *,
                  prune: bool = True, progress: bool = False) -> tuple[list, dict]:
    from tqdm import tqdm

    searcher = Searcher(cm, max_length=settings.max_length, beam=settings.beam,
                        penalty=settings.penalty, prune=prune)
    from cnnvis_pipeline.progress import Progress

    results = []
    with Progress("formulas", len(masks), "units", enabled=progress) as lines:
        for m in tqdm(masks, desc="formulas", disable=not progress, mininterval=2):
            results.append(searcher.explain(m))
            lines.update()
    return results, searcher.stats


def shard_units(selected: np.ndarray, shards: int, shard: int) -> np.ndarray:
    from cnnvis_pipeline.dissection.extract import shard_indices

    return selected[shard_indices(len(selected), shards, shard)]


def layer_batches(extract_dirs: Sequence[str | Path], layer: str, batch_size: int,
                  device: torch.device):
    """(first image index, float16 [B, U, h, w]) over the shards' stored activations of a layer,
    in image order (through the project's activation store reader)."""
    from cnnvis_pipeline.dissection.stores import ActivationStore

    dirs = sorted((Path(d) for d in extract_dirs),
                  key=lambda d: json.loads((d / "info.json").read_text())["start"])
    for d in dirs:
        info = json.loads((d / "info.json").read_text())
        store = ActivationStore.open(d / f"acts_{layer}.npy")
        try:
            n = store.shape[0]
            for i in range(0, n, batch_size):
                yield info["start"] + i, store.read(i, min(n, i + batch_size), device)
        finally:
            store.close()


# -- file steps (what the workflow's rules run) -----------------------------------------------------

def run_compositional(job: Job, prepared: str | Path, extract_dirs: Sequence[str | Path],
                      thresholds: str | Path, layer: str, shard: int, shards: int,
                      out: str | Path, *, progress: bool = True) -> Path:
    """Formulas of one shard of a layer's (selected) units -> a partial formulas table `out`."""
    import pyarrow.parquet as pq

    from cnnvis_pipeline.models.input import pick_device
    from cnnvis_pipeline.tables import write_table

    s = job.compositional or Compositional.parse({})
    ds = PreparedDataset(prepared)
    device = pick_device(job.resources.device)
    t = pq.read_table(thresholds, columns=["threshold"]).column("threshold").to_numpy()
    # The stored activations are in per-unit coordinates (the same for every shard).
    from cnnvis_pipeline.dissection.stores import ActivationStore

    first = min((Path(d) for d in extract_dirs),
                key=lambda d: json.loads((d / "info.json").read_text())["start"])
    store = ActivationStore.open(first / f"acts_{layer}.npy")
    t_stored = store.affine.to_stored(t)
    store.close()
    units = shard_units(select_units(s.units, len(t), layer), shards, shard)
    t0 = time.perf_counter()
    cm = ConceptMasks(ds, device)
    t1 = time.perf_counter()
    batch = job.resources.batch_size
    masks = unit_masks(layer_batches(extract_dirs, layer, batch, device), t_stored, units,
                       tuple(ds.seg_size), device)
    t2 = time.perf_counter()
    covered = sum(json.loads((Path(d) / "info.json").read_text())["stop"]
                  - json.loads((Path(d) / "info.json").read_text())["start"]
                  for d in extract_dirs)
    if covered != len(ds):
        raise CnnvisError(f"{job.name}: extract shards cover {covered} of {len(ds)} images")
    results, stats = explain_units(cm, masks, s, progress=progress)
    t3 = time.perf_counter()
    st = job.dissection.statistics
    fstats = formula_statistics(cm, masks, results, s, st, ds.present, progress=progress)
    t4 = time.perf_counter()
    log.info("%s %s shard %d/%d: %d units; concept masks %.2f s, unit masks %.2f s, search "
             "%.2f s, null and intervals %.2f s; %s", job.name, layer, shard, shards,
             len(units), t1 - t0, t2 - t1, t3 - t2, t4 - t3, stats)
    ckpt = json.loads((Path(extract_dirs[0]) / "info.json").read_text())["checkpoint_sha256"]
    cols = formula_columns(job.name, layer, units, results, cm, fstats, st.fdr,
                           job.dissection.iou_threshold)
    return write_table("formulas", cols, out, _provenance(job, ds, ckpt, s))


def _provenance(job: Job, ds: PreparedDataset, ckpt: str | None, s: Compositional) -> dict:
    from cnnvis_pipeline.dissection.pipeline import table_provenance

    prov = table_provenance(job, ds, {"checkpoint_sha256": ckpt})
    prov["compositional"] = json.dumps(dataclasses.asdict(s), sort_keys=True)
    return prov


def run_formulas(parts: Sequence[str | Path], out: str | Path) -> Path:
    """Merge the shards' partial tables into one formulas table, rows in unit order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cnnvis_pipeline.tables import read_provenance, write_table

    tables = [pq.read_table(p) for p in parts]
    provs = [read_provenance(p) for p in parts]
    if any(p != provs[0] for p in provs[1:]):
        raise CnnvisError(f"{out}: the shards' tables come from different runs "
                          f"(provenance differs: {', '.join(map(str, parts))})")
    table = pa.concat_tables(tables).sort_by([("unit", "ascending")])
    units = table.column("unit").to_numpy()
    if len(np.unique(units)) != len(units):
        raise CnnvisError(f"{out}: the shards overlap (a unit appears twice)")
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    if provs:  # q-values over all the layer's explained units
        d = provs[0]["dissection"]
        cols.update(fdr_columns(cols["p_value"], cols["iou"], d["statistics"]["fdr"],
                                d["iou_threshold"]))
    return write_table("formulas", cols, out, provs[0] if provs else {})
