"""Formulas of concepts and the beam search over them (see compositional.py for the method).

- extend(node, op, c), node_concepts(node), formula_text(node, texts): formulas as nested
  tuples, their concepts and canonical text.
- Item: one beam entry (formula, length, IoU, score).
- Searcher(concept_masks, settings): the beam search with exact IoU upper bounds.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cnnvis_pipeline.dissection.bitmasks import (
    AND,
    AND_NOT,
    OR,
    ConceptMasks,
    Mask,
    combine,
)
from cnnvis_pipeline.errors import CnnvisError

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
        # Every formula is scored on the same images: those annotated for any category (an
        # annotation group with at least one category); a concept is absent where its category
        # is not annotated.
        self.scored = cm.group_categories.any(1)  # bool [G]
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
        A = np.broadcast_to(self.scored, (cm.concepts, cm.groups))  # [C, G]
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
                # only what can still enter the beam becomes a formula: scores >= tau (tau only
                # grows) and among this parent's (distinct) candidates the best B, ties included
                floor = tau
                if len(score) > B:
                    floor = max(floor, np.partition(score, len(score) - B)[len(score) - B])
                for i in np.flatnonzero(score >= floor).tolist():
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
        groups = np.broadcast_to(self.scored, (cm.concepts, cm.groups))  # [C, G]
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
        groups = np.broadcast_to(self.scored, (len(cs), cm.groups))
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
