# Config validation (schema, then gtmoe's typed checks) into the one study record, and the paths every stage shares.
import functools
import json
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # import gtmoe from this checkout even when it is not installed

from gtmoe.config import ConfigError, load_yaml
from gtmoe.study import Study, corpus_problem, write_record
from gtmoe import contract
from analysis import outputs
from gtmoe.data import tokenizer_problem

# Snakemake parsed the config files leniently (a duplicate key: the last wins; aliases expand once walked).
# Read each again strictly before anything walks the values: duplicate keys, anchors/aliases, oversized files.
for _configfile in workflow.configfiles:
    try:
        load_yaml(Path(_configfile))
    except ConfigError as exc:
        raise WorkflowError(f"invalid configuration: {exc}") from None

validate(config, "../schemas/config.schema.yaml")

SPLITS = list(contract.SPLITS)
EVAL_SPLITS = list(contract.EVAL_SPLITS)
CONDA_ENV = "../envs/gtmoe.yaml"


# Jobs' `python` is the interpreter running Snakemake (its venv), also when started by absolute path.
envvars:
    "PATH",


os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

try:
    STUDY = Study.from_config(config)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None
if problem := corpus_problem(config["data"], workflow.basedir):
    raise WorkflowError(f"invalid configuration: {problem}")

# Every path of the study, under its own root results/<name>/ (gtmoe.contract.StudyLayout).
LAYOUT = STUDY.layout
STUDY_RECORD = LAYOUT.record
DATA = LAYOUT.data
SHARDS = LAYOUT.shards
NGRAM = LAYOUT.baselines
RUN = LAYOUT.run_dir("{variant}", "{seed}")
SUMMARY = LAYOUT.summary
FIGURES = LAYOUT.figures
LOGS = LAYOUT.logs
BENCHMARKS = LAYOUT.benchmarks
REPORT = LAYOUT.report

# Before any job: a corrupt tokenizer newer than the shards would make Snakemake delete them first.
if problem := tokenizer_problem(LAYOUT.tokenizer):
    raise WorkflowError(problem)
# The resolved study: what every job and the analysis read. Rewritten only when its content changes.
write_record(STUDY)
RECORD = STUDY.record()

VARIANTS = STUDY.variant_names
SEEDS = STUDY.seeds
SWEEPS = STUDY.sweeps  # sweep name -> its variants (gtmoe.sweeps)


wildcard_constraints:
    variant="|".join(map(re.escape, VARIANTS)),  # sweep points hold '.' and '-'
    seed=r"\d+",
    split="|".join(SPLITS),


def run_dirs(variants=VARIANTS):
    return [RUN.format(variant=v, seed=s) for v in variants for s in SEEDS]


def run_files(name, variants=VARIANTS):
    return [f"{d}/{name}" for d in run_dirs(variants)]


def eval_files(variants=VARIANTS):
    return [f"{d}/{contract.eval_file(split)}" for d in run_dirs(variants) for split in EVAL_SPLITS]


def study_benchmarks():
    """The benchmark file of every job that runs before the `compute` rule (called after all rules are
    defined; `compute`'s own benchmark and the report are not counted)."""
    grid = dict(variant=VARIANTS, seed=SEEDS, split=EVAL_SPLITS)  # each rule takes the wildcards it has
    files = [
        str(rules.corpus.benchmark),
        str(rules.tokenizer.benchmark),
        *expand(str(rules.shards.benchmark), split=SPLITS),
    ]
    for name in (
        "ngram_baselines",
        "train",
        "evaluate",
        "aggregate",
        "statistics",
        "figures",
        "findings",
        "sensitivity",
    ):
        if rules.has(name):
            files += expand(str(getattr(rules, name).benchmark), **grid)
    return list(dict.fromkeys(files))


def job(stage, key, default=None):
    """A resource of one stage from config['resources'] (per preset)."""
    return config["resources"].get(stage, {}).get(key, default)


def captioned(path, caption, category, subcategory=None, **labels):
    """An output that appears in report.html, with its caption from workflow/report/."""
    return report(
        path, caption=f"../report/{caption}.rst", category=category, subcategory=subcategory, labels=labels or None
    )


def gpu_resources(stage):
    """GPU requests for the SLURM plugin, only when the preset asks for GPUs."""
    gpus = job(stage, "gpu", 0)
    if not gpus:
        return {}
    extra = {"gpu": gpus}
    if job(stage, "gpu_model"):
        extra["gpu_model"] = job(stage, "gpu_model")
    return extra


@functools.lru_cache(maxsize=None)
def run_weights(variant, seed):
    """The train rule's rerun trigger: the part of the run config that can change the trained weights
    (gtmoe.contract.weight_config, the one definition of "the same run"), as sorted JSON."""
    return json.dumps(STUDY.run_config(variant, int(seed)).weights(), sort_keys=True)


# The evaluate rule's rerun trigger: the study's evaluation settings.
EVAL_SETTINGS = json.dumps(RECORD["run"]["eval"], sort_keys=True)


def record_trigger(step):
    """An analysis rule's rerun trigger: the part of the study record its step reads (analysis.outputs)."""
    return json.dumps(outputs.record_part(RECORD, outputs.RECORD_KEYS[step]), sort_keys=True)


def summary_file(name):
    """A table of the analysis (file names: analysis.outputs) in the study's summary/."""
    return f"{SUMMARY}/{name}"


def figure_file(name):
    """A figure of the analysis (names: analysis.outputs) in the study's figures/."""
    return f"{FIGURES}/{name}.png"


def analysis_command(step):
    """Every analysis step's command: it reads the study record and nothing else about the study."""
    inputs = " --benchmarks {input.benchmarks:q}" if step == "compute" else ""  # the files compute sums
    return f"python -m analysis {step} --study {{input.record:q}}{inputs} > {{log:q}} 2>&1"
