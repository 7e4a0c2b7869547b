# Data stage: make or fetch the Broden-format dataset, validate it, prepare packed arrays.
#
# The dataset, its validation record and its prepared arrays are entries under data_root shared
# by every run (made under a lock each; one already complete for the same content is success).
# They are never a rule's output: the rules output small per-run files under results/digests/
# (a content digest, receipts), which Snakemake may remove when a job fails without touching
# the shared entries. common.smk refreshes the digest files at every start.

_ds = config["dataset"]
# A source read in place (ade20k, coco_panoptic, masks, concepts: data/sources/), and whether
# preparation goes through `cnnvis source-prepare` (those, or Broden with size/split/limit).
from cnnvis_pipeline.data.sources import (
    OPTIONS as _OPTIONS,
    source_kind as _source_kind,
)

_kind = _source_kind(_ds)
_by_source = bool(_kind) or any(_ds.get(k) is not None for k in _OPTIONS)
SOURCE_SPEC = json.dumps(_ds, sort_keys=True)

if "synth" in _ds:

    rule synth_dataset:
        output:
            DATASET_DIGEST,
        log:
            "results/logs/data/synth.log",
        params:
            cnnvis=CNNVIS,
            dataset=DATASET_DIR,
            manifest=MANIFEST,
            images=_ds["synth"]["images"],
            size=_ds["synth"]["size"],
            seed=config["seed"],
        shell:
            "{params.cnnvis} synth --out {params.dataset:q} --images {params.images:q}"
            " --size {params.size:q} --seed {params.seed:q} --digest-out {output:q}"
            " --manifest {params.manifest:q} > {log:q} 2>&1"

elif _ds.get("download") or _ds.get("url"):
    # The whole `dataset` mapping goes to `cnnvis download --spec` (mirror:, name:, checksums);
    # --name DATASET makes it write exactly DATASET_DIR = {data_root}/datasets/{DATASET}.
    # resolve_source checks the mapping now, so a missing checksum fails before any job runs.
    from cnnvis_pipeline.data.download import resolve_source

    try:
        resolve_source(dict(_ds, name=DATASET))
    except CnnvisError as e:
        raise WorkflowError(f"invalid configuration: {e}") from None

    rule download_dataset:
        output:
            DATASET_DIGEST,
        log:
            "results/logs/data/download.log",
        params:
            cnnvis=CNNVIS,
            spec=json.dumps(
                {
                    k: _ds[k]
                    for k in (
                        "download",
                        "url",
                        "mirror",
                        "sha256",
                        "md5",
                        "max_expansion",
                    )
                    if _ds.get(k)
                },
                sort_keys=True,
            ),
            root=f"{DATA_ROOT}/datasets",
            name=DATASET,
            manifest=MANIFEST,
        shell:
            "{params.cnnvis} download --data-root {params.root:q} --name {params.name:q} --spec {params.spec:q}"
            " --digest-out {output:q} --manifest {params.manifest:q} --quiet > {log:q} 2>&1"

elif _kind:

    # A source read in place: common.smk writes the digest of its files and options at start;
    # this runs only when it could not.
    rule source_digest:
        output:
            DATASET_DIGEST,
        log:
            "results/logs/data/digest.log",
        params:
            cnnvis=CNNVIS,
            spec=SOURCE_SPEC,
            manifests=f"{DATA_ROOT}/manifests/{DATASET}",
            name=DATASET,
        shell:
            "{params.cnnvis} source-digest --spec {params.spec:q} --out {output:q}"
            " --manifests {params.manifests:q} --name {params.name:q} > {log:q} 2>&1"

else:

    # A `path:` dataset: common.smk writes its digest at start; this runs only when it could not
    # (the directory is missing: the command says so).
    rule dataset_digest:
        output:
            DATASET_DIGEST,
        log:
            "results/logs/data/digest.log",
        params:
            cnnvis=CNNVIS,
            dataset=DATASET_DIR,
            manifest=MANIFEST,
        shell:
            "{params.cnnvis} digest --dataset {params.dataset:q} --out {output:q}"
            " --manifest {params.manifest:q} > {log:q} 2>&1"


