# Dissection stage: train (synthnet), extract activations per shard, thresholds per layer,
# tally per shard, tables per layer, and the cross-model summary.


rule train_synthnet:
    input:
        PREPARED,
    output:
        "results/{model}/checkpoint.pt",
    params:
        spec=spec_json,
    log:
        "results/logs/{model}/train.log",
    shell:
        "{CNNVIS} train --prepared {input} --spec {params.spec:q} --out {output} > {log} 2>&1"


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
    params:
        spec=spec_json,
        shards=len(SHARDS),
    log:
        "results/logs/{model}/extract_{shard}.log",
    shell:
        "{CNNVIS} extract --prepared {input.prepared} --spec {params.spec:q}"
        " --shard {wildcards.shard} --shards {params.shards} --out {output} > {log} 2>&1"


rule layer_thresholds:
    input:
        prepared=PREPARED,
        extracts=expand("results/{{model}}/extract/{shard}", shard=SHARDS),
    output:
        "results/{model}/{layer}/thresholds.parquet",
    params:
        spec=spec_json,
    log:
        "results/logs/{model}/thresholds_{layer}.log",
    shell:
        "{CNNVIS} thresholds --prepared {input.prepared} --spec {params.spec:q}"
        " --layers {wildcards.layer} --extracts {input.extracts}"
        " --out-dir results/{wildcards.model} > {log} 2>&1"


rule tally_shard:
    input:
        prepared=PREPARED,
        extract="results/{model}/extract/{shard}",
        thresholds=lambda wc: [
            f"results/{wc.model}/{layer}/thresholds.parquet" for layer in MODELS[wc.model]["layers"]
        ],
    output:
        "results/{model}/tally/{shard}.npz",
    params:
        spec=spec_json,
    log:
        "results/logs/{model}/tally_{shard}.log",
    shell:
        "{CNNVIS} tally --prepared {input.prepared} --spec {params.spec:q}"
        " --extract {input.extract} --out-dir results/{wildcards.model} --out {output} > {log} 2>&1"


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
            labels={"model": "{model}", "layer": "{layer}", "figure": "detectors per concept"},
        ),
    params:
        spec=spec_json,
    log:
        "results/logs/{model}/tables_{layer}.log",
    shell:
        "{CNNVIS} tables --prepared {input.prepared} --spec {params.spec:q}"
        " --layers {wildcards.layer} --tallies {input.tallies} --extracts {input.extracts}"
        " --out-dir results/{wildcards.model} > {log} 2>&1"


# Checkpoint series (`checkpoints: [...]` in a model's config): one figure of detectors over
# training per series, x = the checkpoint's index in the series.
SERIES = {}
for _model, _spec in MODELS.items():
    if _spec.get("series"):
        SERIES.setdefault(_spec["series"], []).append((_spec["series_index"], _model))
SERIES = {
    name: [m for _, m in sorted(members)] for name, members in sorted(SERIES.items())
}


def series_figure(name):
    return f"results/summary/series_{name}.png"


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
        series=json.dumps(
            {
                name: {"models": models, "figure": series_figure(name)}
                for name, models in SERIES.items()
            },
            sort_keys=True,
        ),
    shell:
        "{CNNVIS} summary --units {input} --out {output.table} --figure {output.figure}"
        " --series {params.series:q} > {log} 2>&1"
