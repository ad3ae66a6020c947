# GT-MoE: corpus -> tokenizer -> shards -> train x (variant, seed) -> evaluate -> statistics -> report.
# Thin on purpose: settings live in config.yaml, logic in the gtmoe / analysis packages,
# one stage per file in workflow/rules/. See README.md.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/baselines.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/targets.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        ANALYSIS_OUTPUTS,
