"""Per-image records of the IoU tally, and the seeded draws of the statistics built on them.

The tally pass records, beside its sums and from the same mask pixels (ConceptTally.add calls
ImageStats), what intervals and p-values need per image; dissection/significance.py turns them
into the statistics when the tables are written. Definitions: docs/DEFINITIONS.md, "Significance".

- ImageStats: for the images of one shard and one layer: the mask area of every (image, unit),
  the intersection of every (image, unit, concept), the same with the labels of each partner
  image, and every concept's label area per image. Partners' label planes are read from the
  prepared arrays (every shard sees them). Records are compact numpy columns (DTYPES), moved
  off the device batch by batch; `merge` concatenates; records are kept sorted, so the merged
  records do not depend on the sharding. `upper`, the bound of the label null
  (significance._null_counts), is summed batch by batch, so no step needs all records at once
  in a wider form.
- partner_indices(present, seed, partners) / null_choices(...): the null's blocks of
  `partners + 1` images annotated alike, and the permutation of each block's labels in each null
  replicate; poisson_weights(...): the bootstrap's per-image weights. All are a hash
  (SplitMix64) of the seed, the replicate and the global image index: shard-independent, the
  same on every machine and numpy version.
- new_stats(dataset, statistics): the recorder of one tally pass (None when disabled).
"""

from __future__ import annotations

import numpy as np
import torch

from cnnvis_pipeline.dissection.stores import _RowReader
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.settings import Statistics

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Streams of the hash: bootstrap weights, null choices, the partners' random order.
_BOOT, _NULL, _ORDER = 1, 2, 3


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
    """float64 [len(rows), len(images)] in [0, 1): a hash of (seed, stream, row, image)."""
    h = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))
    h = _splitmix64(h ^ np.uint64(stream))
    h = _splitmix64(h ^ np.asarray(rows, np.uint64).reshape(-1, 1))
    h = _splitmix64(h ^ np.asarray(images, np.uint64).reshape(1, -1))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


# Poisson(1) cumulative distribution, 0..19 (the mass beyond 19 is below 2^-53).
_POISSON1_CDF = np.cumsum([np.exp(-1.0) / np.prod(np.arange(1, k + 1, dtype=np.float64))
                           for k in range(20)])


def poisson_weights(seed: int, replicates: int, images: np.ndarray) -> np.ndarray:
    """int64 [replicates, len(images)]: Poisson(1) bootstrap weights of the images."""
    u = hash_uniform(seed, _BOOT, np.arange(replicates), images)
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.int64)


