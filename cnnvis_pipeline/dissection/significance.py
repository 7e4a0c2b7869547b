"""Statistical dissection: bootstrap intervals, randomization p-values and FDR-controlled detectors.

Computed when the tables are written, from the per-image records of the tally pass
(records.ImageStats), so no pass over the activations is added. Definitions, and why this null:
docs/DEFINITIONS.md, "Significance".

- significance(tally, stats, dataset, statistics, iou_threshold): for each unit's `top`
  concepts by IoU: the Poisson bootstrap interval, the block-permutation p-value, the
  Benjamini-Hochberg q-value over the pairs of the layer, detector and detector_fdr; for each
  unit's label: the p-value of the label as selected (the max statistic over all the unit's
  concepts in every null replicate), its q-value over the layer's units and detector_fdr.
  It is finish_layer of one unit_part: `unit_part` computes everything of a range of units
  (from their tally and records only), `finish_layer` what needs all the layer's units (the
  q-values and detector_fdr) from the parts in unit order.
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
    p_value, q_value, detector, detector_fdr (numpy arrays, in unit then rank order); and per
    unit (arrays of length U, keys `label_*`): the selection-adjusted p-value of its label
    (label_p_value, the max statistic over all its concepts), its BH q-value over the layer's
    units (label_q_value) and label_detector_fdr. The layer's units at once: finish_layer of
    one unit_part."""
    return finish_layer([unit_part(tally, stats, dataset, statistics, iou_threshold)],
                        statistics)


def unit_part(tally, stats: ImageStats, dataset, statistics: Statistics, iou_threshold: float,
              first_unit: int = 0) -> dict[str, np.ndarray]:
    """What `significance` gives of a range of the layer's units (the tally and records of
    those units only; `first_unit`: the layer's index of their first unit), without what needs
    every unit of the layer (the q-values and detector_fdr: finish_layer). Nothing here depends
    on the other units: the bootstrap weights and null permutations are draws per image
    (records), the sums are exact integers."""
    R = statistics.replicates
    n = len(dataset)
    cat = np.asarray(dataset.concept_category, np.int64)
    iou, inter_t, _ = tally.iou(cat)
    U, C = iou.shape
    unit, rank, concept = top_pairs(iou, statistics.top)
    sums = _Sums(stats.arrays, U, C, np.asarray(dataset.present, bool), cat, stats.upper)
    T = len(unit)
    sums.pairs(unit, concept)
    w = torch.from_numpy(poisson_weights(statistics.seed, R, np.arange(n)).T
                         .astype(np.float64).copy())
    ones = torch.ones(n, 1, dtype=torch.float64)

    # Observed sums (weights 1): must be the tally's integers.
    I0, A0, L0 = (x[:, 0] for x in sums.all(ones, unit, concept))
    mask_t = tally.mask_area.cpu().numpy()[unit, cat[concept]]
    label_t = tally.concept_area.cpu().numpy()[concept]
    if not (np.array_equal(I0, inter_t[unit, concept]) and np.array_equal(A0, mask_t)
            and np.array_equal(L0, label_t)):
        raise CnnvisError("the per-image statistics do not add up to the tally's sums "
                          "(tally files from different runs?)")
    obs_iou = _iou(I0, A0, L0)

    # Bootstrap: the same sums with Poisson(1) weights per image.
    boot = _iou(*sums.all(w, unit, concept))
    alpha = 1.0 - statistics.level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=1) if T else (iou[:0, 0],) * 2

    exceed, label_exceed = _null_counts(tally, sums, statistics, iou, unit, concept, obs_iou)
    Rn = statistics.null_replicates
    return {
        "unit": unit + first_unit, "rank": rank, "concept": concept, "iou": obs_iou,
        "iou_low": np.asarray(low, np.float64), "iou_high": np.asarray(high, np.float64),
        "p_value": (1.0 + exceed) / (Rn + 1.0), "detector": obs_iou > iou_threshold,
        "label_p_value": (1.0 + label_exceed) / (Rn + 1.0),
        "label_detector": iou.max(1, initial=0.0) > iou_threshold,
    }


