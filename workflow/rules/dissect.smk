# Dissection stage: train (synthnet), extract activations per shard, thresholds per layer,
# tally per shard, tables per layer, and the cross-model summary.


rule train_synthnet:
    input:
        PREPARED,
    output:
        "results/{model}/checkpoint.pt",
    log:
        "results/logs/{model}/train.log",
    params:
        cnnvis=CNNVIS,
        spec=spec_json,
    shell:
        "{params.cnnvis} train --prepared {input:q} --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"


rule extract_shard:
    input:
        prepared=PREPARED,
        checkpoint=checkpoint_input,
    output:
        (
            directory("results/{model}/extract/{shard}")
            if config["dissection"]["keep_activations"]
            else temp(directory("results/{model}/extract/{shard}"))
        ),
    log:
        "results/logs/{model}/extract_{shard}.log",
    params:
        cnnvis=CNNVIS,
        spec=spec_json,
        shards=len(SHARDS),
    shell:
        "{params.cnnvis} extract --prepared {input.prepared:q} --spec {params.spec:q}"
        " --shard {wildcards.shard:q} --shards {params.shards:q} --out {output:q} > {log:q} 2>&1"


rule layer_thresholds:
    input:
        prepared=PREPARED,
        extracts=expand("results/{{model}}/extract/{shard}", shard=SHARDS),
    output:
        "results/{model}/{layer}/thresholds.parquet",
    log:
        "results/logs/{model}/thresholds_{layer}.log",
    params:
        cnnvis=CNNVIS,
        spec=spec_json,
    shell:
        "{params.cnnvis} thresholds --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layers {wildcards.layer:q} --extracts {input.extracts:q}"
        " --out-dir results/{wildcards.model:q} > {log:q} 2>&1"


rule tally_shard:
    input:
        prepared=PREPARED,
        extract="results/{model}/extract/{shard}",
        thresholds=lambda wc: [
            f"results/{wc.model}/{layer}/thresholds.parquet"
            for layer in MODELS[wc.model]["layers"]
        ],
    output:
        "results/{model}/tally/{shard}.npz",
    log:
        "results/logs/{model}/tally_{shard}.log",
    params:
        cnnvis=CNNVIS,
        spec=spec_json,
    shell:
        "{params.cnnvis} tally --prepared {input.prepared:q} --spec {params.spec:q}"
        " --extract {input.extract:q} --out-dir results/{wildcards.model:q} --out {output:q} > {log:q} 2>&1"


rule layer_tables:
    input:
        prepared=PREPARED,
        tallies=expand("results/{{model}}/tally/{shard}.npz", shard=SHARDS),
        extracts=expand("results/{{model}}/extract/{shard}", shard=SHARDS),
        thresholds="results/{model}/{layer}/thresholds.parquet",
    output:
        iou="results/{model}/{layer}/iou.parquet",
        units="results/{model}/{layer}/units.parquet",
        top="results/{model}/{layer}/top_images.parquet",
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
    params:
        cnnvis=CNNVIS,
        spec=spec_json,
    shell:
        "{params.cnnvis} tables --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layers {wildcards.layer:q} --tallies {input.tallies:q} --extracts {input.extracts:q}"
        " --out-dir results/{wildcards.model:q} > {log:q} 2>&1"


rule summary:
    input:
        layer_outputs("units.parquet"),
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
        "{params.cnnvis} summary --units {input:q} --out {output.table:q} --figure {output.figure:q}"
        " --series {params.series:q} > {log:q} 2>&1"