def _blocks(present: np.ndarray, seed: int, size: int):
    """The null's blocks: images grouped into strata of identical `present` rows (annotated for
    the same categories), each stratum in a random order (a hash of the seed and the image
    index), cut into consecutive blocks of `size` images (the last block of a stratum may be
    smaller). Returns (canon, start, length): the images in block order, and for each position
    of `canon` the position where its block starts and the block's length."""
    present = np.asarray(present, bool)
    n = len(present)
    if n == 0:
        return (np.zeros(0, np.int64),) * 3
    _, stratum = np.unique(present, axis=0, return_inverse=True)
    stratum = stratum.reshape(-1)
    key = hash_uniform(seed, _ORDER, np.zeros(1), np.arange(n))[0]
    canon = np.lexsort((np.arange(n), key, stratum))
    sizes = np.bincount(stratum)
    s_start = np.repeat(np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
    s_len = np.repeat(sizes, sizes)
    pos = np.arange(n) - s_start
    start = s_start + pos // size * size
    length = np.minimum(size, s_start + s_len - start)
    return canon, start, length


def partner_indices(present: np.ndarray, seed: int, partners: int) -> np.ndarray:
    """int64 [partners, N]: partner d + 1 of every image: within its block of partners + 1
    images (see _blocks), the image d places further on, cyclically. Each row is a permutation
    of the images; an image is its own partner only in a block too small to hold d + 1 images
    (a stratum with fewer images than blocks need)."""
    canon, start, length = _blocks(present, seed, partners + 1)
    n = len(canon)
    out = np.empty((partners, n), np.int64)
    g = np.arange(n)
    for d in range(1, partners + 1):
        out[d - 1, canon] = canon[start + (g - start + d) % np.maximum(length, 1)]
    return out


def null_choices(seed: int, replicates: int, present: np.ndarray, partners: int,
                 first: int = 0) -> np.ndarray:
    """int64 [replicates, N] in 0..partners: whose labels each image takes in null replicates
    first, first + 1, ...: 0 its own, d its partner d's. In every replicate the labels of each
    block are permuted among its images by a uniformly random permutation (a hash of the seed,
    the replicate and the image index), so each image's labels are used exactly once."""
    canon, start, length = _blocks(present, seed, partners + 1)
    n = len(canon)
    u = hash_uniform(seed, _NULL, np.arange(first, first + replicates), canon)
    # positions sorted by (block, random key): position g takes the labels of position s[g]
    order = np.argsort(start[None, :] + u * 0.5, axis=1, kind="stable")
    g = np.arange(n)
    offset = (order - g[None, :]) % np.maximum(length, 1)[None, :]
    out = np.empty((replicates, n), np.int64)
    out[:, canon] = offset
    return out


# The records' columns are stored compactly (numpy, moved off the device batch by batch): images,
# units, concepts and counts int32 (< 2^31 of each; keys combining them are made in int64),
# partners int8 (at most 15).
DTYPES = {"image": np.int32, "unit": np.int32, "concept": np.int32, "count": np.int32,
          "partner": np.int8}


class ImageStats:
    """Per-image records of one layer's tally (see the module docstring).

    Arrays (numpy after `finish`/`from_state`, dtypes DTYPES): mask_{image,unit,count};
    inter_{image,unit,concept,count}; null_{partner,image,unit,concept,count} (partner 1..D, the
    labels of partner d of the image); area_{image,concept,count}. Images are global dataset
    indices. `upper` [U, C] int64: per (unit, concept), the sum over images of the largest
    intersection of the unit's mask with the image's own or any partner's labels (summed batch
    by batch: an image's records all come from its batch).
    """

    GROUPS = {
        "mask": ("image", "unit", "count"),
        "inter": ("image", "unit", "concept", "count"),
        "null": ("partner", "image", "unit", "concept", "count"),
        "area": ("image", "concept", "count"),
    }

    def __init__(self, partners: np.ndarray | None = None):
        self.partners = partners  # [D, N] global partner table (pass time only)
        self._reader = None
        # per group and column, the batches' compact numpy chunks
        self._parts = {g: {n: [] for n in names} for g, names in self.GROUPS.items()}
        self._batch_start = {"inter": 0, "null": 0}
        self.arrays: dict[str, np.ndarray] | None = None
        self.upper: np.ndarray | None = None

    # -- pass time (called by the tally) --------------------------------------------------------

    def read_batch(self, dataset, indices: np.ndarray, device: torch.device) -> None:
        """Read the label planes of the batch's partner images (from the prepared arrays, in
        row order) and hand the batch to `batch`."""
        if self._reader is None:
            self._reader = _RowReader(dataset.planes)
        indices = np.asarray(indices, np.int64)
        partners = self.partners[:, indices]  # [D, B]
        flat = partners.reshape(-1)
        order = np.argsort(flat, kind="stable")
        rows = np.empty((len(flat), *dataset.planes.shape[1:]), dataset.planes.dtype)
        self._reader.read(flat[order], rows)
        host = np.empty_like(rows)
        host[order] = rows
        planes = torch.from_numpy(host.view(np.int16)).to(device)
        self.batch(indices, dataset.slots[indices], planes.view(*partners.shape, *host.shape[1:]),
                   dataset.slots[partners])

    def batch(self, indices: np.ndarray, slots: np.ndarray, partner_planes,
              partner_slots) -> None:
        """The next batch: its global image indices and slots, the label planes and slots of
        its partners (torch [D, B, P', sh, sw] on the tally's device, numpy [D, B, J])."""
        self._idx = torch.as_tensor(np.asarray(indices, np.int64))
        self._pplanes, self._pslots = partner_planes, partner_slots
        self._batch_start = {g: len(self._parts[g]["image"]) for g in self._batch_start}
        # The concepts present in the batch or its partners (from the prepared slots): counts
        # are kept in this compressed concept space, index Cb = none.
        present = np.unique(np.concatenate([np.asarray(slots).ravel(),
                                            np.asarray(partner_slots).ravel()]))
        self._concepts = present[present >= 0]

    def labels(self, conc: torch.Tensor | None, img_b: torch.Tensor, img_c: torch.Tensor,
               lookup, pixel_concepts) -> None:
        """The batch's concepts per pixel (conc [B, P, S], C = none) and image-level labels."""
        C, S = lookup.C, lookup.seg[0] * lookup.seg[1]
        self._C = C
        dev = lookup.device
        self._idx_dev = self._idx.to(dev)
        B = len(self._idx)
        Cb = len(self._concepts)
        self._W = W = Cb + 1
        self._global = torch.from_numpy(self._concepts).to(dev)
        remap = torch.full((C + 1,), Cb, dtype=torch.int32, device=dev)  # int32: half the memory
        remap[self._global] = torch.arange(Cb, device=dev, dtype=torch.int32)
        self._img = (img_b, img_c)
        self._pimg = []
        for d in range(len(self._pslots)):
            slots_t = torch.from_numpy(np.ascontiguousarray(self._pslots[d])).to(dev).long()
            is_image = (slots_t >= 0) & lookup.image_level[torch.where(slots_t >= 0, slots_t, C)]
            pb, pj = is_image.nonzero(as_tuple=True)
            self._pimg.append((pb, slots_t[pb, pj]))
        if len(img_b):
            self._add("area", self._idx_dev[img_b], img_c, torch.full_like(img_c, S))
        self._comb = None
        if conc is None:
            return
        # Own and partners' concepts per pixel, side by side: [B, (D + 1) P, S] (compressed).
        P = conc.shape[1]
        self._comb = remap[torch.cat([conc] + [pixel_concepts(self._pplanes[d], lookup)
                                               for d in range(len(self._pslots))], 1)]
        groups = self._comb.shape[1] // P
        self._group_off = (torch.arange(groups, device=dev) * W).repeat_interleave(P).view(1, -1)
        area = torch.bincount((self._comb[:, :P].long() + (torch.arange(B, device=dev) * W)
                               .view(B, 1, 1)).reshape(-1), minlength=B * W).view(B, W)[:, :Cb]
        b, c = area.nonzero(as_tuple=True)
        self._add("area", self._idx_dev[b], self._global[c], area[b, c])

    def chunk(self, b_i: torch.Tensor, u_i: torch.Tensor, r: torch.Tensor,
              s: torch.Tensor) -> None:
        """Mask pixels (r: map in the chunk, s: pixel) of the maps (b_i, u_i): records the
        per-image intersections with the image's own and its partners' labels."""
        if self._comb is None:
            return
        m, W, G = len(b_i), self._W, len(self._pimg) + 1  # G: own labels + D partners
        keys = self._comb[b_i[r], :, s].long() + self._group_off + (r * (G * W)).unsqueeze(1)
        cnt = torch.zeros(m * G * W, dtype=torch.int64, device=keys.device)
        cnt.index_add_(0, keys.reshape(-1),
                       torch.ones(1, dtype=torch.int64, device=keys.device).expand(keys.numel()))
        cnt = cnt.view(m, G, W)
        own = cnt[:, 0, : W - 1]
        j, c = own.nonzero(as_tuple=True)
        self._add("inter", self._idx_dev[b_i[j]], u_i[j], self._global[c], own[j, c])
        others = cnt[:, 1:, : W - 1]
        j, d, c = others.nonzero(as_tuple=True)
        self._add("null", d + 1, self._idx_dev[b_i[j]], u_i[j], self._global[c], others[j, d, c])

    def masks(self, count: torch.Tensor) -> None:
        """count [B, U]: the mask area of every (image, unit) of the batch; records it and the
        intersections with image-level labels (the whole mask)."""
        b, u = count.nonzero(as_tuple=True)
        self._add("mask", self._idx_dev[b], u, count[b, u])
        for d, (ib, ic) in enumerate([self._img, *self._pimg]):
            if not len(ib):
                continue
            sub = count[ib]  # [L, U]
            j, uu = sub.nonzero(as_tuple=True)
            vals = (self._idx_dev[ib[j]], uu, ic[j], sub[j, uu])
            if d == 0:
                self._add("inter", *vals)
            else:
                self._add("null", torch.full_like(vals[0], d), *vals)
        self._add_upper(count.shape[1])

    def _add(self, group: str, *cols) -> None:
        for n, c in zip(self.GROUPS[group], cols, strict=True):
            self._parts[group][n].append(c.cpu().numpy().astype(DTYPES[n], copy=False))

    def _add_upper(self, units: int) -> None:
        """Add the batch's largest intersection per (image, unit, concept) over the image's own
        and its partners' labels to `upper` (every record of an image comes from its batch)."""
        if self.upper is None:
            self.upper = np.zeros((units, self._C), np.int64)
        unit, concept, image, count = (
            np.concatenate([c for g in ("inter", "null")
                            for c in self._parts[g][name][self._batch_start[g]:]]
                           or [np.zeros(0, np.int64)]).astype(np.int64, copy=False)
            for name in ("unit", "concept", "image", "count"))
        if not len(unit):
            return
        n = int(image.max()) + 1
        key = (unit * self._C + concept) * n + image
        order = np.argsort(key, kind="stable")
        key, count = key[order], count[order]
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        np.add.at(self.upper.reshape(-1), key[first] // n, np.maximum.reduceat(count, first))

    # -- results ----------------------------------------------------------------------------

    def finish(self) -> ImageStats:
        """Move the records to numpy, in canonical order."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        arrays = {}
        for g, names in self.GROUPS.items():
            for name in names:  # each column's chunks freed once concatenated
                chunks = self._parts[g].pop(name) or [np.zeros(0, DTYPES[name])]
                arrays[f"{g}_{name}"] = np.concatenate(chunks)
                del chunks
            self._parts[g] = {n: [] for n in names}
        self.arrays = _canonical(arrays)
        if self.upper is None:  # no batch
            self.upper = np.zeros((0, 0), np.int64)
        return self

    def merge(self, other: ImageStats) -> None:
        """Add `other`'s records and bound (its records are moved here: `other` is emptied)."""
        a, b = self.arrays, other.arrays
        self.arrays = other.arrays = None
        merged = {}
        for k in list(a):  # column by column, each part freed once concatenated
            merged[k] = np.concatenate([a.pop(k), b.pop(k)])
        self.arrays = _canonical(merged)
        if not other.upper.size:
            return
        self.upper = other.upper.copy() if not self.upper.size else self.upper + other.upper

    def state(self, prefix: str = "img_") -> dict[str, np.ndarray]:
        return {**{prefix + k: v for k, v in self.arrays.items()}, prefix + "upper": self.upper}

    @classmethod
    def from_state(cls, state, prefix: str = "img_") -> ImageStats:
        self = cls()
        arrays = {}
        for g, names in cls.GROUPS.items():
            for name in names:
                key = f"{prefix}{g}_{name}"
                if key not in state:
                    raise CnnvisError(f"tally has no per-image statistics ({key}); "
                                      "it was written with dissection.statistics disabled")
                arrays[f"{g}_{name}"] = np.asarray(state[key], DTYPES[name])
        self.arrays = _canonical(arrays)
        self.upper = np.asarray(state.get(f"{prefix}upper", np.zeros((0, 0))), np.int64)
        return self


def _canonical(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each group's records sorted by all its key columns (the count last), in place of the
    given columns (one column reordered at a time)."""
    for g, names in ImageStats.GROUPS.items():
        keys = [arrays[f"{g}_{n}"] for n in names[:-1]]
        order = np.lexsort(keys[::-1]) if len(keys[0]) else np.zeros(0, np.int64)
        del keys
        for n in names:
            arrays[f"{g}_{n}"] = arrays[f"{g}_{n}"][order]
    return arrays


def new_stats(dataset, statistics: Statistics) -> ImageStats | None:
    """The recorder a tally pass fills (None when statistics are disabled)."""
    if not statistics.enabled:
        return None
    return ImageStats(partner_indices(dataset.present, statistics.seed,
                                      statistics.partners))
