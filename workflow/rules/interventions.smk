# Interventions (workflow/rules/interventions.smk), each on with its config section:
# `ablation:` per (model, layer) the change of every class's score when each unit (and each
# concept's top detectors) is zeroed -> results/{model}/{layer}/ablation.parquet|png;
# `adversarial:` per (model, layer) FGSM/PGD on the dissection images, each unit's activation
# and IoU with its label clean and attacked -> adversarial.parquet, adversarial_concepts.parquet,
# adversarial.png. Both read the layer's dissection tables (cnnvis_pipeline.interventions).


def ablation_models():
    if config.get("ablation") is None:
        return []
    try:
        a = cs.Ablation.parse(config["ablation"], config.get("seed", 0))
        unknown = sorted(set(a.models or {}) - set(MODELS))
        if unknown:
            raise CnnvisError(f"config: ablation.models: {unknown} are not among the models")
        return [m for m in MODELS if a.data_for(model_spec(m)) is not None]
    except CnnvisError as e:
        raise WorkflowError(f"invalid configuration: {e}") from None


def adversarial_models():
    if config.get("adversarial") is None:
        return []
    a = cs.Adversarial.parse(config["adversarial"], config.get("seed", 0))
    unknown = sorted(set(a.models or ()) - set(MODELS))
    if unknown:
        raise WorkflowError(
            f"invalid configuration: config: adversarial.models: {unknown} are not among the models"
        )
    return [m for m in MODELS if a.applies_to(model_spec(m))]


def _model_layer_files(models, names):
    return [
        f"results/{model}/{layer}/{name}"
        for model in models
        for layer in MODELS[model]["layers"]
        for name in names
    ]


def ablation_targets():
    return _model_layer_files(ablation_models(), ["ablation.parquet", "ablation.png"])


def adversarial_targets():
    return _model_layer_files(
        adversarial_models(),
        ["adversarial.parquet", "adversarial_concepts.parquet", "adversarial.png"],
    )


def ablation_class_index(wildcards):
    """The class-index file of a model's ImageFolder data (its content is an input)."""
    models = (config.get("ablation") or {}).get("models") or {}
    classes = (models.get(wildcards.model) or {}).get("classes")
    return [classes] if classes else []


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
    params:
        cnnvis=CNNVIS,
        spec=job_json("adversarial", "resources", "dissection"),
    shell:
        "{params.cnnvis} attack --prepared {input.prepared:q} --spec {params.spec:q}"
        " --layer {wildcards.layer:q} --layer-dir results/{wildcards.model:q}/{wildcards.layer:q}"
        " --threads {threads:q} > {log:q} 2>&1"
