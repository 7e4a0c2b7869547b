# Data stage: make or fetch the Broden-format dataset, validate it, prepare packed arrays.

_ds = config["dataset"]

if "synth" in _ds:

    rule synth_dataset:
        output:
            directory(DATASET_DIR),
        log:
            f"{DATA_ROOT}/logs/synth_{DATASET}.log",
        params:
            cnnvis=CNNVIS,
            images=_ds["synth"]["images"],
            size=_ds["synth"]["size"],
            seed=_ds["synth"]["seed"],
        shell:
            "{params.cnnvis} synth --out {output:q} --images {params.images:q} --size {params.size:q}"
            " --seed {params.seed:q} > {log:q} 2>&1"

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
            directory(DATASET_DIR),
        log:
            f"{DATA_ROOT}/logs/download_{DATASET}.log",
        params:
            cnnvis=CNNVIS,
            spec=json.dumps(
                {
                    k: _ds[k]
                    for k in ("download", "url", "mirror", "sha256", "md5")
                    if _ds.get(k)
                },
                sort_keys=True,
            ),
            root=f"{DATA_ROOT}/datasets",
        shell:
            "{params.cnnvis} download --data-root {params.root:q} --name {DATASET:q} --spec {params.spec:q}"
            " --quiet > {log:q} 2>&1"


rule validate_dataset:
    input:
        DATASET_DIR,
    output:
        f"{DATA_ROOT}/validated/{DATASET}.txt",
    log:
        f"{DATA_ROOT}/logs/validate_{DATASET}.log",
    params:
        cnnvis=CNNVIS,
    shell:
        "{params.cnnvis} validate {input:q} > {output:q} 2> {log:q} || (cat {output:q} >&2; rm -f {output:q}; exit 1)"


rule prepare_dataset:
    input:
        dataset=DATASET_DIR,
        validated=rules.validate_dataset.output,
    output:
        directory(PREPARED),
    log:
        f"{DATA_ROOT}/logs/prepare_{DATASET}.log",
    params:
        cnnvis=CNNVIS,
    shell:
        "{params.cnnvis} prepare --dataset {input.dataset:q} --out {output:q} > {log:q} 2>&1"
