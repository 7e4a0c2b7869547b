# Dissection stage: train (synthnet), extract activations per shard, then per layer thresholds,
# tally and tables in one job, and the cross-model summary.
#
# The model check (every layer, unit and class-count problem at once): the check_model job
# before training a `train:` model; every extraction job runs it first on the model it built,
# so for the other models no extra job (and no extra torch start-up) sits before extraction.


rule check_model:
    input:
        prepared=PREPARED,
        checkpoint=given_checkpoint_input,
    output:
        "results/{model}/model_check.json",
    log:
        "results/logs/{model}/check.log",
    params:
        cnnvis=CNNVIS,
        spec=job_json("resources"),
    shell:
        "{params.cnnvis} check-model --prepared {input.prepared:q} --spec {params.spec:q}"
        " --out {output:q} > {log:q} 2>&1"


rule train_synthnet:
    input:
        prepared=PREPARED,
        check="results/{model}/model_check.json",
    output:
        "results/{model}/checkpoint.pt",
    log:
        "results/logs/{model}/train.log",
    params:
        cnnvis=CNNVIS,
        spec=job_json("resources"),
    shell:
        "CNNVIS_STATUS_FD=3 {params.cnnvis} train --prepared {input.prepared:q} --spec {params.spec:q}"
        " --out {output:q} 3>&2 > {log:q} 2>&1"


rule extract_shard:
    input:
        prepared=PREPARED,
        checkpoint=checkpoint_input,
    output:
        (
            directory("results/{model}/extract/{shard}")
            if config["resources"]["keep_activations"]
            else temp(directory("results/{model}/extract/{shard}"))
        ),
    log:
        "results/logs/{model}/extract_{shard}.log",
    threads: shard_threads()
    resources:
        **planned("extract_shard"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("dissection", "resources"),
        shards=len(SHARDS),
    shell:
        "CNNVIS_STATUS_FD=3 {params.cnnvis} extract --prepared {input.prepared:q} --spec {params.spec:q}"
        " --shard {wildcards.shard:q} --shards {params.shards:q} --out {output:q}"
        " 3>&2 > {log:q} 2>&1"


# A layer too large for one job (the plan's unit parts, common.smk `unit_parts`): one job per
# part of its units, each reading only its units' histograms, activations and maxima (tally,
# per-image records and significance of those units); layer_tables merges the parts.
rule layer_units:
    input:
        prepared=PREPARED,
        extracts=expand("results/{{model}}/extract/{shard}", shard=SHARDS),
    output:
        temp(unit_part_file("{model}", "{layer}", "{part}", "{parts}")),
    log:
        "results/logs/{model}/units_{layer}_{part}-{parts}.log",
    threads: lambda wc: layer_threads(wc.model)
    resources:
        **planned("layer_units"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("dissection", "resources"),
    shell:
        "CNNVIS_STATUS_FD=3 {params.cnnvis} layer-units --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layer {wildcards.layer:q} --extracts {input.extracts:q} --part {wildcards.part:q}"
        " --parts {wildcards.parts:q} --out {output:q} 3>&2 > {log:q} 2>&1"


# Thresholds, tally and tables of a layer in one job (`cnnvis tables --extracts`): the merged
# histograms of all shards give T_k, the layer's activations of every shard are tallied in shard
# order (the int64 sums equal per-shard tallies merged), the tables are written. One job per
# layer after the extractions: one process start-up and one read of the activations. A layer in
# unit parts: the same tables from its layer_units parts (`cnnvis tables --parts`).
rule layer_tables:
    input:
        prepared=PREPARED,
        layer=layer_tables_input,
    output:
        thresholds="results/{model}/{layer}/thresholds.parquet",
        iou="results/{model}/{layer}/iou.parquet",
        units="results/{model}/{layer}/units.parquet",
        top="results/{model}/{layer}/top_images.parquet",
        significance="results/{model}/{layer}/significance.parquet",
        sweep="results/{model}/{layer}/sweep.parquet",
        sweep_plot=report(
            "results/{model}/{layer}/sweep.png",
            caption="../report/sweep.rst",
            category="Dissection",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "layer": "{layer}",
                "figure": "detectors against the IoU threshold",
            },
        ),
        plot=report(
            "results/{model}/{layer}/detectors.png",
            caption="../report/detectors.rst",
            category="Dissection",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "layer": "{layer}",
                "figure": "detectors per concept",
            },
        ),
    log:
        "results/logs/{model}/tables_{layer}.log",
    threads: lambda wc: layer_threads(wc.model)
    resources:
        **planned("layer_tables"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("dissection", "resources"),
        source=lambda wc: (
            "--parts" if unit_parts(wc.model, wc.layer) > 1 else "--extracts"
        ),
    shell:
        "CNNVIS_STATUS_FD=3 {params.cnnvis} tables --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layers {wildcards.layer:q} {params.source:q} {input.layer:q}"
        " --out-dir results/{wildcards.model:q} 3>&2 > {log:q} 2>&1"


rule summary:
    input:
        units=layer_outputs("units.parquet"),
        prepared=PREPARED,
    output:
        table="results/summary/detectors.parquet",
        figure=report(
            "results/summary/unique_detectors.png",
            caption="../report/summary.rst",
            category="Summary",
            labels={"figure": "unique detectors per category"},
        ),
        series=[
            report(
                series_figure(name),
                caption="../report/series.rst",
                category="Summary",
                labels={"figure": f"detectors over training: {name}"},
            )
            for name in SERIES
        ],
    log:
        "results/logs/summary.log",
    params:
        cnnvis=CNNVIS,
        series=json.dumps(
            {
                name: {"models": models, "figure": series_figure(name)}
                for name, models in SERIES.items()
            },
            sort_keys=True,
        ),
    shell:
        "{params.cnnvis} summary --units {input.units:q} --prepared {input.prepared:q}"
        " --out {output.table:q} --figure {output.figure:q} --series {params.series:q}"
        " > {log:q} 2>&1"
