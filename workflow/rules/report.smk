# Report stage: one self-contained HTML report per model (from the dissection tables and the
# visualise stage's images, workflow/rules/viz.smk), and the summary page linking them all.


rule model_report:
    input:
        prepared=PREPARED,
        units=lambda wc: [
            f"results/{wc.model}/{layer}/units.parquet"
            for layer in MODELS[wc.model]["layers"]
        ],
        iou=lambda wc: [
            f"results/{wc.model}/{layer}/iou.parquet"
            for layer in MODELS[wc.model]["layers"]
        ],
        detectors=lambda wc: [
            f"results/{wc.model}/{layer}/detectors.png"
            for layer in MODELS[wc.model]["layers"]
        ],
        viz=lambda wc: [
            f"results/{wc.model}/{layer}/viz" for layer in MODELS[wc.model]["layers"]
        ],
        am=lambda wc: [
            f"results/{wc.model}/{layer}/activation_max.parquet"
            for layer in MODELS[wc.model]["layers"]
        ],
        inversion=lambda wc: [
            f"results/{wc.model}/{layer}/inversion.parquet"
            for layer in MODELS[wc.model]["layers"]
        ],
        formulas=formulas_input,
        # the model's ablation and adversarial tables and figures, when configured
        interventions=lambda wc: [
            f
            for f in ablation_targets() + adversarial_targets()
            if f.startswith(f"results/{wc.model}/")
        ],
    output:
        html=report(
            "results/{model}/report/index.html",
            caption="../report/model_report.rst",
            category="Reports",
            labels={"model": "{model}", "page": "unit visualisations"},
        ),
        iou=report(
            "results/{model}/report/iou_distribution.png",
            caption="../report/iou_distribution.rst",
            category="Dissection",
            subcategory="{model}",
            labels={"model": "{model}", "layer": "all", "figure": "IoU per category"},
        ),
    log:
        "results/logs/{model}/report.log",
    params:
        cnnvis=CNNVIS,
        layers=lambda wc: MODELS[wc.model]["layers"],
        spec=job_json("report"),
        dataset=DATASET,
    shell:
        "{params.cnnvis} report --model {wildcards.model:q} --results results/{wildcards.model:q}"
        " --layers {params.layers:q} --out {output.html:q} --iou-figure {output.iou:q}"
        " --spec {params.spec:q} --summary-page results/summary/index.html"
        " --prepared {input.prepared:q} --dataset-name {params.dataset:q} > {log:q} 2>&1"


rule summary_page:
    input:
        reports=expand("results/{model}/report/index.html", model=MODELS),
        table="results/summary/detectors.parquet",
        figure="results/summary/unique_detectors.png",
        series=[series_figure(name) for name in SERIES],
        prepared=PREPARED,
        units=layer_outputs("units.parquet"),
        formulas=compositional_targets(),
        interventions=ablation_targets() + adversarial_targets(),
    output:
        report(
            "results/summary/index.html",
            caption="../report/summary_page.rst",
            category="Summary",
            labels={"figure": "summary page"},
        ),
    log:
        "results/logs/summary_page.log",
    params:
        cnnvis=CNNVIS,
        reports=[f"{m}=results/{m}/report/index.html" for m in MODELS],
        series=[f"{name}={series_figure(name)}" for name in SERIES],
        dataset=DATASET,
    shell:
        "{params.cnnvis} summary-page --reports {params.reports:q} --detectors {input.table:q}"
        " --figure {input.figure:q} --series {params.series:q} --prepared {input.prepared:q}"
        " --dataset-name {params.dataset:q}"
        " --units {input.units:q} --formulas {input.formulas:q} --out {output:q}"
        " > {log:q} 2>&1"
