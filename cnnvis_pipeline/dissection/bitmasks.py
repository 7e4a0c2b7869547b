"""Bit-packed masks of compositional explanations (see compositional.py for the method).

- popcount_rows, words_for, pack_rows, unpack_rows: 64 pixels per int64 word, popcounts of rows.
- Mask: the non-empty bit-packed rows of a mask over the images where it has pixels.
- combine(a, b, op): the mask of `a op b` (AND, OR, AND_NOT).
- ConceptMasks(dataset, device): every concept's mask per image and annotation group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.stores import read_rows

AND, OR, AND_NOT = 0, 1, 2
OPS = (AND, OR, AND_NOT)

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
                # pread, not the memory map: the planes never stay resident
                lab = read_rows(ds.planes, i0, i1)[:, :P].reshape(i1 - i0, P, S)
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
