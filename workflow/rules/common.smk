# Python helpers of the workflow: the merged and validated config, model specs, paths.
import json
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.utils import validate

from cnnvis_pipeline import config as cc
from cnnvis_pipeline import joblogs, runlock
from cnnvis_pipeline import settings as cs
from cnnvis_pipeline.data import digests
from cnnvis_pipeline.errors import CnnvisError, check_size
from cnnvis_pipeline.fileio import error_line, write_error, write_text
from cnnvis_pipeline.interventions import targets as itargets
from cnnvis_pipeline.models import precheck

# `dataset` and `models` of a user's --configfile replace the default's entirely; the other
# sections are merged key by key (Snakemake's own merge would mix datasets and models).
with open(CNNVIS_ROOT / "config" / "config.yaml") as _f:
    _default_config = yaml.safe_load(_f)
try:  # bounded before anything copies, validates or serialises it (YAML aliases are shared)
    check_size(config)
except CnnvisError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None
_merged = cc.merge_with_default(dict(config), _default_config)
config.clear()
config.update(_merged)
try:  # one short line naming the bad key (Snakemake's own message prints the whole schema)
    cc.check_schema(config, CNNVIS_ROOT / "workflow" / "schemas" / "config.schema.yaml")
except CnnvisError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None
validate(config, str(CNNVIS_ROOT / "workflow" / "schemas" / "config.schema.yaml"))

try:
    MODELS = cc.model_specs(config)
    DATASET = cc.dataset_name(config)
except CnnvisError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None


def check_writable(where="results"):
    """A read-only, full or forbidden results/ is one line at start, before anything writes
    there (the plan, the digest files): a probe file is written and removed (and results/ too
    when the probe made it, so that a config refused later leaves nothing behind)."""
    import os

    if not workflow.is_main_process:
        return
    probe = f"{where}/.cnnvis-probe-{os.getpid()}"
    made = not os.path.exists(where)
    try:
        write_text(probe, "")
        os.unlink(probe)
        if made:
            os.rmdir(where)
    except OSError as e:
        line = error_line(write_error(e, where) or e)
        if line is None:
            raise
        raise WorkflowError(f"cannot write the run's files: {line}") from None


check_writable()

# The model check at parse time (cnnvis_pipeline.models.precheck): the layers, units and weights
# names of every synthnet and torchvision entry, on the architecture without its weights. Only
# in the main process (cluster jobs re-read the Snakefile); torch is imported only when such a
# model is configured and no check passed for the same entries, versions and code (the key of
# the last pass is kept in .snakemake/cnnvis/, a cache). A factory model is checked by its jobs.
_CHECKS = precheck.parse_time_entries(config, MODELS)
_CHECK_PASSED = Path(".snakemake/cnnvis/parse_check.key")
if workflow.is_main_process and _CHECKS:
    _key = precheck.check_key(_CHECKS)
    if not (_CHECK_PASSED.is_file() and _CHECK_PASSED.read_text() == _key):
        from cnnvis_pipeline.fileio import write_text
        from cnnvis_pipeline.models.check import check_architectures

        try:
            check_architectures(_CHECKS)
        except CnnvisError as e:
            raise WorkflowError(f"invalid configuration: {e}") from None
        _CHECK_PASSED.parent.mkdir(parents=True, exist_ok=True)
        write_text(_CHECK_PASSED, _key)

# Quoted once here; every other value reaches the shell through `:q` in the rules.
CNNVIS = shlex.join([sys.executable, "-m", "cnnvis_pipeline"])
DATA_ROOT = config["data_root"]
DATASET_DIR = cc.dataset_source_dir(config)
# Per-run digest files and receipts (data.smk): what Snakemake compares instead of the shared
# entries under data_root. PREPARED is the receipt every `--prepared` option accepts.
DIGESTS = "results/digests"
DATASET_DIGEST = f"{DIGESTS}/dataset.json"
VALIDATED = f"{DIGESTS}/validated.txt"
PREPARED = f"{DIGESTS}/prepared.json"
MANIFEST = f"{DATA_ROOT}/manifests/{DATASET}.json"
SHARDS = list(range(int(config["resources"]["shards"])))
LAYERS = sorted({layer for spec in MODELS.values() for layer in spec["layers"]})


def refresh_digests():
    """Content, not mtimes: the dataset's files, each checkpoint and each factory module's
    source are digested at every start, after every config check (the Snakefile calls this
    once all rules are read; only in the main process: cluster jobs re-read the Snakefile).
    """
    if not workflow.is_main_process:
        return
    try:
        digests.refresh_digests(config, MODELS, DIGESTS)
    except CnnvisError as e:
        raise WorkflowError(f"invalid configuration: {e}") from None
    except OSError as e:  # a read-only, full or forbidden results/ (or data root)
        line = error_line(e)
        if line is None:
            raise
        raise WorkflowError(f"cannot write the run's files: {line}") from None


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),
    layer="|".join(re.escape(layer) for layer in LAYERS),
    shard=r"\d+",
    part=r"\d+",
    parts=r"\d+",


