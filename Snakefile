# GT-MoE: corpus -> tokenizer -> shards -> train x (variant, seed) -> evaluate -> statistics -> report.
# Thin on purpose: settings live in config.yaml, logic in the gtmoe / analysis packages,
# one stage per file in workflow/rules/. See README.md.
from snakemake.utils import min_version

min_version("9.0")

import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)
from gtmoe.config import ConfigError, load_yaml

# Snakemake renders a YTE template (`__use_yte__: true`: Python code in a config file) as it loads a config
# file: read config.yaml strictly first, which refuses it (a --configfile is loaded before this file runs:
# workflow/rules/common.smk stops the workflow then, before any job; docs/reliability.md).
if Path("config.yaml").exists():
    try:
        load_yaml(Path("config.yaml"))
    except ConfigError as exc:
        raise WorkflowError(f"invalid configuration: {exc}") from None


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
        REPORT,
        # Every benchmark file, so a deleted one is rebuilt (its job reruns): as an input of `compute` alone,
        # Snakemake (>= 7.7) would leave it missing under an up-to-date table.
        rules.compute.input.benchmarks,
