# Config validation (schema, then gtmoe's typed checks) and the paths every stage shares.
import json
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # import gtmoe from this checkout even when it is not installed

from gtmoe.config import ConfigError
from gtmoe.study import Study, corpus_problem


validate(config, "../schemas/config.schema.yaml")

DATA = "results/data"
SHARDS = f"{DATA}/shards"
RUN = "results/runs/{variant}/seed{seed}"
SUMMARY = "results/summary"
FIGURES = "results/figures"
LOGS = "results/logs"
BENCHMARKS = "results/benchmarks"
SPLITS = ["train", "validation", "test"]
EVAL_SPLITS = ["validation", "test"]
CONDA_ENV = "../envs/gtmoe.yaml"
# Jobs' `python` is the interpreter running Snakemake (its venv), also when started by absolute path.
envvars:
    "PATH",


os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

try:
    STUDY = Study.from_config(config, shards_dir=SHARDS)
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration: {exc}") from None
if problem := corpus_problem(config["data"], workflow.basedir):
    raise WorkflowError(f"invalid configuration: {problem}")

VARIANTS = STUDY.variant_names
SEEDS = STUDY.seeds


wildcard_constraints:
    variant="|".join(VARIANTS),
    seed=r"\d+",
    split="|".join(SPLITS),


def run_dirs(variants=VARIANTS):
    return [RUN.format(variant=v, seed=s) for v in variants for s in SEEDS]


def run_files(name, variants=VARIANTS):
    return [f"{d}/{name}" for d in run_dirs(variants)]


def eval_files(variants=VARIANTS):
    return [f"{d}/eval_{split}.json" for d in run_dirs(variants) for split in EVAL_SPLITS]


def study_benchmarks():
    """The benchmark file of every job that runs before the `compute` rule (called after all rules are
    defined; `compute`'s own benchmark and the report are not counted)."""
    grid = dict(variant=VARIANTS, seed=SEEDS, split=EVAL_SPLITS)  # each rule takes the wildcards it has
    files = [str(rules.corpus.benchmark), str(rules.tokenizer.benchmark),
             *expand(str(rules.shards.benchmark), split=SPLITS)]
    for name in ("ngram_baselines", "run_config", "train", "evaluate", "aggregate", "statistics", "figures",
                 "findings"):
        if rules.has(name):
            files += expand(str(getattr(rules, name).benchmark), **grid)
    return list(dict.fromkeys(files))


def job(stage, key, default=None):
    """A resource of one stage from config['resources'] (per preset)."""
    return config["resources"].get(stage, {}).get(key, default)


def captioned(path, caption, category, subcategory=None, **labels):
    """An output that appears in report.html, with its caption from workflow/report/."""
    return report(path, caption=f"../report/{caption}.rst", category=category, subcategory=subcategory,
                  labels=labels or None)


def gpu_resources(stage):
    """GPU requests for the SLURM plugin, only when the preset asks for GPUs."""
    gpus = job(stage, "gpu", 0)
    if not gpus:
        return {}
    extra = {"gpu": gpus}
    if job(stage, "gpu_model"):
        extra["gpu_model"] = job(stage, "gpu_model")
    return extra