# Columns of a unit_part, per tested pair and per unit (the parts are concatenated in unit order).
PAIR_KEYS = ("unit", "rank", "concept", "iou", "iou_low", "iou_high", "p_value", "detector")
LABEL_KEYS = ("label_p_value", "label_detector")


def finish_layer(parts: list[dict], statistics: Statistics) -> dict[str, np.ndarray]:
    """The layer's significance from its unit parts (in unit order): their columns
    concatenated, the Benjamini-Hochberg q-values over every tested pair of the layer and over
    its units' labels, and detector_fdr."""
    out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in PAIR_KEYS + LABEL_KEYS}
    out["q_value"] = bh_qvalues(out["p_value"])
    out["detector_fdr"] = out["detector"] & (out["q_value"] < statistics.fdr)
    out["label_q_value"] = bh_qvalues(out["label_p_value"])
    out["label_detector_fdr"] = (out.pop("label_detector")
                                 & (out["label_q_value"] < statistics.fdr))
    return out


class _Sums:
    """Weighted sums of the per-image records over the images (see _sums) for a set of
    (unit, concept) pairs: intersections with the own labels or a partner's, mask areas per
    (unit, category), label areas per concept."""

    def __init__(self, arrays, U, C, present, cat, upper):
        self.a, self.U, self.C, self.present, self.cat = arrays, U, C, present, cat
        self.G = present.shape[1]
        self.bound = upper

    def pairs(self, unit, concept) -> None:
        self.pair_of = np.full((self.U, self.C), -1, np.int64)
        self.pair_of[unit, concept] = np.arange(len(unit))
        self.n_pairs = len(unit)
        self._kept = {}  # (group, partner) -> the records of the current pairs only

    def inter(self, weights, group="inter", partner=None):
        key = (group, partner)
        if key not in self._kept:  # filtered once per set of pairs, not once per replicate
            a = self.a
            img, u_, c_, cnt = (a[f"{group}_{k}"] for k in ("image", "unit", "concept", "count"))
            t = self.pair_of[u_, c_]
            keep = t >= 0
            if partner is not None:
                keep &= a["null_partner"] == partner
            self._kept[key] = (t[keep], img[keep], cnt[keep])
        return _sums(*self._kept[key], self.n_pairs, weights)

    def all(self, weights, unit, concept):
        """(intersection, mask area, label area) [pairs, R] of the current pairs."""
        a, G = self.a, self.G
        img, u_, cnt = a["mask_image"], a["mask_unit"], a["mask_count"]
        masks = np.zeros((self.U * G, weights.shape[1]))
        for g in range(G):  # one category at a time (sums of integers: exact in any order)
            x = np.flatnonzero(self.present[img, g])
            masks += _sums(u_[x].astype(np.int64) * G + g, img[x], cnt[x], self.U * G, weights)
        areas = _sums(a["area_concept"], a["area_image"], a["area_count"], self.C, weights)
        return (self.inter(weights), masks[unit * G + self.cat[concept]], areas[concept])

    def upper(self) -> np.ndarray:
        """[U, C]: Σ over images of the largest intersection of the unit's mask with the image's
        own or any partner's labels: no permutation of the blocks' labels gives more (summed
        batch by batch during the tally: records.ImageStats.upper)."""
        return self.bound


