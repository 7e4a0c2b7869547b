"""Compositional explanations (Mu & Andreas 2020): per unit, the logical formula of concept masks
whose mask matches the unit's mask best by IoU, found by beam search.

Language: formulas built left to right from concepts with AND, OR and AND NOT, each concept at most
once: ``F := c | F AND c | F OR c | F AND NOT c`` (the reference's language). A formula's *length*
is its number of concepts. Search (as the reference): the beam starts as the unit's best `beam`
single concepts of IoU > 0; each step extends every beam formula of the longest length by every
other concept and operator, and keeps the best `beam` of (old beam + new formulas) by score =
IoU * penalty ** (length - 1). Ties are broken by length, then by the formula's canonical
structure (concept indices), so a length-1 result is the units table's label (first maximum).

IoU of a formula, exactly as the single-concept IoU of the tally (same thresholds, masks at the
segmentation size, label planes): ``IoU(k, F) = Σ |M_k ∩ L_F| / Σ |M_k ∪ L_F|`` with the sums over
the images annotated for *every* category that F's concepts belong to (for one concept: the
images annotated for its category, the project's rule; a formula is only defined where all its
concepts' annotations exist, so e.g. `water[material] OR river[object]` counts images with both
material and object annotations).

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

import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.errors import CnnvisError

log = logging.getLogger(__name__)

AND, OR, AND_NOT = 0, 1, 2
OPS = (AND, OR, AND_NOT)
OP_TEXT = {AND: "AND", OR: "OR", AND_NOT: "AND NOT"}
DEFAULTS = {"max_length": 3, "beam": 5, "penalty": 1.0, "units": "all"}

_ENTRY_CHUNK_BYTES = {"cuda": 1 << 30}
_ENTRY_CHUNK_DEFAULT = 1 << 25


# -- popcounts and packing ----------------------------------------------------------------------

_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def _swar_popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 (two's complement), with shifts and masks (any torch device)."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return (x * _H01) >> 56


def popcount_rows(a: torch.Tensor, *, swar: bool | None = None) -> torch.Tensor:
    """int64 [n, W] -> int64 [n]: the set bits of each row (numpy's popcount on CPU)."""
    if swar is None:
        swar = a.device.type != "cpu"
    if not swar:
        counts = np.bitwise_count(a.numpy().view(np.uint64)).sum(axis=1, dtype=np.int64)
        return torch.from_numpy(counts)
    return _swar_popcount(a).sum(1)


def words_for(pixels: int) -> int:
    return -(-pixels // 64)


def pack_rows(mask: torch.Tensor, words: int) -> torch.Tensor:
    """bool [m, S] -> int64 [m, words]; pixel s is bit s % 64 of word s // 64 (padding bits 0)."""
    m, s = mask.shape
    if mask.device.type == "cpu":
        buf = np.zeros((m, words * 64), bool)
        buf[:, :s] = mask.numpy()
        packed = np.packbits(buf, axis=1, bitorder="little")
        return torch.from_numpy(packed.view("<u8").view(np.int64).copy()).reshape(m, words)
    buf = torch.zeros((m, words * 64), dtype=torch.int64, device=mask.device)
    buf[:, :s] = mask.to(torch.int64)
    shifts = torch.arange(64, device=mask.device, dtype=torch.int64)
    return (buf.view(m, words, 64) << shifts).sum(-1)  # distinct bits: the sum is the OR


def unpack_rows(rows: torch.Tensor, pixels: int) -> np.ndarray:
    """int64 [m, W] -> bool [m, pixels] (tests and debugging)."""
    r = rows.cpu().numpy().view(np.uint8).reshape(len(rows), -1)
    return np.unpackbits(r, axis=1, bitorder="little")[:, :pixels].astype(bool)


# -- sparse bit-packed masks ---------------------------------------------------------------------

@dataclass
class Mask:
    """A mask over the dataset: bit rows [n, W] for the sorted images where it is not empty."""

    images: np.ndarray  # int64 [n], sorted, unique
    rows: torch.Tensor  # int64 [n, W]

    def nbytes(self) -> int:
        return int(self.rows.numel()) * 8 + int(self.images.nbytes)


def _drop_empty(images: np.ndarray, rows: torch.Tensor) -> Mask:
    keep = (rows != 0).any(1)
    if bool(keep.all()):
        return Mask(images, rows)
    keep_np = keep.cpu().numpy()
    return Mask(images[keep_np], rows[keep])


def _positions(images: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(images, dtype=torch.int64, device=device)


def combine(a: Mask, b: Mask, op: int) -> Mask:
    """a AND b, a OR b or a AND NOT b."""
    dev = a.rows.device
    if op == AND:
        common, ia, ib = np.intersect1d(a.images, b.images, assume_unique=True,
                                        return_indices=True)
        rows = a.rows[_positions(ia, dev)] & b.rows[_positions(ib, dev)]
        return _drop_empty(common, rows)
    if op == OR:
        images = np.union1d(a.images, b.images)
        rows = torch.zeros((len(images), a.rows.shape[1]), dtype=torch.int64, device=dev)
        pa = _positions(np.searchsorted(images, a.images), dev)
        pb = _positions(np.searchsorted(images, b.images), dev)
        rows[pa] = a.rows
        rows[pb] |= b.rows
        return Mask(images, rows)
    if op == AND_NOT:
        _, ia, ib = np.intersect1d(a.images, b.images, assume_unique=True, return_indices=True)
        rows = a.rows.clone()
        pa = _positions(ia, dev)
        rows[pa] &= ~b.rows[_positions(ib, dev)]
        return _drop_empty(a.images, rows)
    raise ValueError(f"unknown operator {op}")


class ConceptMasks:
    """Every concept's mask in every image where it is present, bit-packed, on one device.

    Built from the prepared label planes exactly as the tally reads them: a pixel-level concept
    (label, category) covers the pixels where any plane of its category holds its label; an
    image-level concept covers the whole image. Entries are (image, concept) pairs in image
    order (the concepts of each image in `slots` order).
    """

    def __init__(self, ds: PreparedDataset, device: torch.device | str = "cpu",
                 batch_size: int = 32):
        self.device = torch.device(device)
        self.n_images = n = len(ds)
        self.seg = tuple(ds.seg_size)
        self.pixels = S = self.seg[0] * self.seg[1]
        self.words = W = words_for(S)
        self.concepts = len(ds.concepts)
        C = self.concepts
        self.names = [c["name"] for c in ds.concepts]
        self.concept_category = np.asarray(ds.concept_category, np.int64)
        self.categories = list(ds.categories)
        self.text = _concept_texts(self.names, [c["category"] for c in ds.concepts])

        # Annotation groups: images annotated for the same categories.
        present = np.asarray(ds.present, bool)
        patterns, self.image_group = np.unique(present, axis=0, return_inverse=True)
        self.image_group = self.image_group.reshape(-1).astype(np.int64)
        self.group_categories = patterns.astype(bool)  # [G, K]
        self.groups = G = len(patterns)
        self.group_images = np.bincount(self.image_group, minlength=G).astype(np.int64)

        slots = np.asarray(ds.slots)
        valid = slots >= 0
        counts = valid.sum(1).astype(np.int64)
        self.image_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        E = int(self.image_ptr[-1])
        self.entry_concept = slots[valid].astype(np.int64)
        self.entry_image = np.repeat(np.arange(n, dtype=np.int64), counts)
        self.entry_group = self.image_group[self.entry_image]
        order = np.argsort(self.entry_concept, kind="stable")
        self.concept_order = order
        self.concept_ptr = np.concatenate(
            [[0], np.cumsum(np.bincount(self.entry_concept, minlength=C))]).astype(np.int64)

        # (plane, label) -> concept, as the tally's lookup; C for anything else.
        plane_category = np.asarray(ds.plane_category, np.int64)
        P = len(plane_category)
        lut = np.full((max(P, 1), 1 << 16), C, np.int32)
        for j, (lab, cat) in enumerate(zip(ds.concept_label, ds.concept_category, strict=True)):
            for p in np.flatnonzero(plane_category == cat):
                if 0 < lab < (1 << 16):
                    lut[p, lab] = j
        image_kind = np.array([k == "image" for k in ds.category_kind], bool)
        concept_image_level = image_kind[self.concept_category]

        rows = np.zeros((E, W), np.int64)
        for i0 in range(0, n, batch_size):
            i1 = min(n, i0 + batch_size)
            e0, e1 = int(self.image_ptr[i0]), int(self.image_ptr[i1])
            if e0 == e1:
                continue
            e_img = self.entry_image[e0:e1] - i0
            e_con = self.entry_concept[e0:e1]
            bits = np.zeros((e1 - e0, S), bool)
            if P:
                lab = np.asarray(ds.planes[i0:i1, :P]).reshape(i1 - i0, P, S)
                for p in range(P):
                    on_p = np.flatnonzero(self.concept_category[e_con] == plane_category[p])
                    if len(on_p):
                        conc = lut[p][lab[:, p]]  # [B, S] the concept of each pixel
                        bits[on_p] |= conc[e_img[on_p]] == e_con[on_p, None]
            bits[concept_image_level[e_con]] = True
            rows[e0:e1] = pack_rows(torch.from_numpy(bits), W).numpy()
        self.rows = torch.from_numpy(rows).to(self.device)
        entry_area = popcount_rows(self.rows).cpu().numpy()
        self.area = np.bincount(self.entry_concept * G + self.entry_group, weights=entry_area,
                                minlength=C * G).round().astype(np.int64).reshape(C, G)
        # category k is annotated in group g
        self.category_groups = self.group_categories.T.copy()  # [K, G]
        self._t_entry_concept = torch.as_tensor(self.entry_concept, device=self.device)
        self._t_entry_group = torch.as_tensor(self.entry_group, device=self.device)
        self.chunk_bytes = _ENTRY_CHUNK_BYTES.get(self.device.type, _ENTRY_CHUNK_DEFAULT)

    def concept_mask(self, c: int) -> Mask:
        idx = self.concept_order[self.concept_ptr[c] : self.concept_ptr[c + 1]]
        return Mask(self.entry_image[idx], self.rows[_positions(idx, self.device)])

    def overlap(self, mask: Mask, wanted: np.ndarray | None = None) -> np.ndarray:
        """|mask ∩ c| per (concept c, annotation group): int64 [C, G]. With `wanted` (bool [C]),
        only those concepts are counted (the others are 0)."""
        C, G = self.concepts, self.groups
        out = torch.zeros(C * G, dtype=torch.int64, device=self.device)
        if len(mask.images):
            starts = self.image_ptr[mask.images]
            counts = self.image_ptr[mask.images + 1] - starts
            owner = np.repeat(np.arange(len(mask.images), dtype=np.int64), counts)
            first = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            eidx = first + np.arange(len(owner), dtype=np.int64)
            if wanted is not None:
                keep = wanted[self.entry_concept[eidx]]
                eidx, owner = eidx[keep], owner[keep]
            step = max(1, self.chunk_bytes // (self.words * 8 * 2))
            for k in range(0, len(eidx), step):
                e = torch.as_tensor(eidx[k : k + step], device=self.device)
                o = torch.as_tensor(owner[k : k + step], device=self.device)
                counts_k = popcount_rows(self.rows[e] & mask.rows[o])
                keys = self._t_entry_concept[e] * G + self._t_entry_group[e]
                out.index_add_(0, keys, counts_k.to(self.device))
        return out.view(C, G).cpu().numpy()

    def cooccurrence(self) -> np.ndarray:
        """|c ∩ c'| per annotation group for every pair of concepts: int64 [C, C, G] (computed
        once, from the pairs of entries of each image)."""
        if getattr(self, "_cooc", None) is not None:
            return self._cooc
        C, G = self.concepts, self.groups
        out = torch.zeros(C * C * G, dtype=torch.int64, device=self.device)
        k = np.diff(self.image_ptr)
        pairs_per_image = k * k
        budget = max(1, self.chunk_bytes // (self.words * 8 * 2))
        i0 = 0
        cum = np.concatenate([[0], np.cumsum(pairs_per_image)])
        while i0 < self.n_images:
            i1 = max(i0 + 1, int(np.searchsorted(cum, cum[i0] + budget, side="right")) - 1)
            i1 = min(i1, self.n_images)
            e0, e1 = int(self.image_ptr[i0]), int(self.image_ptr[i1])
            e = np.arange(e0, e1, dtype=np.int64)
            ke = k[self.entry_image[e]]
            first = np.repeat(e, ke)
            start = np.repeat(self.image_ptr[self.entry_image[e]], ke)
            offsets = np.repeat(np.cumsum(ke) - ke, ke)
            second = start + np.arange(len(first), dtype=np.int64) - offsets
            a = torch.as_tensor(first, device=self.device)
            b = torch.as_tensor(second, device=self.device)
            counts = popcount_rows(self.rows[a] & self.rows[b]).to(self.device)
            keys = ((self._t_entry_concept[a] * C + self._t_entry_concept[b]) * G
                    + self._t_entry_group[a])
            out.index_add_(0, keys, counts)
            i0 = i1
        self._cooc = out.view(C, C, G).cpu().numpy()
        return self._cooc

    def group_area(self, mask: Mask) -> np.ndarray:
        """|mask| per annotation group: int64 [G]."""
        if not len(mask.images):
            return np.zeros(self.groups, np.int64)
        per_image = popcount_rows(mask.rows).cpu().numpy()
        return np.bincount(self.image_group[mask.images], weights=per_image,
                           minlength=self.groups).round().astype(np.int64)


def _concept_texts(names: Sequence[str], categories: Sequence[str]) -> list[str]:
    """A concept's name in formulas; `name[category]` where the name is shared by several."""
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n}[{c}]" if seen[n] > 1 else n for n, c in zip(names, categories, strict=True)]


# -- formulas ------------------------------------------------------------------------------------

# A canonical formula is a nested tuple: ("c", j) concept, ("not", j) negated concept (only inside
# AND), ("and", operands...) / ("or", operands...) with sorted operands, same-operator children
# flattened. Its sort key orders compound operands first, then concepts, then negated concepts.

@functools.lru_cache(maxsize=1 << 16)
def _key(node) -> tuple:
    if node[0] == "c":
        return (1, node[1])
    if node[0] == "not":
        return (2, node[1])
    return (0, 0 if node[0] == "and" else 1, tuple(_key(x) for x in node[1:]))


def extend(node, op: int, c: int):
    """The canonical form of `node op c`."""
    name = "or" if op == OR else "and"
    new = ("not", c) if op == AND_NOT else ("c", c)
    operands = list(node[1:]) if node[0] == name else [node]
    operands.append(new)
    return (name, *sorted(operands, key=_key))


def node_concepts(node) -> list[int]:
    if node[0] in ("c", "not"):
        return [node[1]]
    return [c for x in node[1:] for c in node_concepts(x)]


def formula_text(node, texts: Sequence[str], top: bool = True) -> str:
    kind = node[0]
    if kind == "c":
        return texts[node[1]]
    if kind == "not":
        return f"NOT {texts[node[1]]}"
    joiner = " AND " if kind == "and" else " OR "
    s = joiner.join(formula_text(x, texts, top=False) for x in node[1:])
    return s if top else f"({s})"


@dataclass
class Item:
    node: tuple
    length: int
    groups: np.ndarray  # bool [G]: the annotation groups the formula is counted on
    area: np.ndarray  # int64 [G]: |F| per group
    hit: np.ndarray  # int64 [G]: |M ∩ F| per group
    intersection: int
    union: int
    iou: float
    score: float
    parent: Item | None = None
    op: int = -1
    concept: int = -1
    key: tuple = field(default=())
    order: tuple = field(default=())

    def __post_init__(self):
        self.key = _key(self.node)
        self.order = (-self.score, self.length, self.key)


def _iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    inter = np.asarray(inter, np.float64)
    union = np.asarray(union, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _upper(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """inter / union for bounds: +inf where union <= 0 < inter, 0 where inter <= 0."""
    inter = np.asarray(inter, np.float64)
    union = np.asarray(union, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.maximum(union, 1), np.inf)
    return np.where(inter > 0, out, 0.0)


class _Cache:
    """LRU cache bounded by a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.data: OrderedDict = OrderedDict()

    def get(self, key):
        v = self.data.get(key)
        if v is not None:
            self.data.move_to_end(key)
        return v

    def put(self, key, value, nbytes: int) -> None:
        if key in self.data:
            return
        self.data[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes and len(self.data) > 1:
            _, (_, b) = self.data.popitem(last=False)
            self.bytes -= b


class Searcher:
    """Beam search over formulas for the units of one layer, sharing unit-independent work."""

    def __init__(self, cm: ConceptMasks, *, max_length: int = 3, beam: int = 5,
                 penalty: float = 1.0, prune: bool = True, cache_bytes: int = 1 << 29):
        if max_length < 1 or beam < 1 or not (0 < penalty <= 1):
            raise CnnvisError("compositional: max_length and beam must be >= 1 and penalty in "
                              f"(0, 1] (got {max_length}, {beam}, {penalty})")
        self.cm = cm
        self.max_length, self.beam, self.penalty, self.prune = max_length, beam, penalty, prune
        self.factors = [penalty ** k for k in range(max_length)]
        self.masks = _Cache(cache_bytes)
        self.overlaps = _Cache(cache_bytes // 2)
        self.stats = {"candidates": 0, "evaluated": 0, "overlaps": 0, "overlap_hits": 0}

    # masks and unit-independent overlaps of formulas
    def mask(self, item: Item) -> Mask:
        key = item.key
        hit = self.masks.get(key)
        if hit is not None:
            return hit[0]
        if item.parent is None:
            m = self.cm.concept_mask(item.node[1])
        else:
            m = combine(self.mask(item.parent), self.cm.concept_mask(item.concept), item.op)
        self.masks.put(key, m, m.nbytes())
        return m

    def formula_overlap(self, item: Item) -> np.ndarray:
        """|F ∩ c| per (concept c, group) of a formula (unit-independent, cached): a row of the
        co-occurrence matrix for one concept; for F = P op c' from P's, c''s and the overlap of
        the (small) mask P ∩ c' alone: AND = t, OR = x_P + x_c' - t, AND NOT = x_P - t."""
        key = item.key
        hit = self.overlaps.get(key)
        if hit is not None:
            self.stats["overlap_hits"] += 1
            return hit[0]
        cooc = self.cm.cooccurrence()
        if item.parent is None:
            return cooc[item.node[1]]
        self.stats["overlaps"] += 1
        both = combine(self.mask(item.parent), self.cm.concept_mask(item.concept), AND)
        t = self.cm.overlap(both)
        if item.op == AND:
            x = t
        elif item.op == OR:
            x = self.formula_overlap(item.parent) + cooc[item.concept] - t
        else:
            x = self.formula_overlap(item.parent) - t
        self.overlaps.put(key, x, x.nbytes)
        return x

    def explain(self, unit: Mask) -> tuple[list[Item], Item]:
        """(final beam best first, best single concept) for one unit's mask."""
        cm = self.cm
        ctx = self.context(unit)
        u, uc = ctx.u, ctx.uc  # |M| per group [G], |M ∩ c| per concept and group [C, G]
        cats = cm.concept_category
        A = cm.category_groups[cats]  # [C, G]
        inter = (uc * A).sum(1)
        union = ((u[None, :] + cm.area - uc) * A).sum(1)
        iou = _iou(inter, union)
        order = np.lexsort((np.arange(cm.concepts), -iou))
        best = order[0]

        def single(c: int) -> Item:
            return Item(node=("c", int(c)), length=1, groups=A[c], area=cm.area[c], hit=uc[c],
                        intersection=int(inter[c]), union=int(union[c]), iou=float(iou[c]),
                        score=float(iou[c]))

        best_single = single(best)
        if self.max_length == 1:
            return [best_single], best_single
        beam = [single(c) for c in order[: self.beam] if iou[c] > 0]
        if not beam:
            return [best_single], best_single
        for length in range(2, self.max_length + 1):
            beam = self._step(beam, length, ctx)
        return beam, best_single

    def _step(self, beam: list[Item], length: int, ctx: _UnitContext) -> list[Item]:
        cm, B = self.cm, self.beam
        pool = {_key(it.node): it for it in beam}
        factor = self.factors[length - 1]
        info, ubs, parents, concepts, ops = {}, [], [], [], []
        for pi, parent in enumerate(beam):
            if parent.length != length - 1:
                continue
            ub, x, groups = self.bounds(parent, ctx, factor)
            info[pi] = (x, groups)
            ok = np.ones(cm.concepts, bool)
            ok[node_concepts(parent.node)] = False
            cs, os_ = np.nonzero(np.broadcast_to(ok[:, None], ub.shape))
            ubs.append(ub[cs, os_])
            concepts.append(cs)
            ops.append(os_)
            parents.append(np.full(len(cs), pi))
        if not ubs:
            return beam
        ub, pis, cs, os_ = (np.concatenate(a) for a in (ubs, parents, concepts, ops))
        self.stats["candidates"] += len(ub)
        order = np.lexsort((os_, cs, pis, -ub))
        ub, pis, cs, os_ = ub[order], pis[order], cs[order], os_[order]
        top = sorted(pool.values(), key=lambda it: it.order)[:B]
        k, chunk = 0, 4 * B
        while k < len(ub):
            tau = top[-1].score if len(top) >= B else -np.inf
            # exact: a candidate whose bound is below the beam's last score cannot enter it
            if self.prune and ub[k] < tau:
                break
            sl = slice(k, k + chunk)
            keep = ub[sl] >= tau if self.prune else np.ones(len(ub[sl]), bool)
            b_p, b_c, b_o = pis[sl][keep], cs[sl][keep], os_[sl][keep]
            k += chunk
            chunk *= 2
            for pi in np.unique(b_p).tolist():
                parent = beam[pi]
                x, groups = info[pi]
                sel = b_p == pi
                c_sel, o_sel = b_c[sel], b_o[sel]
                wanted = np.zeros(cm.concepts, bool)
                wanted[c_sel] = True
                y = self._unit_overlap(ctx, parent, wanted)
                area, hit, inter, union, iou = self._exact(parent, c_sel, o_sel, x, y, ctx)
                score = iou * factor
                self.stats["evaluated"] += len(c_sel)
                # only what can still enter the beam becomes a formula (tau only grows)
                for i in np.flatnonzero(score >= tau).tolist():
                    c, op = int(c_sel[i]), int(o_sel[i])
                    node = extend(parent.node, op, c)
                    if _key(node) in pool:
                        continue
                    pool[_key(node)] = Item(
                        node=node, length=length, groups=groups[c], area=area[i], hit=hit[i],
                        intersection=int(inter[i]), union=int(union[i]), iou=float(iou[i]),
                        score=float(score[i]), parent=parent, op=op, concept=c)
            top = sorted(pool.values(), key=lambda it: it.order)[:B]
        return top

    def bounds(self, parent: Item, ctx: _UnitContext, factor: float):
        """(upper bound of the score of `parent op c` [C, 3] (columns AND, OR, AND NOT),
        |F ∩ c| per group [C, G], the groups each candidate is counted on [C, G])."""
        cm = self.cm
        u, uc, cc = ctx.u[None, :], ctx.uc, cm.area
        x = self.formula_overlap(parent)  # |F ∩ c| per group, [C, G]
        groups = parent.groups[None, :] & cm.category_groups[cm.concept_category]  # [C, G]
        f, uf = parent.area[None, :], parent.hit[None, :]
        # y = |M ∩ F ∩ c| per group lies in [lo, hi]; AND's IoU grows with y, the others' fall:
        # each operator's bound takes the favourable end.
        hi = np.minimum(np.minimum(uf, uc), x)
        lo = np.maximum(np.maximum(0, uf + uc - u), x - (f - uf))
        ub = np.stack([
            _upper((hi * groups).sum(1), ((u + x - hi) * groups).sum(1)),
            _upper(((uf + uc - lo) * groups).sum(1),
                   ((u + f + cc - x - uf - uc + lo) * groups).sum(1)),
            _upper(((uf - lo) * groups).sum(1), ((u + f - x - uf + lo) * groups).sum(1)),
        ], 1) * factor
        return ub, x, groups

    def context(self, unit: Mask) -> _UnitContext:
        return _UnitContext(unit=unit, u=self.cm.group_area(unit), uc=self.cm.overlap(unit))

    def _unit_overlap(self, ctx: _UnitContext, parent: Item, wanted: np.ndarray) -> np.ndarray:
        key = _key(parent.node)
        hit = ctx.hits.get(key)
        if hit is None:
            hit = combine(ctx.unit, self.mask(parent), AND)
            ctx.hits[key] = hit
        return self.cm.overlap(hit, wanted)

    def _exact(self, parent: Item, cs: np.ndarray, ops: np.ndarray, x: np.ndarray,
               y: np.ndarray, ctx: _UnitContext):
        """Exact per-group areas and hits, intersections, unions and IoUs of `parent op c`."""
        cm = self.cm
        groups = parent.groups[None, :] & cm.category_groups[cm.concept_category[cs]]
        xs, ys, cc, uc = x[cs], y[cs], cm.area[cs], ctx.uc[cs]
        f, uf = parent.area[None, :], parent.hit[None, :]
        is_and, is_or = (ops == AND)[:, None], (ops == OR)[:, None]
        area = np.where(is_and, xs, np.where(is_or, f + cc - xs, f - xs))
        hit = np.where(is_and, ys, np.where(is_or, uf + uc - ys, uf - ys))
        inter = (hit * groups).sum(1)
        union = ((ctx.u[None, :] + area - hit) * groups).sum(1)
        return area, hit, inter, union, _iou(inter, union)

    def _candidate(self, parent: Item, node, c: int, op: int, x, y, groups, ctx,
                   factor: float) -> Item:
        """One candidate, evaluated on its own (the reference for the vectorised _exact)."""
        cc, uc = self.cm.area[c], ctx.uc[c]
        f, uf = parent.area, parent.hit
        if op == AND:
            area, hit = x, y
        elif op == OR:
            area, hit = f + cc - x, uf + uc - y
        else:
            area, hit = f - x, uf - y
        inter = int((hit * groups).sum())
        union = int(((ctx.u + area - hit) * groups).sum())
        iou = float(_iou(inter, union))
        return Item(node=node, length=parent.length + 1, groups=groups, area=area, hit=hit,
                    intersection=inter, union=union, iou=iou, score=iou * factor,
                    parent=parent, op=op, concept=c)


@dataclass
class _UnitContext:
    unit: Mask
    u: np.ndarray
    uc: np.ndarray
    hits: dict = field(default_factory=dict)


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
    images: list[list[np.ndarray]] = [[] for _ in units]
    rows: list[list[torch.Tensor]] = [[] for _ in units]
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
            packed = pack_rows(mask, W)
            nonempty = mask.any(1)
            b_np, u_np = b_i.cpu().numpy(), u_i.cpu().numpy()
            ne = nonempty.cpu().numpy()
            for j in np.unique(u_np[ne]):
                pick = np.flatnonzero(ne & (u_np == j))
                images[j].append(start + b_np[pick])
                rows[j].append(packed[torch.as_tensor(pick, device=device)])
    out = []
    for j in range(len(units)):
        if images[j]:
            out.append(Mask(np.concatenate(images[j]).astype(np.int64), torch.cat(rows[j])))
        else:
            out.append(Mask(np.zeros(0, np.int64), torch.zeros((0, W), dtype=torch.int64,
                                                                device=device)))
    return out


# -- the formulas table --------------------------------------------------------------------------

def resolve_settings(cfg: dict | None) -> dict:
    s = {**DEFAULTS, **(cfg or {})}
    for k in ("max_length", "beam"):
        if not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < 1:
            raise CnnvisError(f"compositional.{k}: must be an integer >= 1 (got {s[k]!r})")
    p = s["penalty"]
    if isinstance(p, bool) or not isinstance(p, int | float) or not (0 < p <= 1):
        raise CnnvisError(f"compositional.penalty: must be a number in (0, 1] (got {p!r})")
    units = s["units"]
    if units != "all" and not (isinstance(units, list) and units
                               and all(isinstance(u, int) and not isinstance(u, bool)
                                       and u >= 0 for u in units)):
        raise CnnvisError(f"compositional.units: must be 'all' or a non-empty list of unit "
                          f"indices (got {units!r})")
    s["penalty"] = float(p)
    return s


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
                    ) -> dict:
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
    return cols


def explain_units(cm: ConceptMasks, masks: Sequence[Mask], settings: dict, *,
                  prune: bool = True, progress: bool = False) -> tuple[list, dict]:
    from tqdm import tqdm

    searcher = Searcher(cm, max_length=settings["max_length"], beam=settings["beam"],
                        penalty=settings["penalty"], prune=prune)
    results = [searcher.explain(m) for m in tqdm(masks, desc="formulas", disable=not progress,
                                                 mininterval=2)]
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

def run_compositional(spec: dict, prepared: str | Path, extract_dirs: Sequence[str | Path],
                      thresholds: str | Path, layer: str, shard: int, shards: int,
                      settings: dict | None, out: str | Path, *, progress: bool = True) -> Path:
    """Formulas of one shard of a layer's (selected) units -> a partial formulas table `out`."""
    import pyarrow.parquet as pq

    from cnnvis_pipeline.dissection import pipeline
    from cnnvis_pipeline.models.input import pick_device
    from cnnvis_pipeline.tables import write_table

    s = resolve_settings(settings)
    ds = PreparedDataset(prepared)
    device = pick_device(pipeline.settings(spec)["device"])
    t = pq.read_table(thresholds, columns=["threshold"]).column("threshold").to_numpy()
    units = shard_units(select_units(s["units"], len(t), layer), shards, shard)
    t0 = time.perf_counter()
    cm = ConceptMasks(ds, device)
    t1 = time.perf_counter()
    batch = int(pipeline.settings(spec)["batch_size"])
    masks = unit_masks(layer_batches(extract_dirs, layer, batch, device), t, units,
                       tuple(ds.seg_size), device)
    t2 = time.perf_counter()
    covered = sum(json.loads((Path(d) / "info.json").read_text())["stop"]
                  - json.loads((Path(d) / "info.json").read_text())["start"]
                  for d in extract_dirs)
    if covered != len(ds):
        raise CnnvisError(f"{spec['name']}: extract shards cover {covered} of {len(ds)} images")
    results, stats = explain_units(cm, masks, s, progress=progress)
    t3 = time.perf_counter()
    log.info("%s %s shard %d/%d: %d units; concept masks %.2f s, unit masks %.2f s, search "
             "%.2f s; %s", spec["name"], layer, shard, shards, len(units), t1 - t0, t2 - t1,
             t3 - t2, stats)
    ckpt = json.loads((Path(extract_dirs[0]) / "info.json").read_text())["checkpoint_sha256"]
    return write_table("formulas", formula_columns(spec["name"], layer, units, results, cm),
                       out, _provenance(spec, ds, ckpt, s))


def _provenance(spec: dict, ds: PreparedDataset, ckpt: str | None, s: dict) -> dict:
    from cnnvis_pipeline.dissection import pipeline

    prov = pipeline._prov(spec, ds, {"checkpoint_sha256": ckpt})
    prov["compositional"] = json.dumps({k: s[k] for k in sorted(DEFAULTS)}, sort_keys=True)
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
    return write_table("formulas", cols, out, provs[0] if provs else {})
