"""Statistical dissection: bootstrap intervals, randomization p-values and FDR-controlled detectors.

Computed when the tables are written, from the per-image records of the tally pass
(records.ImageStats), so no pass over the activations is added. Definitions, and why this null:
docs/DEFINITIONS.md, "Significance".

- significance(tally, stats, dataset, statistics, iou_threshold): for each unit's `top`
  concepts by IoU: the Poisson bootstrap interval, the block-permutation p-value, the
  Benjamini-Hochberg q-value over the pairs of the layer, detector and detector_fdr.
- bh_qvalues(p), top_pairs(iou, top).
- significance_columns / unit_significance_columns / sweep_columns: the significance table, the
  units table's new columns and the threshold sweep (sweep_counts) of one layer.
"""

from __future__ import annotations

import numpy as np
import torch

from cnnvis_pipeline.dissection.records import ImageStats, null_choices, poisson_weights
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Statistics
from cnnvis_pipeline.tables import unique_detectors

# -- merge time ----------------------------------------------------------------------------------

def _sums(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int,
          weights_t: torch.Tensor) -> np.ndarray:
    """[n_rows, R]: Σ over records of vals * weights[col] into row (float64; exact for integer
    weights and values while the sums stay below 2^53)."""
    if len(rows) == 0:
        return np.zeros((n_rows, weights_t.shape[1]))
    idx = torch.from_numpy(np.stack([rows, cols]).astype(np.int64))
    mat = torch.sparse_coo_tensor(idx, torch.from_numpy(vals.astype(np.float64)),
                                  (n_rows, weights_t.shape[0]), check_invariants=False).coalesce()
    return torch.sparse.mm(mat, weights_t).numpy()


def _iou(inter, mask, label):
    union = mask + label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up; q_i = min_{j >= i} m p_(j) / j, <= 1)."""
    p = np.asarray(p, np.float64)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def top_pairs(iou: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit, rank, concept) of each unit's `top` highest-IoU concepts (ties: earlier concept
    first, so rank 0 is the unit's label of units.parquet)."""
    u, c = iou.shape
    top = min(top, c)
    order = np.argsort(-iou, axis=1, kind="stable")[:, :top]
    return (np.repeat(np.arange(u), top), np.tile(np.arange(top), u), order.reshape(-1))


def significance(tally, stats: ImageStats, dataset, statistics: Statistics,
                 iou_threshold: float) -> dict[str, np.ndarray]:
    """Per tested (unit, concept) pair: unit, rank, concept (index), iou, iou_low, iou_high,
    p_value, q_value, detector, detector_fdr (numpy arrays, in unit then rank order)."""
    R = statistics.replicates
    D = statistics.partners
    seed = statistics.seed
    level = statistics.level
    n = len(dataset)
    C = len(dataset.concepts)
    present = np.asarray(dataset.present, bool)
    G = present.shape[1]
    cat = np.asarray(dataset.concept_category, np.int64)
    iou, inter_t, _ = tally.iou(cat)
    U = iou.shape[0]
    unit, rank, concept = top_pairs(iou, statistics.top)
    T = len(unit)
    pair_of = np.full((U, C), -1, np.int64)
    pair_of[unit, concept] = np.arange(T)
    a = stats.arrays

    images = np.arange(n)
    w = torch.from_numpy(poisson_weights(seed, R, images).T.astype(np.float64).copy())
    ones = torch.ones(n, 1, dtype=torch.float64)

    def pair_sums(img, u_, c_, cnt, weights):
        t = pair_of[u_, c_]
        keep = t >= 0
        return _sums(t[keep], img[keep], cnt[keep], T, weights)

    def mask_sums(weights):  # [U * G, R]: Σ |M_k(x)| over images annotated for category g
        img, u_, cnt = a["mask_image"], a["mask_unit"], a["mask_count"]
        x, g = np.nonzero(present[img])
        return _sums(u_[x] * G + g, img[x], cnt[x], U * G, weights)

    def area_sums(img, c_, cnt, weights):  # [C, R]
        return _sums(c_, img, cnt, C, weights)

    obs = ("inter_image", "inter_unit", "inter_concept", "inter_count")
    # Observed sums (weights 1): must be the tally's integers.
    I0 = pair_sums(*(a[k] for k in obs), ones)[:, 0]
    A0 = mask_sums(ones)[unit * G + cat[concept], 0]
    L0 = area_sums(a["area_image"], a["area_concept"], a["area_count"], ones)[concept, 0]
    mask_t = tally.mask_area.cpu().numpy()[unit, cat[concept]]
    label_t = tally.concept_area.cpu().numpy()[concept]
    if not (np.array_equal(I0, inter_t[unit, concept]) and np.array_equal(A0, mask_t)
            and np.array_equal(L0, label_t)):
        raise CnnvisError("the per-image statistics do not add up to the tally's sums "
                          "(tally files from different runs?)")
    obs_iou = _iou(I0, A0, L0)

    # Bootstrap: the same sums with Poisson(1) weights per image.
    Ib = pair_sums(*(a[k] for k in obs), w)
    Ab = mask_sums(w)[unit * G + cat[concept]]
    Lb = area_sums(a["area_image"], a["area_concept"], a["area_count"], w)[concept]
    boot = _iou(Ib, Ab, Lb)
    alpha = 1.0 - level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=1) if T else (iou[:0, 0],) * 2

    # Null: the labels of each block of images permuted at random (a permutation: the label
    # areas do not change, and partners are annotated for the same categories, so neither do
    # the mask areas); only the intersections move.
    Rn = statistics.null_replicates
    exceed = np.zeros(T, np.int64)
    for r0 in range(0, Rn, _NULL_BLOCK):  # blocks of replicates bound the memory
        choice = null_choices(seed, min(_NULL_BLOCK, Rn - r0), present, D, r0)
        In = np.repeat(I0[:, None], len(choice), 1)
        for d in range(1, D + 1):
            e = torch.from_numpy((choice == d).T.astype(np.float64).copy())
            sel = a["null_partner"] == d
            In += pair_sums(*(a[f"null_{k}"][sel] for k in ("image", "unit", "concept", "count")),
                            e)
            In -= pair_sums(*(a[k] for k in obs), e)
        exceed += (_iou(In, A0[:, None], L0[:, None]) >= obs_iou[:, None]).sum(1)
    p = (1.0 + exceed) / (Rn + 1.0)
    q = bh_qvalues(p)
    detector = obs_iou > iou_threshold
    return {
        "unit": unit, "rank": rank, "concept": concept, "iou": obs_iou,
        "iou_low": np.asarray(low, np.float64), "iou_high": np.asarray(high, np.float64),
        "p_value": p, "q_value": q, "detector": detector,
        "detector_fdr": detector & (q < statistics.fdr),
    }