def _null_counts(tally, sums: _Sums, statistics: Statistics, iou, unit, concept, obs_iou):
    """Null exceedances: per tested pair, of its own IoU; per unit, of its label's IoU by the
    largest IoU of any of its concepts in the same replicate (the selection of the label made
    again in every replicate). Concepts whose IoU cannot reach the label's in any permutation
    (upper bound: Sums.upper) cannot change the maximum and are left out.

    The null: the labels of each block of images permuted at random (a permutation: the label
    areas do not change, and partners are annotated for the same categories, so neither do the
    mask areas); only the intersections move."""
    U, C = iou.shape
    cat = sums.cat
    _, inter_t, _ = tally.iou(cat)
    A_all = tally.mask_area.cpu().numpy().astype(np.float64)[:, cat]  # [U, C]
    L_all = tally.concept_area.cpu().numpy().astype(np.float64)[None, :C]
    label = iou.argmax(1)  # the units table's label (first maximum)
    rows = np.arange(U)
    label_iou = _iou(inter_t[rows, label].astype(np.float64), A_all[rows, label],
                     L_all[0, label])
    up = sums.upper()
    reach = _iou(up, A_all, L_all) >= label_iou[:, None]
    reach &= (label_iou > 0)[:, None]
    cu, cc = np.nonzero(reach)  # candidate pairs, in unit order
    # one set of pairs: the tested ones, then the candidates that are not tested
    tested = np.zeros((U, C), bool)
    tested[unit, concept] = True
    extra = ~tested[cu, cc]
    pu = np.concatenate([unit, cu[extra]])
    pc = np.concatenate([concept, cc[extra]])
    sums.pairs(pu, pc)
    T = len(unit)
    I0 = inter_t[pu, pc].astype(np.float64)
    A0, L0 = A_all[pu, pc], L_all[0, pc]
    cand = sums.pair_of[cu, cc]  # candidates' positions among the pairs (unit order)
    starts = np.flatnonzero(np.r_[True, cu[1:] != cu[:-1]]) if len(cu) else np.zeros(0, int)
    cand_units = cu[starts]
    exceed = np.zeros(T, np.int64)
    label_exceed = np.where(label_iou > 0, 0, statistics.null_replicates).astype(np.int64)
    Rn, D, seed = statistics.null_replicates, statistics.partners, statistics.seed
    block = int(np.clip(min(_NULL_CELLS // max(len(pu), 1),
                            _NULL_IMAGE_CELLS // max(len(sums.present), 1)), 1, _NULL_BLOCK))
    for r0 in range(0, Rn, block):  # blocks of replicates bound the memory
        choice = null_choices(seed, min(block, Rn - r0), sums.present, D, r0)
        In = np.repeat(I0[:, None], len(choice), 1)
        for d in range(1, D + 1):
            e = torch.from_numpy((choice == d).T.astype(np.float64).copy())
            In += sums.inter(e, "null", d)
            In -= sums.inter(e)
        null = _iou(In, A0[:, None], L0[:, None])
        exceed += (null[:T] >= obs_iou[:T, None]).sum(1)
        if len(cand):
            best = np.maximum.reduceat(null[cand], starts, axis=0)  # [units, replicates]
            label_exceed[cand_units] += (best >= label_iou[cand_units, None]).sum(1)
    return exceed, label_exceed


_NULL_BLOCK = 250
_NULL_CELLS = 1 << 23  # pairs x replicates of one block of null replicates
# images x replicates of one block: its draws (records.null_choices) and indicators take about
# 48 bytes per cell (the draws of a replicate do not depend on the block it is in)
_NULL_IMAGE_CELLS = 1 << 21


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
    """iou_low, iou_high (the label's row, rank 0), and the label's selection-adjusted p_value,
    its q_value over the layer's units and detector_fdr; NaN and null when statistics are
    disabled."""
    if sig is None:
        nan = np.full(units, np.nan)
        return {"iou_low": nan, "iou_high": nan, "p_value": nan, "q_value": nan,
                "detector_fdr": [None] * units}
    top = np.asarray(sig["rank"]) == 0
    if not np.array_equal(np.asarray(sig["unit"])[top], np.arange(units)):
        raise CnnvisError("significance rows do not cover every unit once at rank 0")
    cols = {k: np.asarray(sig[k])[top] for k in ("iou_low", "iou_high")}
    # the label's p-value allows for its selection (the best of the unit's concepts)
    cols.update({k: np.asarray(sig[f"label_{k}"]) for k in ("p_value", "q_value",
                                                            "detector_fdr")})
    return cols


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
