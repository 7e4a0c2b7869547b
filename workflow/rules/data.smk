# Data stage: make or fetch the Broden-format dataset, validate it, prepare packed arrays.

_ds = config["dataset"]

if "synth" in _ds:

    rule synth_dataset:
        output:
            directory(DATASET_DIR),
        params:
            images=_ds["synth"]["images"],
            size=_ds["synth"]["size"],
            seed=_ds["synth"]["seed"],
        log:
            f"{DATA_ROOT}/logs/synth_{DATASET}.log",
        shell:
            "{CNNVIS} synth --out {output} --images {params.images} --size {params.size}"
            " --seed {params.seed} > {log} 2>&1"

elif _ds.get("download") or _ds.get("url"):

    rule download_dataset:
        output:
            directory(DATASET_DIR),
        params:
            source=(
                f"--name {_ds['download']}"
                if _ds.get("download") and not _ds.get("url")
                else f"--url {_ds['url']} "
                + (f"--sha256 {_ds['sha256']}" if _ds.get("sha256") else f"--md5 {_ds.get('md5')}")
                + f" --name {DATASET}"
            ),
            root=f"{DATA_ROOT}/datasets",
        log:
            f"{DATA_ROOT}/logs/download_{DATASET}.log",
        shell:
            "{CNNVIS} download --data-root {params.root} {params.source} > {log} 2>&1"


rule validate_dataset:
    input:
        DATASET_DIR,
    output:
        f"{DATA_ROOT}/validated/{DATASET}.txt",
    log:
        f"{DATA_ROOT}/logs/validate_{DATASET}.log",
    shell:
        "{CNNVIS} validate {input} > {output} 2> {log} || (cat {output} >&2; rm -f {output}; exit 1)"


rule prepare_dataset:
    input:
        dataset=DATASET_DIR,
        validated=rules.validate_dataset.output,
    output:
        directory(PREPARED),
    log:
        f"{DATA_ROOT}/logs/prepare_{DATASET}.log",
    shell:
        "{CNNVIS} prepare --dataset {input.dataset} --out {output} > {log} 2>&1"