_NULL_BLOCK = 250


def significance_columns(model: str, layer: str, sig: dict | None, dataset) -> dict:
    """The significance table of one layer (no rows when statistics are disabled)."""
    sig = sig or {k: np.zeros(0, np.int64) for k in ("unit", "rank", "concept")}
    n = len(sig["unit"])
    names = [dataset.concepts[c]["name"] for c in sig["concept"]]
    cats = [dataset.concepts[c]["category"] for c in sig["concept"]]
    cols = {"model": [model] * n, "layer": [layer] * n,
            "unit": np.asarray(sig["unit"], np.int32), "rank": np.asarray(sig["rank"], np.int32),
            "concept": names, "category": cats}
    for k in ("iou", "iou_low", "iou_high", "p_value", "q_value"):
        cols[k] = np.asarray(sig.get(k, np.zeros(0)), np.float64)
    for k in ("detector", "detector_fdr"):
        cols[k] = np.asarray(sig.get(k, np.zeros(0)), bool)
    return cols


def unit_significance_columns(sig: dict | None, units: int) -> dict:
    """iou_low, iou_high, p_value, q_value, detector_fdr of each unit's label (rank 0); NaN and
    null when statistics are disabled."""
    if sig is None:
        nan = np.full(units, np.nan)
        return {"iou_low": nan, "iou_high": nan, "p_value": nan, "q_value": nan,
                "detector_fdr": [None] * units}
    top = np.asarray(sig["rank"]) == 0
    if not np.array_equal(np.asarray(sig["unit"])[top], np.arange(units)):
        raise CnnvisError("significance rows do not cover every unit once at rank 0")
    return {k: np.asarray(sig[k])[top] for k in ("iou_low", "iou_high", "p_value", "q_value",
                                                 "detector_fdr")}


def sweep_columns(model: str, layer: str, units, categories: list[str], fdr: float) -> dict:
    """The sweep table of one layer from its units table (a DataFrame)."""
    cols = sweep_counts(units, categories, SWEEP_THRESHOLDS, fdr)
    n = len(cols["iou_threshold"])
    return {"model": [model] * n, "layer": [layer] * n, **cols}


SWEEP_THRESHOLDS = np.round(0.01 + 0.005 * np.arange(39), 4)  # 0.01, 0.015, ..., 0.2


def sweep_counts(units, categories: list[str], thresholds=SWEEP_THRESHOLDS,
                 fdr_level: float | None = None):
    """Detectors and unique detectors of one layer at each IoU threshold, per category, plain
    and under FDR. `units`: DataFrame with iou, category, label and (optionally) q_value.
    Returns a dict of columns: iou_threshold, category, detectors, unique_detectors,
    detectors_fdr, unique_detectors_fdr (the FDR counts are null without q-values)."""
    has_q = bool("q_value" in units and fdr_level is not None and len(units)
                 and units["q_value"].notna().all())
    cols = {k: [] for k in ("iou_threshold", "category", "detectors", "unique_detectors",
                            "detectors_fdr", "unique_detectors_fdr")}
    significant = units["q_value"].to_numpy() < fdr_level if has_q else False
    for t in thresholds:
        at = units.assign(detector=units["iou"].to_numpy() > t, significant=significant)
        for c in categories:
            d = at[at["detector"] & (at["category"] == c).to_numpy()]
            cols["iou_threshold"].append(float(t))
            cols["category"].append(c)
            cols["detectors"].append(len(d))
            cols["unique_detectors"].append(unique_detectors(d))
            f = d[d["significant"].to_numpy()] if has_q else None
            cols["detectors_fdr"].append(len(f) if has_q else None)
            cols["unique_detectors_fdr"].append(unique_detectors(f) if has_q else None)
    return cols
