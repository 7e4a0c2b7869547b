"""The IoU tally: per (unit, concept) counts of mask pixels on label pixels, over a shard.

- ConceptTally: |M_k ∩ L_c| per (unit, concept), |M_k| per (unit, category) over the images
  annotated for it, |L_c| per concept and the images per category, as int64 sums on the device
  where it is fed (any sharding gives identical results). add(batch) / merge / iou / state /
  save / load, in the shape of stats.Float16Histogram; `concat`: the tallies of ranges of a
  layer's units (over the same images) as one.
- TallyLookup(dataset, device): the per-dataset lookups that add() needs.
- tally_shard(dataset, indices, store, thresholds, device): one shard's ConceptTally.
- mask_pixels(maps, hw, seg, thresholds, scratch), Scratch, SKIP_SLACK: the mask kernel (also
  compositional.unit_masks's).

The tally works on (image, unit) pairs that can have a mask pixel at all: a bilinear upsample
(weights >= 0, summing to 1) never exceeds the largest of its source pixels, so a map whose
maximum is <= T_k has an empty mask (a small relative slack keeps float rounding on the safe
side). Only those maps are upsampled; the mask pixels are gathered and counted per concept with
a lookup (label, plane) -> concept, so the cost is proportional to the mask pixels and the label
planes, not to units x pixels x concepts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnvis_pipeline.data.prepared import PreparedDataset
from cnnvis_pipeline.dissection.stats import SavedState
from cnnvis_pipeline.dissection.stores import ActivationStore, load_batches, tune_malloc
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.progress import Progress

# Upsampled maps handled at once in the tally (bytes of float32), per device type.
_TALLY_CHUNK_BYTES = {"cuda": 1 << 31}
_TALLY_CHUNK_DEFAULT = 1 << 26
# Images per tally step on CUDA, at least (fewer, larger steps: less launch and sync overhead).
_CUDA_TALLY_BATCH = 1024
# A map is skipped when max + slack * max|a| <= T (slack >> float32 rounding of a bilinear mix).
SKIP_SLACK = 2.0**-16


class TallyLookup:
    """Per-dataset lookups of the tally, on one device: (plane, label) -> concept, the planes
    of each category, which concepts are image-level, and the work buffers."""

    def __init__(self, dataset: PreparedDataset, device: torch.device):
        self.device = device
        self.C = len(dataset.concepts)
        self.seg = tuple(dataset.seg_size)
        plane_category = np.asarray(dataset.plane_category, np.int64)
        self.P = len(plane_category)
        # (plane p, label) -> concept index, C (the sink) for unlabeled or unknown labels.
        lut = np.full((max(self.P, 1), 1 << 16), self.C, np.int32)
        for j, (lab, cat) in enumerate(zip(dataset.concept_label, dataset.concept_category,
                                           strict=True)):
            for p in np.flatnonzero(plane_category == cat):
                if 0 < lab < (1 << 16):
                    lut[p, lab] = j
        self.lut = torch.from_numpy(lut.reshape(-1)).to(device)
        self.plane_base = (torch.arange(self.P, device=device) << 16).view(1, self.P, 1)
        # Earlier planes of the same category (a concept on several planes is counted once).
        self.earlier = [[q for q in range(p) if plane_category[q] == plane_category[p]]
                        for p in range(self.P)]
        image_kind = np.array([k == "image" for k in dataset.category_kind], bool)
        self.image_level = torch.from_numpy(
            np.append(image_kind[dataset.concept_category], False)).to(device)
        self.chunk_bytes = _TALLY_CHUNK_BYTES.get(device.type, _TALLY_CHUNK_DEFAULT)
        self.one = torch.ones(1, dtype=torch.int64, device=device)
        self.scratch = Scratch() if device.type == "cpu" else None


class Scratch:
    """Reused CPU work buffers of the tally (no page faults for fresh memory on every chunk)."""

    def __init__(self):
        self.flat: dict[str, torch.Tensor] = {}
        self.nz = torch.empty(0, 2, dtype=torch.int64)

    def get(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.flat.get(name)
        if t is None or t.numel() < numel:
            t = self.flat[name] = torch.empty(numel, dtype=dtype)
        return t[:numel]


def _upsample(x: torch.Tensor, seg, out: torch.Tensor | None) -> torch.Tensor:
    """F.interpolate(x, seg, bilinear, align_corners=False), into `out` when given (same kernel)."""
    if out is not None:
        try:
            return torch.ops.aten.upsample_bilinear2d.out(x, list(seg), False, None, None,
                                                          out=out)
        except (AttributeError, RuntimeError, TypeError):
            pass
    return F.interpolate(x, size=tuple(seg), mode="bilinear", align_corners=False)


def mask_pixels(maps: torch.Tensor, hw, seg, thresholds: torch.Tensor,
                 scratch: Scratch | None = None):
    """(map, pixel) index pairs of mask pixels: bilinear upsample of float16 maps [m, h*w] to
    `seg` (centre-aligned), then > the maps' thresholds [m]. Pairs are sorted by map on CPU."""
    m = len(maps)
    S = seg[0] * seg[1]
    if maps.is_cuda:
        # [1, m, h, w] channels-last: PyTorch's NHWC kernel spreads the work over every output
        # element (its NCHW kernel loops over maps inside one thread per output pixel).
        x = maps.float().T.contiguous().view(1, *hw, m).permute(0, 3, 1, 2)
        up = F.interpolate(x, size=tuple(seg), mode="bilinear", align_corners=False)
        up = up.permute(0, 2, 3, 1).reshape(S, m)
        s, r = (up > thresholds.view(1, m)).nonzero(as_tuple=True)
        return r, s
    x = maps.view(m, 1, *hw).float()
    if scratch is None:
        up = F.interpolate(x, size=tuple(seg), mode="bilinear", align_corners=False)
        return (up.view(m, S) > thresholds.view(m, 1)).nonzero(as_tuple=True)
    up = _upsample(x, seg, scratch.get("up", m * S, torch.float32).view(m, 1, *seg))
    mask = scratch.get("mask", m * S, torch.bool).view(m, S)
    torch.gt(up.view(m, S), thresholds.view(m, 1), out=mask)
    scratch.nz.resize_(0, 2)
    nz = torch.nonzero(mask, out=scratch.nz)
    return nz[:, 0], nz[:, 1]


