"""What the Methods section of every page says: the dataset, the dissection's settings (from the
tables' provenance), the model's source, digests and versions.

- dissection_settings(prov, path): the provenance's "dissection" entry (quantile,
  iou_threshold, precision, top_k, statistics), or an error naming the table.
- dataset_info(prepared, name, categories, concepts, digest): the dataset's facts.
- method_info(...): the context of templates/_methods.html.
"""

from __future__ import annotations

import json
from pathlib import Path

from cnnvis_pipeline import __version__
from cnnvis_pipeline.errors import CnnvisError


def dissection_settings(prov: dict, path: str | Path) -> dict:
    s = prov.get("dissection")
    if not isinstance(s, dict) or "iou_threshold" not in s or "quantile" not in s:
        raise CnnvisError(f"{path}: its provenance has no dissection settings (written by an "
                          "older version, or a summary given no units tables); rerun the "
                          "dissection")
    return s


def _read_meta(prepared: str | Path) -> dict:
    path = Path(prepared)
    if path.is_file():  # the workflow's prepare receipt (JSON naming the shared directory)
        try:
            path = Path(json.loads(path.read_text(encoding="utf-8"))["prepared"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CnnvisError(f"{prepared}: not a prepare receipt ({e})") from None
    path = path / "meta.json"
    if not path.is_file():
        raise CnnvisError(f"{path}: missing; prepare the dataset first")
    return json.loads(path.read_text())


def dataset_info(prepared: str | Path | None, name: str | None, categories: list[str],
                 concepts: int, digest: str | None) -> dict:
    """What the Methods section says about the dataset: from the prepared dataset's meta.json
    when given, else what the tables show (the categories and concepts of the iou table)."""
    info = {"name": name, "digest": digest, "images": None, "splits": {}, "concepts": concepts,
            "labels": None, "image_size": None, "seg_size": None, "predicted": None,
            "source_kind": None, "computed": [],
            "categories": [{"name": c, "kind": None, "concepts": None} for c in categories]}
    if prepared is None:
        return info
    meta = _read_meta(prepared)
    per_cat: dict[str, int] = {}
    for c in meta["concepts"]:
        per_cat[c["category"]] = per_cat.get(c["category"], 0) + 1
    splits: dict[str, int] = {}
    for s in meta.get("splits", []):
        splits[s] = splits.get(s, 0) + 1
    info.update(
        images=int(meta["n_images"]), splits=dict(sorted(splits.items())),
        concepts=len(meta["concepts"]), labels=len({c["label"] for c in meta["concepts"]}),
        image_size=meta.get("image_size"), seg_size=meta.get("seg_size"),
        digest=meta.get("digest") or digest, predicted=_predicted(meta),
        source_kind=(meta.get("source_info") or {}).get("kind"), computed=_computed(meta),
        categories=[{"name": c["name"], "kind": c["kind"], "concepts": per_cat.get(c["name"], 0)}
                    for c in meta["categories"]])
    return info


def _predicted(meta: dict) -> dict | None:
    """What labelled the dataset when its labels are a segmenter's predictions (meta.json
    `labels: predictions`; `source_info` names the segmenter), else None."""
    if meta.get("labels") != "predictions":
        return None
    info = meta.get("source_info") or {}
    while isinstance(info.get("base"), dict) and "factory" not in info:  # a derived source
        info = info["base"]
    return {"factory": info.get("factory"), "checkpoint_sha256": info.get("checkpoint_sha256")}


def _computed(meta: dict) -> list[str]:
    """The rules of concepts computed from the pixels (a merged set's colour extra)."""
    extras = (meta.get("source_info") or {}).get("extras") or []
    return [str(e.get("rule") or "computed") for e in extras
            if isinstance(e, dict) and e.get("labels") == "computed"]


def _model_source(spec: dict | None, prov: dict) -> str:
    sha = prov.get("checkpoint_sha256")
    if not spec:
        return f"checkpoint sha256 {sha}" if sha else "no checkpoint recorded"
    if spec.get("torchvision"):
        what = f"torchvision {spec['torchvision']}, weights {spec.get('weights') or 'none'}"
    elif spec.get("factory"):
        what = f"factory {spec['factory']}"
    else:
        what = f"{spec.get('arch')} (built in)"
        if spec.get("train"):
            what += ", trained by the workflow"
    if sha:
        return f"{what}; checkpoint sha256 {sha}"
    if spec.get("torchvision") and spec.get("weights"):
        return f"{what} (torchvision's published weights)"
    return f"{what}; no checkpoint: seeded random weights (seed {spec.get('seed', 0)})"


def method_info(*, prov: dict, dataset: dict, dissection: dict, spec: dict | None | bool,
                views: dict | None = None) -> dict:
    """`spec` False: no model (the summary page); `views`: the first layer's manifest views
    with the report's settings ({"top_units", "top_images", "views": [...]})."""
    return {
        "dataset": dataset, "quantile": dissection.get("quantile"),
        "iou_threshold": dissection.get("iou_threshold"), "top_k": dissection.get("top_k"),
        "device": prov.get("device"),
        "precision": prov.get("precision") or dissection.get("precision"),
        "source": _model_source(spec, prov) if spec is not False else None,
        "config_digest": prov.get("config_digest"),
        "model_digests": prov.get("model_config_digests"),
        "versions": {"cnnvis-pipeline": prov.get("cnnvis_pipeline_version") or __version__,
                     "torch": prov.get("torch_version"),
                     "torchvision": prov.get("torchvision_version")},
        "viz": views,
        "report_version": __version__,
    }