if _kind:

    rule validate_dataset:
        input:
            DATASET_DIGEST,
        output:
            VALIDATED,
        log:
            "results/logs/data/validate.log",
        threads: data_threads()
        params:
            cnnvis=CNNVIS,
            spec=SOURCE_SPEC,
            root=DATA_ROOT,
            name=DATASET,
        shell:
            "{params.cnnvis} source-validate --spec {params.spec:q} --digest-file {input:q}"
            " --data-root {params.root:q} --name {params.name:q} --workers {threads:q}"
            " > {output:q} 2> {log:q} || (cat {output:q} >&2; rm -f {output:q}; exit 1)"

else:

    rule validate_dataset:
        input:
            DATASET_DIGEST,
        output:
            VALIDATED,
        log:
            "results/logs/data/validate.log",
        threads: data_threads()
        params:
            cnnvis=CNNVIS,
            dataset=DATASET_DIR,
            root=DATA_ROOT,
            name=DATASET,
        shell:
            "{params.cnnvis} validate {params.dataset:q} --digest-file {input:q} --data-root {params.root:q}"
            " --name {params.name:q} --workers {threads:q} > {output:q} 2> {log:q} || (cat {output:q} >&2; rm -f {output:q}; exit 1)"


# Every later job waits for the data stage, so its rules take all the cores (`--set-threads` or
# a profile's set-threads gives them some on a cluster, where the default is 1).
if _kind == "segmenter":

    # A segmentation model labels the images, a shard per job (on the GPU, like extraction);
    # the shards' labels are temporary: the prepared arrays keep them.
    rule segment_shard:
        input:
            digest=DATASET_DIGEST,
            validated=VALIDATED,
        output:
            temp(directory("results/segment/{shard}")),
        log:
            "results/logs/data/segment_{shard}.log",
        threads: shard_threads()
        resources:
            **planned("segment_shard"),
        params:
            cnnvis=CNNVIS,
            dataset=SOURCE_SPEC,
            shards=len(SHARDS),
            device=config["resources"]["device"],
            batch=config["resources"]["batch_size"],
        shell:
            "{params.cnnvis} segment --dataset {params.dataset:q} --shard {wildcards.shard:q}"
            " --shards {params.shards:q} --device {params.device:q} --batch-size {params.batch:q}"
            " --out {output:q} > {log:q} 2>&1"


if _by_source:
    # A source (or a Broden directory with size/split/limit): `cnnvis source-prepare` reads the
    # whole `dataset` mapping; a Broden directory is passed as --directory ("" for a source),
    # a segmenter's labels as --predictions (none for the others).

    rule prepare_dataset:
        input:
            digest=DATASET_DIGEST,
            validated=VALIDATED,
            predictions=(
                expand("results/segment/{shard}", shard=SHARDS)
                if _kind == "segmenter"
                else []
            ),
        output:
            PREPARED,
        log:
            "results/logs/data/prepare.log",
        threads: data_threads()
        params:
            cnnvis=CNNVIS,
            spec=SOURCE_SPEC,
            directory=DATASET_DIR,
            root=DATA_ROOT,
            name=DATASET,
        shell:
            "{params.cnnvis} source-prepare --spec {params.spec:q} --directory={params.directory:q}"
            " --digest-file {input.digest:q} --data-root {params.root:q} --name {params.name:q}"
            " --receipt {output:q} --workers {threads:q} --predictions {input.predictions:q}"
            " --quiet > {log:q} 2>&1"

else:

    rule prepare_dataset:
        input:
            digest=DATASET_DIGEST,
            validated=VALIDATED,
        output:
            PREPARED,
        log:
            "results/logs/data/prepare.log",
        threads: data_threads()
        params:
            cnnvis=CNNVIS,
            dataset=DATASET_DIR,
            root=DATA_ROOT,
            name=DATASET,
        shell:
            "{params.cnnvis} prepare --dataset {params.dataset:q} --digest-file {input.digest:q}"
            " --data-root {params.root:q} --name {params.name:q} --receipt {output:q}"
            " --workers {threads:q} > {log:q} 2>&1"
