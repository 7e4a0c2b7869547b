"""The workflow's digest files: what Snakemake compares instead of mtimes (docs/HPC.md).

- refresh_digests(cfg, models, dir): at every workflow start (common.smk), bring
  `results/digests/` up to date with the content: the dataset's content digest, per model the
  checkpoint's sha256 and the factory module's source; each file is rewritten only when its
  content changes, so the jobs that take it as input rerun exactly then.
- model_content(name, spec): what of a model lives outside the config (checkpoint, factory
  source), without importing the factory module or loading the checkpoint.
- model_digest_file(dir, model): the path of a model's digest file.
- check_entry(cfg, dataset): the shared dataset entry is what the config asks for.

Imports neither torch nor a later stage, so that `snakemake -n` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

from cnnvis_pipeline.config import dataset_name, dataset_source_dir
from cnnvis_pipeline.data.download import check_recorded, is_complete
from cnnvis_pipeline.data.entries import check_synth, write_dataset_digest
from cnnvis_pipeline.data.manifest import file_sha256, module_source_files, write_if_changed
from cnnvis_pipeline.data.source import resolve_source
from cnnvis_pipeline.data.sources import source_kind, write_source_digest
from cnnvis_pipeline.errors import CnnvisError


def model_content(name: str, spec: dict, *, cache: str | Path | None = None) -> dict:
    """What of a model lives outside the config and must rerun its jobs when it changes: the
    checkpoint's sha256 (not its mtime) and the factory module's source (sha256 per file)."""
    out: dict = {}
    ckpt = spec.get("checkpoint")
    if ckpt and not spec.get("train"):
        if not Path(ckpt).is_file():
            raise CnnvisError(f"config: models.{name}: checkpoint file {ckpt} does not exist")
        try:
            out["checkpoint_sha256"] = file_sha256(ckpt, cache=cache)
        except OSError as e:
            raise CnnvisError(f"config: models.{name}: cannot read {ckpt} ({e.strerror})") from None
    if spec.get("factory"):
        module = str(spec["factory"]).partition(":")[0]
        files = module_source_files(module)
        out["factory_source"] = None if files is None else {
            str(f): file_sha256(f, cache=cache) for f in files
        }
    return out


def refresh_digests(cfg: dict, models: dict[str, dict], digests_dir: str | Path) -> None:
    """Bring the workflow's digest files up to date with the content (run at every workflow
    start, before Snakemake compares mtimes). Each file is rewritten only when its content
    changes, so jobs that take it as input rerun exactly when what it digests changed:

    - dataset.json: the dataset's content digest, when the dataset is there and complete
      (else it is removed, so the rule that makes the dataset runs);
    - prepared.json: the prepare receipt is removed when the shared entry it names is gone;
    - model_<name>.json: per model, checkpoint sha256 and factory source (model_content).
    """
    digests = Path(digests_dir)
    root = cfg.get("data_root", "resources")
    name = dataset_name(cfg)
    dataset = Path(dataset_source_dir(cfg))
    ds = cfg["dataset"]
    complete = dataset.is_dir() and (is_complete(dataset) if (ds.get("download") or ds.get("url"))
                                     else True)
    digest_file = digests / "dataset.json"
    if source_kind(ds):  # read in place: the digest of its files and options (data/sources/)
        write_source_digest(ds, digest_file, manifests=f"{root}/manifests/{name}", name=name)
    else:
        if dataset.is_dir():
            check_entry(cfg, dataset)
        if complete:
            write_dataset_digest(dataset, digest_file, manifest=f"{root}/manifests/{name}.json")
        elif digest_file.exists():
            digest_file.unlink()
    receipt = digests / "prepared.json"
    try:
        entry = json.loads(receipt.read_text(encoding="utf-8")).get("prepared")
    except (OSError, ValueError, AttributeError):
        entry = ""
    if receipt.exists() and not (entry and (Path(entry) / "meta.json").is_file()):
        receipt.unlink()
    cache = digests / "files.json"
    for model, spec in sorted(models.items()):
        content = model_content(model, spec, cache=cache)
        write_if_changed(digests / f"model_{model}.json",
                         json.dumps(content, indent=1, sort_keys=True) + "\n")


def check_entry(cfg: dict, dataset: Path) -> None:
    """The shared dataset entry `dataset` is what the config asks for (the generator's
    parameters, or the archive's checksum), before any run uses it; raise CnnvisError naming
    both when it is not. A `path:` dataset is the user's own directory: its shared entries
    (validated/, prepared/) are keyed by its content digest."""
    ds = cfg["dataset"]
    if ds.get("path"):
        return
    if "synth" in ds:
        s = ds["synth"] or {}
        check_synth(dataset, {"generator": "broden-synth", "images": int(s.get("images", 1000)),
                              "size": int(s.get("size", 64)), "seed": int(cfg.get("seed", 0))})
    else:
        check_recorded(dataset, resolve_source(dict(ds, name=dataset.name)))


def model_digest_file(digests_dir: str | Path, model: str) -> str:
    return f"{digests_dir}/model_{model}.json"
