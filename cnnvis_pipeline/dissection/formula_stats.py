"""How sure each unit's best formula is: a bootstrap interval of its IoU and a null p-value of
the whole search (definitions: docs/DEFINITIONS.md, "Compositional explanations").

- null_sources(present, statistics, replicates): the image whose labels each image takes in
  each null replicate: the block permutations of the single-concept null (records.null_choices).
- permuted(mask, source): the unit's mask moved image by image so that its IoU with the
  unpermuted labels is its IoU with the permuted labels (sums over images are unchanged by a
  permutation, and blocks never leave an annotation group).
- formula_statistics(cm, masks, results, settings, statistics): per unit iou_low, iou_high
  (Poisson bootstrap over images, the weights of the single-concept intervals) and p_value: the
  fraction of null replicates in which the same beam search on the permuted pairing finds a
  formula scoring at least the observed best (the selection of the formula is in the null).
- fdr_columns(p, iou, fdr, iou_threshold): q_value (Benjamini-Hochberg over the table's units)
  and formula_detector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cnnvis_pipeline.dissection.bitmasks import AND, ConceptMasks, Mask, combine, popcount_rows
from cnnvis_pipeline.dissection.formulas import Searcher
from cnnvis_pipeline.dissection.records import null_choices, partner_indices, poisson_weights
from cnnvis_pipeline.dissection.significance import bh_qvalues
from cnnvis_pipeline.progress import Progress
from cnnvis_pipeline.settings import Compositional, Statistics


def null_sources(present: np.ndarray, statistics: Statistics, replicates: int) -> np.ndarray:
    """int64 [replicates, N]: in null replicate r image x takes the labels of image [r, x]."""
    present = np.asarray(present, bool)
    D = statistics.partners
    choice = null_choices(statistics.seed, replicates, present, D)
    table = np.concatenate([np.arange(len(present))[None, :],
                            partner_indices(present, statistics.seed, D)])  # [D + 1, N]
    return np.take_along_axis(table, choice, axis=0) if replicates else choice


def permuted(mask: Mask, source: np.ndarray) -> Mask:
    """Σ_x |M(x) ∩ L(source[x])| = Σ_y |M'(y) ∩ L(y)| with M'(source[x]) = M(x)."""
    images = source[mask.images]
    order = np.argsort(images, kind="stable")
    return Mask(images[order], mask.rows[torch.as_tensor(order, device=mask.rows.device)])


def _per_image(cm: ConceptMasks, unit: Mask, formula: Mask, scored: np.ndarray):
    """(images, |M ∩ F|, |M ∪ F|) per image of the scored images where the union is not empty."""
    n = cm.n_images

    def counts(m: Mask) -> np.ndarray:
        if not len(m.images):
            return np.zeros(n)
        return np.bincount(m.images, weights=popcount_rows(m.rows).cpu().numpy(), minlength=n)

    inter = counts(combine(unit, formula, AND))
    union = counts(unit) + counts(formula) - inter
    keep = np.flatnonzero((union > 0) & scored[cm.image_group])
    return keep, inter[keep], union[keep]


def _interval(cm, searcher, unit: Mask, best, statistics: Statistics, scored) -> tuple:
    images, inter, union = _per_image(cm, unit, searcher.mask(best), scored)
    if not len(images):
        return 0.0, 0.0
    w = poisson_weights(statistics.seed, statistics.replicates, images).astype(np.float64)
    i_b, u_b = w @ inter, w @ union
    boot = np.where(u_b > 0, i_b / np.where(u_b > 0, u_b, 1), 0.0)
    alpha = 1.0 - statistics.level
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def formula_statistics(cm: ConceptMasks, masks: Sequence[Mask], results,
                       settings: Compositional, statistics: Statistics,
                       present: np.ndarray, *, progress: bool = False) -> dict[str, np.ndarray]:
    """iou_low, iou_high, p_value per unit (arrays in the order of `masks`); `results` are the
    units' (beam, best single) from explain_units with the same settings."""
    from tqdm import tqdm

    searcher = Searcher(cm, max_length=settings.max_length, beam=settings.beam,
                        penalty=settings.penalty)
    R = settings.null_replicates
    sources = null_sources(present, statistics, R)
    out = {k: np.zeros(len(masks)) for k in ("iou_low", "iou_high", "p_value")}
    lines = Progress(f"formula null ({R} replicates)", len(masks), "units", enabled=progress)
    for j, (mask, (beam, _)) in enumerate(tqdm(list(zip(masks, results, strict=True)),
                                               desc="formula null", disable=not progress,
                                               mininterval=2)):
        best = beam[0]
        out["iou_low"][j], out["iou_high"][j] = _interval(cm, searcher, mask, best, statistics,
                                                          searcher.scored)
        exceed = sum(searcher.explain(permuted(mask, sources[r]))[0][0].score >= best.score
                     for r in range(R))
        out["p_value"][j] = (1.0 + exceed) / (R + 1.0)
        lines.update()
    lines.close()
    return out


def fdr_columns(p, iou, fdr: float, iou_threshold: float) -> dict[str, np.ndarray]:
    """q_value: Benjamini-Hochberg over the given units' p-values; formula_detector: IoU above
    the detector threshold and q_value < fdr."""
    q = bh_qvalues(np.asarray(p, np.float64))
    return {"q_value": q,
            "formula_detector": (np.asarray(iou, np.float64) > iou_threshold) & (q < fdr)}
