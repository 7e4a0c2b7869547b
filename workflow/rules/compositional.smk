# Compositional explanations (on when the config has a `compositional:` section): after a layer's
# tables, its units are split into `resources.shards` parts, or more when the resource plan
# finds a part too large for the memory limit (plan.smk, compositional_parts), one job each
# (formulas of concept masks by beam search), merged in unit order into
# results/{model}/{layer}/formulas.parquet; the part files are named part-parts.


rule compositional_shard:
    input:
        prepared=PREPARED,
        extracts=expand("results/{{model}}/extract/{shard}", shard=SHARDS),
        thresholds="results/{model}/{layer}/thresholds.parquet",
        units="results/{model}/{layer}/units.parquet",
    output:
        temp("results/{model}/compositional/{layer}/{part}-{parts}.parquet"),
    log:
        "results/logs/{model}/compositional_{layer}_{part}-{parts}.log",
    threads: lambda wc: shard_threads()
    resources:
        **planned("compositional_shard"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("dissection", "resources", "compositional"),
    shell:
        "{params.cnnvis} compositional --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layer {wildcards.layer:q} --extracts {input.extracts:q}"
        " --thresholds {input.thresholds:q} --shard {wildcards.part:q} --shards {wildcards.parts:q}"
        " --out {output:q} > {log:q} 2>&1"


rule layer_formulas:
    input:
        compositional_part_files,
    output:
        "results/{model}/{layer}/formulas.parquet",
    log:
        "results/logs/{model}/formulas_{layer}.log",
    params:
        cnnvis=CNNVIS,
    shell:
        "{params.cnnvis} formulas --parts {input:q} --out {output:q} > {log:q} 2>&1"