def pixel_concepts(planes: torch.Tensor, lookup: TallyLookup) -> torch.Tensor:
    """int64 [B, P, S]: the concept of each pixel of each plane (C where none; a concept on
    several planes of its category counted on the first)."""
    B, P, C = planes.shape[0], lookup.P, lookup.C
    lab = planes[:, :P].reshape(B, P, -1).to(torch.int64) & 0xFFFF
    conc = lookup.lut[lab + lookup.plane_base]
    for p in reversed(range(P)):  # compare with the earlier planes' original values
        for q in lookup.earlier[p]:
            conc[:, p].masked_fill_(conc[:, p] == conc[:, q], C)
    return conc


class ConceptTally(SavedState):
    """Sums of |M ∩ L_c|, |M| per annotated category and |L_c| over images, for every unit."""

    FIELDS = ("intersection", "mask_area", "concept_area", "category_images", "unit_area")

    def __init__(self, units: int, concepts: int, categories: int, device="cpu"):
        self.units, self.concepts, self.categories = units, concepts, categories
        kw = {"dtype": torch.int64, "device": device}
        self.intersection = torch.zeros(units, concepts + 1, **kw)  # last column: padding sink
        self.mask_area = torch.zeros(units, categories, **kw)  # Σ |M_k| over images with category
        self.concept_area = torch.zeros(concepts + 1, **kw)  # Σ |L_c| (over images having c)
        self.category_images = torch.zeros(categories, **kw)  # images annotated per category
        self.unit_area = torch.zeros(units, **kw)  # Σ |M_k| over all images (unit activity)

    def merge(self, other: ConceptTally) -> None:
        for f in self.FIELDS:
            getattr(self, f).add_(getattr(other, f).to(getattr(self, f).device))

    def add(self, acts: torch.Tensor, thresholds: torch.Tensor, planes: torch.Tensor,
            slots: np.ndarray, present: np.ndarray, lookup: TallyLookup, stats=None) -> None:
        """Add one batch: acts float16 [B, U, h, w], thresholds float32 [U] and planes (int16
        bits of uint16 [B, P', sh, sw]) on lookup.device; slots and present as prepared.
        `stats` (records.ImageStats, told the batch beforehand) records the per-image counts
        of the same masks."""
        dev, C, P = lookup.device, lookup.C, lookup.P
        sh, sw = lookup.seg
        S = sh * sw
        B, U = acts.shape[:2]
        present_t = torch.from_numpy(np.ascontiguousarray(present)).to(dev)
        self.category_images += present_t.sum(0).to(torch.int64)

        # Label side: the concept of each pixel of each plane (C where none), image-level labels.
        conc = None
        if P:
            conc = pixel_concepts(planes, lookup)  # [B, P, S]
            area = torch.bincount(conc.reshape(-1), minlength=C + 1)
            self.concept_area[:C] += area[:C]
        slots_t = torch.from_numpy(np.ascontiguousarray(slots)).to(dev).long()
        is_image = (slots_t >= 0) & lookup.image_level[torch.where(slots_t >= 0, slots_t, C)]
        img_b, img_j = is_image.nonzero(as_tuple=True)
        img_c = slots_t[img_b, img_j]
        self.concept_area.index_add_(0, img_c, torch.full_like(img_c, S))
        if stats is not None:
            stats.labels(conc, img_b, img_c, lookup, pixel_concepts)

        # Unit side: only maps whose maximum can exceed T_k.
        flat = acts.reshape(B, U, -1)
        lo, hi = torch.aminmax(flat, dim=2)
        lo, hi = lo.float(), hi.float()
        reach = hi + SKIP_SLACK * torch.maximum(hi.abs(), lo.abs())
        active_b, active_u = (reach > thresholds.view(1, U)).nonzero(as_tuple=True)
        count = torch.zeros(B, U, dtype=torch.int64, device=dev)
        inter = self.intersection.view(-1)
        step = max(1, lookup.chunk_bytes // (S * 4))
        for i in range(0, len(active_b), step):
            b_i, u_i = active_b[i : i + step], active_u[i : i + step]
            r, s = mask_pixels(flat[b_i, u_i], acts.shape[2:], (sh, sw), thresholds[u_i],
                                lookup.scratch)
            count[b_i, u_i] = torch.bincount(r, minlength=len(b_i))
            if stats is not None:  # per-image records of the same mask pixels
                stats.chunk(b_i, u_i, r, s)
            if conc is not None:
                keys = conc[b_i[r], :, s] + (u_i[r] * (C + 1)).unsqueeze(1)  # [K, P]
                keys = keys.reshape(-1)
                inter.index_add_(0, keys, lookup.one.expand(len(keys)))
        if len(img_b):
            self.intersection.index_add_(1, img_c, count[img_b].T.contiguous())
        self.intersection[:, C] = 0  # the sink column stays empty
        self.mask_area += (count.unsqueeze(2) * present_t.unsqueeze(1).to(torch.int64)).sum(0)
        self.unit_area += count.sum(0)
        if stats is not None:
            stats.masks(count)

    @classmethod
    def concat(cls, parts: list[ConceptTally]) -> ConceptTally:
        """The tally of the units of `parts` in order (each over the same images: their label
        sums must agree)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        for p in parts[1:]:
            if not (torch.equal(p.concept_area.cpu(), first.concept_area.cpu())
                    and torch.equal(p.category_images.cpu(), first.category_images.cpu())):
                raise CnnvisError("the unit parts' tallies are not over the same images "
                                  "(parts of different runs?)")
        out = cls(sum(p.units for p in parts), first.concepts, first.categories, "cpu")
        for f in ("intersection", "mask_area", "unit_area"):
            setattr(out, f, torch.cat([getattr(p, f).cpu() for p in parts]))
        out.concept_area = first.concept_area.cpu().clone()
        out.category_images = first.category_images.cpu().clone()
        return out

    def iou(self, concept_category: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(iou, intersection, union), each [units, concepts] (float64, int64, int64)."""
        inter = self.intersection[:, : self.concepts].cpu().numpy()
        mask = self.mask_area.cpu().numpy()[:, concept_category]
        union = mask + self.concept_area[: self.concepts].cpu().numpy()[None, :] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        return iou, inter, union

    def state(self) -> dict[str, np.ndarray]:
        out = {f: getattr(self, f).cpu().numpy() for f in self.FIELDS}
        out["shape"] = np.array([self.units, self.concepts, self.categories])
        return out

    @classmethod
    def from_state(cls, state, device="cpu") -> ConceptTally:
        u, c, k = (int(v) for v in state["shape"])
        t = cls(u, c, k, device)
        for f in cls.FIELDS:
            if f in state:  # (unit_area: absent from tallies of older versions)
                getattr(t, f).copy_(torch.as_tensor(np.asarray(state[f])))
        return t



def tally_shard(dataset: PreparedDataset, indices: np.ndarray, store: ActivationStore,
                thresholds: np.ndarray, *, device: torch.device, batch_size: int = 64,
                desc: str = "tally", progress: bool = True, stats=None) -> ConceptTally:
    """One shard's ConceptTally; with `stats` (a records.ImageStats holding the partner table)
    its per-image records too, from the same masks (finished on return)."""
    tune_malloc()
    units = store.shape[1]
    tally = ConceptTally(units, len(dataset.concepts), len(dataset.categories), device)
    # Compared with the stored values, in the store's coordinates (exact for on-grid T_k).
    t = torch.as_tensor(store.affine.to_stored(thresholds), dtype=torch.float32, device=device)
    lookup = TallyLookup(dataset, device)
    pin = device.type == "cuda"
    if pin:
        batch_size = max(batch_size, _CUDA_TALLY_BATCH)
    with torch.inference_mode():
        bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, mininterval=2)
        lines = Progress(desc, len(indices), enabled=progress)
        for b in load_batches(dataset, indices, batch_size, ("planes", "slots", "present"),
                              device, store=store):
            n = len(b.indices)
            if b.acts is not None:
                acts = b.acts.to(device, non_blocking=pin)
            else:
                acts = store.read(b.pos, b.pos + n, device)
            planes = b.planes.to(device, non_blocking=pin)
            if stats is not None:
                stats.read_batch(dataset, b.indices, device)
            tally.add(acts, t, planes, b.slots, b.present, lookup, stats)
            bar.update(n)
            lines.update(n)
        bar.close()
        lines.close()
    if stats is not None:
        stats.finish()
    return tally
