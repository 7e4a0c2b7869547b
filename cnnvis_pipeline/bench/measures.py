"""What the speed benchmark measures besides time, on the model and dataset it times.

- detectors_per_layer: the number of detector units per layer of a dissection's result.
- verify_on_cpu: whether the device's tally and the CPU's agree on the same activations.
- activation_bytes: the float16 size of the layers' activations over the dataset.
"""

from __future__ import annotations


def detectors_per_layer(result: dict, ds, iou_threshold: float = 0.04) -> dict:
    """Detectors per layer: units whose top concept has IoU > iou_threshold (the units table's
    `detector` column, by results.unit_columns)."""
    from cnnvis_pipeline.dissection.results import unit_columns

    return {layer: int(unit_columns("bench", layer, tally, ds, result["thresholds"][layer],
                                    iou_threshold)["detector"].sum())
            for layer, tally in result["tallies"].items()}


def verify_on_cpu(model, layers, ds, n: int, common: dict) -> dict:
    """Extract n images on the device, tally them there and on the CPU from the same float16
    activations and thresholds; True per layer when every integer of the two tallies agrees."""
    import numpy as np
    import torch

    from cnnvis_pipeline.dissection.extract import extract_shard, unit_thresholds
    from cnnvis_pipeline.dissection.stores import ActivationStore
    from cnnvis_pipeline.dissection.tally import ConceptTally, tally_shard

    device = common["device"]
    idx = np.arange(min(n, len(ds)), dtype=np.int64)
    stores, hists, _ = extract_shard(model, layers, ds, idx, out_dir=None, progress=False,
                                            **common)
    cpu = torch.device("cpu")
    out = {}
    for layer in layers:
        t = unit_thresholds(hists[layer], 0.005)
        here = tally_shard(ds, idx, stores[layer], t, device=device, progress=False)
        host = ActivationStore(len(idx), stores[layer].shape[1:], None, cpu,
                               stores[layer].affine)
        host.write(0, stores[layer].data.cpu())
        there = tally_shard(ds, idx, host, t, device=cpu, progress=False)
        out[layer] = all(torch.equal(getattr(here, f).cpu(), getattr(there, f))
                         for f in ConceptTally.FIELDS)
    return out


def activation_bytes(model, layers: list[str], size: int, n: int) -> int:
    """float16 bytes of the layers' activations over n images (one probe forward at batch 1)."""
    import torch

    from cnnvis_pipeline.models.hooks import LayerRecorder

    device = next(model.parameters()).device
    probe = torch.zeros(1, 3, size, size, device=device)
    with LayerRecorder(model, layers, stop_after_last=True) as rec, torch.inference_mode():
        outs = rec.run(probe)
    return sum(o[0].numel() * 2 for o in outs.values()) * n
