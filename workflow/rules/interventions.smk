# Interventions (workflow/rules/interventions.smk), each on with its config section:
# `ablation:` per (model, layer) the change of every class's score when each unit (and each
# concept's top detectors) is zeroed -> results/{model}/{layer}/ablation.parquet|png;
# `adversarial:` per (model, layer) FGSM/PGD on the dissection images, each unit's activation
# and IoU with its label clean and attacked -> adversarial.parquet, adversarial_concepts.parquet,
# adversarial.png. Both read the layer's dissection tables (cnnvis_pipeline.interventions).


rule ablation_layer:
    input:
        prepared=PREPARED,
        checkpoint=checkpoint_input,
        units="results/{model}/{layer}/units.parquet",
        classes=ablation_class_index,
    output:
        table="results/{model}/{layer}/ablation.parquet",
        figure="results/{model}/{layer}/ablation.png",
    log:
        "results/logs/{model}/ablation_{layer}.log",
    threads: lambda wc: layer_threads(wc.model)
    resources:
        **planned("ablation_layer"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("ablation", "resources", "dissection"),
    shell:
        "{params.cnnvis} ablate --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layer {wildcards.layer:q} --layer-dir results/{wildcards.model:q}/{wildcards.layer:q}"
        " --threads {threads:q} > {log:q} 2>&1"


rule adversarial_layer:
    input:
        prepared=PREPARED,
        checkpoint=checkpoint_input,
        units="results/{model}/{layer}/units.parquet",
        thresholds="results/{model}/{layer}/thresholds.parquet",
    output:
        table="results/{model}/{layer}/adversarial.parquet",
        concepts="results/{model}/{layer}/adversarial_concepts.parquet",
        figure="results/{model}/{layer}/adversarial.png",
    log:
        "results/logs/{model}/adversarial_{layer}.log",
    threads: lambda wc: layer_threads(wc.model)
    resources:
        **planned("adversarial_layer"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("adversarial", "resources", "dissection"),
    shell:
        "{params.cnnvis} attack --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layer {wildcards.layer:q} --layer-dir results/{wildcards.model:q}/{wildcards.layer:q}"
        " --threads {threads:q} > {log:q} 2>&1"
