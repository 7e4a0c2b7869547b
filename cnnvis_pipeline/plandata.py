"""What the resource plan (plan.py) starts from, known before any job runs: the config as the
workflow sees it (`load_config`), the dataset's size (`dataset_size`: its prepared arrays'
meta.json when they exist, else the source's index.csv, else the config, broden-synth's `images`
and `size` or a source's counted folders, or the known datasets' sizes) and the layers' shapes
(`model_shape`: the model built on the meta device, cached). Imports no torch at module level.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

from cnnvis_pipeline.config import dataset_name, dataset_source_dir, spec_digest
from cnnvis_pipeline.data.sources import size_estimate, source_kind
from cnnvis_pipeline.errors import CnnvisError

MB = 1 << 20
# Known datasets: images, image side, segmentation side, label planes, concepts.
KNOWN_DATASETS = {
    "broden1_224": (63305, 224, 112, 6, 1197),
    "broden1_227": (63305, 227, 113, 6, 1197),
    "broden1_384": (63305, 384, 192, 6, 1197),
}
SYNTH_PLANES, SYNTH_CONCEPTS = 5, 60


@dataclass(frozen=True)
class DatasetSize:
    images: int
    image_size: tuple[int, int]
    seg_size: tuple[int, int]
    planes: int
    concepts: int
    source: str  # where the figures come from

    @property
    def prepared_mb(self) -> float:
        h, w = self.image_size
        sh, sw = self.seg_size
        return self.images * (3 * h * w + 2 * self.planes * sh * sw) / MB



@dataclass(frozen=True)
class ModelShape:
    params: int
    gflops: float  # forward pass of one image
    largest_output: int  # elements of the largest module output of one image
    layers: dict  # layer -> [units, h, w]
    prefix_gflops: dict = field(default_factory=dict)  # layer -> GFLOPs of the pass up to it


def _from_prepared(config: dict) -> DatasetSize | None:
    root = Path(config.get("data_root", "resources"))
    metas = sorted(glob.glob(str(root / "prepared" / f"{dataset_name(config)}-*" / "meta.json")),
                   key=lambda p: Path(p).stat().st_mtime)
    if not metas:
        return None
    import numpy as np

    meta = json.loads(Path(metas[-1]).read_text())
    planes = len(np.load(Path(metas[-1]).parent / "plane_category.npy"))
    return DatasetSize(int(meta["n_images"]), tuple(meta["image_size"]), tuple(meta["seg_size"]),
                       max(planes, 1), len(meta.get("concepts", [])), metas[-1])


def _from_index(config: dict) -> DatasetSize | None:
    index = Path(dataset_source_dir(config)) / "index.csv"
    if not index.is_file():
        return None
    with open(index, newline="") as f:
        rows = csv.DictReader(f)
        first = next(rows, None)
        n = 1 + sum(1 for _ in rows) if first is not None else 0
    if first is None:
        raise SizeUnknown(f"{index}: no images")
    cats = [k for k in first if k not in ("image", "split", "ih", "iw", "sh", "sw")]
    labels = Path(dataset_source_dir(config)) / "label.csv"
    concepts = max(1, sum(1 for _ in open(labels)) - 1) if labels.is_file() else 1000
    size = (int(first.get("ih") or 224), int(first.get("iw") or 224))
    seg = (int(first.get("sh") or size[0] // 2), int(first.get("sw") or size[1] // 2))
    return DatasetSize(n, size, seg, max(1, len(cats)), concepts, str(index))


class SizeUnknown(CnnvisError):
    """The dataset's size cannot be known before a job makes it (a `url:` archive not yet
    downloaded, an index.csv that is missing or empty: the data stage reports those)."""


def dataset_size(config: dict) -> DatasetSize:
    """The dataset's images and sizes (prepared arrays, else index.csv, else the config)."""
    ds = config["dataset"]
    kind = source_kind(ds)
    found = _from_prepared(config) or (None if kind else _from_index(config))
    if found is not None:
        return found
    if kind:  # read in place (data/sources/): counted from its folders, sizes from a header
        return DatasetSize(*size_estimate(ds), f"config: dataset.{kind}")
    if "synth" in ds:
        s = ds["synth"] or {}
        n, side = int(s.get("images", 1000)), int(s.get("size", 64))
        return DatasetSize(n, (side, side), (side // 2, side // 2), SYNTH_PLANES, SYNTH_CONCEPTS,
                           "config: dataset.synth")
    known = KNOWN_DATASETS.get(ds.get("download") or "")
    if known is None:
        raise SizeUnknown(f"config: dataset: no index.csv at {dataset_source_dir(config)} and not "
                          f"a known dataset ({', '.join(KNOWN_DATASETS)}): its size is unknown")
    n, side, seg, planes, concepts = known
    return DatasetSize(n, (side, side), (seg, seg), planes, concepts,
                       f"config: dataset.download {ds['download']}")


def load_config(path: str | Path) -> dict:
    """A user's --configfile as the workflow sees it: merged with the embedded default,
    checked against the schema, the planned sections filled with the schema's defaults."""
    import yaml

    from cnnvis_pipeline import config as cc

    try:
        user = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CnnvisError(f"{path}: cannot read the config: {e}") from None
    default = yaml.safe_load((cc.SCHEMA_PATH.parents[2] / "config" / "config.yaml").read_text())
    cfg = cc.merge_with_default(user, default)
    cc.check_schema(cfg)
    for section in ("dissection", "resources", "views"):
        cfg[section] = cc.with_defaults(section, cfg.get(section))
    if cfg.get("compositional") is not None:
        cfg["compositional"] = cc.with_defaults("compositional", cfg["compositional"])
    return cfg


# -- the model -------------------------------------------------------------------------------------

def _shape_key(spec: dict, size) -> str:
    keys = ("arch", "torchvision", "factory", "kwargs", "layers", "layouts", "input_size")
    return spec_digest({"spec": {k: spec.get(k) for k in keys}, "size": list(size),
                        "shape": 2})[:16]  # what ModelShape holds


def measure_shape(spec: dict, size) -> ModelShape:
    """The model built on the meta device (no weights: shapes do not depend on them) and run
    on a meta input: parameters, GFLOPs of one image, the largest module output and the
    layers' canonical shapes. Imports torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cnnvis_pipeline.models.hooks import parse_layer
    from cnnvis_pipeline.models.probe import check_layers
    from cnnvis_pipeline.models.registry import build_architecture, build_model

    name = spec.get("name", "model")
    build = {k: v for k, v in spec.items() if k not in ("checkpoint", "weights")}
    if spec.get("factory"):
        with torch.device("meta"):
            model, _ = build_model(name, build)
    else:  # synthnet, torchvision: constructors that compute (RegNet's widths) run for real
        model = build_architecture(name, build).to("meta")
    h, w = spec.get("input_size") or size
    x = torch.zeros(1, 3, int(h), int(w), device="meta")
    outs = [0]
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(
        lambda _m, _i, o: outs.append(o.numel() if torch.is_tensor(o) else 0)) for m in leaves]
    prefix: dict[str, float] = {}
    modules = dict(model.named_modules())
    with FlopCounterMode(display=False) as flops:

        def made(layer: str) -> None:  # the work before a layer, as its output is made
            prefix.setdefault(layer, flops.get_total_flops() / 1e9)

        for layer in spec["layers"]:
            module = modules.get(parse_layer(layer)[0])
            if module is not None:
                hooks.append(module.register_forward_hook(lambda *_, x=layer: made(x)))
        try:
            shapes = {}
            if spec["layers"]:
                shapes = check_layers(model, spec["layers"], x, model_name=name,
                                      layouts=spec.get("layouts"))
            else:  # a model without layers to dissect (a segmenter): its forward pass only
                model.eval()(x)
        finally:
            for hk in hooks:
                hk.remove()
    return ModelShape(sum(p.numel() for p in model.parameters()), flops.get_total_flops() / 1e9,
                      max(outs), {k: [int(d) for d in v] for k, v in shapes.items()}, prefix)


def model_shape(spec: dict, size, cache_dir: str | Path | None = ".snakemake/cnnvis/plan") -> ModelShape:
    """measure_shape, cached in `cache_dir` by the spec (None: not cached)."""
    path = Path(cache_dir) / f"shape-{_shape_key(spec, size)}.json" if cache_dir else None
    if path is not None and path.is_file():
        return ModelShape(**json.loads(path.read_text()))
    shape = measure_shape(spec, size)
    if path is not None:
        from cnnvis_pipeline.fileio import write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(shape.__dict__, sort_keys=True))
    return shape
