# Compositional explanations (on when the config has a `compositional:` section): after a layer's
# tables, its units are split into `resources.shards` parts, one job each (formulas of concept
# masks by beam search), merged in unit order into results/{model}/{layer}/formulas.parquet.


rule compositional_shard:
    input:
        prepared=PREPARED,
        extracts=expand("results/{{model}}/extract/{shard}", shard=SHARDS),
        thresholds="results/{model}/{layer}/thresholds.parquet",
        units="results/{model}/{layer}/units.parquet",
    output:
        temp("results/{model}/compositional/{layer}/{part}.parquet"),
    log:
        "results/logs/{model}/compositional_{layer}_{part}.log",
    threads: lambda wc: shard_threads()
    resources:
        **planned("compositional_shard"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("dissection", "resources", "compositional"),
        parts=len(SHARDS),
    shell:
        "{params.cnnvis} compositional --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layer {wildcards.layer:q} --extracts {input.extracts:q}"
        " --thresholds {input.thresholds:q} --shard {wildcards.part:q} --shards {params.parts:q}"
        " --out {output:q} > {log:q} 2>&1"


rule layer_formulas:
    input:
        expand("results/{{model}}/compositional/{{layer}}/{part}.parquet", part=SHARDS),
    output:
        "results/{model}/{layer}/formulas.parquet",
    log:
        "results/logs/{model}/formulas_{layer}.log",
    params:
        cnnvis=CNNVIS,
    shell:
        "{params.cnnvis} formulas --parts {input:q} --out {output:q} > {log:q} 2>&1"
