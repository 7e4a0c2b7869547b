# Visualise stage: per (model, layer) unit visualisations (a GPU rule): top images with masks,
# activation maximisation, DeconvNet and inversion (cnnvis_pipeline.viz).


rule visualize_layer:
    input:
        prepared=PREPARED,
        checkpoint=checkpoint_input,
        units="results/{model}/{layer}/units.parquet",
        top="results/{model}/{layer}/top_images.parquet",
        thresholds="results/{model}/{layer}/thresholds.parquet",
    output:
        viz=directory("results/{model}/{layer}/viz"),
        am="results/{model}/{layer}/activation_max.parquet",
        inversion="results/{model}/{layer}/inversion.parquet",
    log:
        "results/logs/{model}/visualize_{layer}.log",
    threads: int(config["resources"]["threads"])
    resources:
        **planned("visualize_layer"),
    params:
        cnnvis=CNNVIS,
        spec=job_json("views", "resources"),
    shell:
        "CNNVIS_STATUS_FD=3 {params.cnnvis} visualize --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layer {wildcards.layer:q} --layer-dir results/{wildcards.model:q}/{wildcards.layer:q}"
        " --threads {threads:q} 3>&2 > {log:q} 2>&1"
