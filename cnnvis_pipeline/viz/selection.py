"""Which units of a layer are visualised: the `top_units` with the highest IoU, plus the units
the model's config asks for (`units: {layer: [ids]}`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cnnvis_pipeline.errors import CnnvisError


def requested_units(spec: dict, layer: str) -> list[int]:
    """The units the model's `units:` setting lists for `layer` (none when absent)."""
    units = spec.get("units") or {}
    if not isinstance(units, dict):
        raise CnnvisError(
            f"config: models.{spec.get('name', '?')}.units must map layer names to unit lists"
        )
    unknown = [k for k in units if k not in spec.get("layers", [])]
    if unknown:
        raise CnnvisError(
            f"config: models.{spec.get('name', '?')}.units names layers {unknown} that are not "
            f"among its layers {spec.get('layers')}"
        )
    return [int(u) for u in units.get(layer) or []]


def select_units(units: pd.DataFrame, top_units: int, extra: list[int] | tuple = (),
                 *, where: str = "layer") -> list[int]:
    """Unit ids: the `top_units` highest IoUs (ties: lower unit first), then the extra ones
    that are not among them, in the order given. Raises when an extra unit does not exist."""
    ids = units["unit"].to_numpy().astype(np.int64)
    iou = units["iou"].to_numpy().astype(np.float64)
    n = len(ids)
    bad = sorted({int(u) for u in extra if not 0 <= int(u) < n or int(u) not in set(ids.tolist())})
    if bad:
        raise CnnvisError(f"{where}: has units 0..{n - 1}; cannot visualise units {bad}")
    order = np.lexsort((ids, -np.nan_to_num(iou, nan=-np.inf)))
    chosen = [int(ids[i]) for i in order[: max(0, int(top_units))]]
    seen = set(chosen)
    for u in extra:
        if int(u) not in seen:
            chosen.append(int(u))
            seen.add(int(u))
    return chosen
