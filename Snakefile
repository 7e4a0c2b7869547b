# cnnvis-pipeline: Network Dissection and unit visualisation of CNNs at dataset scale.
#
#   snakemake --cores 2                          # the embedded default (config/config.yaml)
#   snakemake --cores 8 --configfile my.yaml     # your dataset and models
#   snakemake -s path/to/Snakefile --directory /scratch/run --cores 8 --configfile my.yaml
#
# Stages (one rule file each): data -> dissect (-> compositional, interventions) -> viz ->
# report; every rule is one command of `cnnvis`.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

CNNVIS_ROOT = Path(workflow.basedir)


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/dissect.smk"
include: "workflow/rules/compositional.smk"
include: "workflow/rules/interventions.smk"
include: "workflow/rules/viz.smk"
include: "workflow/rules/report.smk"


refresh_digests()


rule all:
    default_target: True
    input:
        all_targets(),
        compositional_targets(),
        ablation_targets(),
        adversarial_targets(),