# Checkpoint series (`checkpoints: [...]` in a model's config): one figure of detectors over
# training per series, x = the checkpoint's index in the series.
SERIES = {}
for _model, _spec in MODELS.items():
    if _spec.get("series"):
        SERIES.setdefault(_spec["series"], []).append((_spec["series_index"], _model))
SERIES = {
    name: [m for _, m in sorted(members)] for name, members in sorted(SERIES.items())
}


# CPU threads of a job (Snakemake sets OMP_NUM_THREADS to it; 1 when a job asks for none): the
# shards of a model's extraction, and a model's layer jobs, share the cores between them.
def _cores():
    try:
        return int(workflow.cores)
    except WorkflowError:
        # no --cores (a cluster executor): one thread, as for the other rules
        return 1


def data_threads():
    return _cores()


def shard_threads():
    return max(1, _cores() // len(SHARDS))


def layer_threads(model):
    return max(1, _cores() // len(MODELS[model]["layers"]))


def series_figure(name):
    return f"results/summary/series_{name}.png"


def trained_checkpoint(model):
    return f"results/{model}/checkpoint.pt"


def model_spec(model):
    """The resolved model entry of one model, with its name (and its trained checkpoint)."""
    spec = dict(MODELS[model], name=model)
    if spec.get("train"):
        spec["checkpoint"] = trained_checkpoint(model)
    return spec


def job_json(*sections):
    """A rule's `--spec` (cnnvis_pipeline.settings.Job): the model entry, the run's seed and
    only the config sections its stage reads, so that a job's command line (and so its rerun
    trigger) changes only with what it reads."""

    def spec(wildcards):
        return json.dumps(
            cs.job_spec(model_spec(wildcards.model), config, sections), sort_keys=True
        )

    return spec


def checkpoint_input(wildcards):
    """The trained checkpoint (a workflow output) and the model's digest file (checkpoint
    sha256 and factory source: a user's checkpoint is compared by content, not mtime).
    """
    spec = model_spec(wildcards.model)
    trained = [spec["checkpoint"]] if spec.get("train") else []
    return trained + [digests.model_digest_file(DIGESTS, wildcards.model)]


def given_checkpoint_input(wildcards):
    """The model check loads the user's checkpoint (a trained one does not exist yet): its
    input is the model's digest file, which changes with the checkpoint's content (sha256) and
    the factory's source, not with their mtimes."""
    return [digests.model_digest_file(DIGESTS, wildcards.model)]


def layer_outputs(name):
    return [
        f"results/{model}/{layer}/{name}"
        for model, spec in MODELS.items()
        for layer in spec["layers"]
    ]


def model_layer_targets(model):
    return [
        f"results/{model}/{layer}/units.parquet" for layer in MODELS[model]["layers"]
    ]


def all_targets():
    return (
        layer_outputs("iou.parquet")
        + layer_outputs("units.parquet")
        + layer_outputs("detectors.png")
        + ["results/summary/detectors.parquet", "results/summary/unique_detectors.png"]
        + [f"results/{model}/report/index.html" for model in MODELS]
        + ["results/summary/index.html"]
    )


# Whose is a Snakemake lock found at start: a run still going, or one that was killed
# (cnnvis_pipeline.runlock; onstart records the run that holds the lock).
if workflow.is_main_process and "--unlock" not in sys.argv:
    _note = runlock.lock_note()
    if _note:
        print(_note, file=sys.stderr)


onstart:
    runlock.record_run()


onsuccess:
    runlock.forget_run()


# Interventions (workflow/rules/interventions.smk): on with their config sections.
def _layer_files(models, names):
    return [
        f"results/{model}/{layer}/{name}"
        for model in models
        for layer in MODELS[model]["layers"]
        for name in names
    ]


def _intervention_models(which):
    try:
        return which(config, MODELS, model_spec)
    except CnnvisError as e:
        raise WorkflowError(f"invalid configuration: {e}") from None


def ablation_targets():
    return _layer_files(
        _intervention_models(itargets.ablation_models),
        ["ablation.parquet", "ablation.png"],
    )


def adversarial_targets():
    return _layer_files(
        _intervention_models(itargets.adversarial_models),
        ["adversarial.parquet", "adversarial_concepts.parquet", "adversarial.png"],
    )


def ablation_class_index(wildcards):
    return itargets.class_index(config, wildcards.model)


# Compositional explanations (workflow/rules/compositional.smk): on with a `compositional:` section.
def compositional_on():
    return config.get("compositional") is not None


def compositional_targets():
    return layer_outputs("formulas.parquet") if compositional_on() else []


def formulas_input(wildcards):
    if not compositional_on():
        return []
    return [
        f"results/{wildcards.model}/{layer}/formulas.parquet"
        for layer in MODELS[wildcards.model]["layers"]
    ]


onerror:
    runlock.forget_run()
    for _line in joblogs.failed_job_errors(log):
        print(_line, file=sys.stderr)
