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
# Read each again strictly before anything walks the values: duplicate keys, anchors/aliases, oversized files,
# YTE templating keys (`__use_yte__`). Snakemake has rendered a --configfile's template before the Snakefile
# runs (docs/reliability.md); this stops the workflow before any job. config.yaml is checked before it loads.
for _configfile in workflow.configfiles:
    try:
        load_yaml(Path(_configfile))
    except ConfigError as exc:
        raise WorkflowError(f"invalid configuration: {exc}") from None

validate(config, "../schemas/config.schema.yaml")

SPLITS = list(contract.SPLITS)
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
RUNS = STUDY.runs()  # every (variant, seed): a variant may have seeds of its own (variants[].seeds)
EVAL_SPLITS = list(STUDY.eval_splits)  # a tuning study never scores the test split (gtmoe.tuning)
SWEEPS = STUDY.sweeps  # sweep name -> its variants (gtmoe.sweeps)


wildcard_constraints:
    variant="|".join(map(re.escape, VARIANTS)),  # sweep points hold '.' and '-'
    seed=r"\d+",
    split="|".join(SPLITS),


def run_dirs(variants=VARIANTS):
    return [RUN.format(variant=v, seed=s) for v in variants for s in STUDY.variant_seeds(v)]


def run_files(name, variants=VARIANTS):
    return [f"{d}/{name}" for d in run_dirs(variants)]


def eval_files(variants=VARIANTS):
    return [f"{d}/{contract.eval_file(split)}" for d in run_dirs(variants) for split in EVAL_SPLITS]


def study_benchmarks():
    """The benchmark file of every job that runs before the `compute` rule (called after all rules are
    defined; `compute`'s own benchmark and the report are not counted)."""
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
        "specialisation",
        "sensitivity",
        "tuning",
    ):
        if rules.has(name):  # each rule's benchmark takes the wildcards it has
            pattern = str(getattr(rules, name).benchmark)
            files += [pattern.format(variant=v, seed=s, split=split) for v, s in RUNS for split in EVAL_SPLITS]
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


def probe_shards(wildcards):
    """The train rule's validation shards: only for a run that takes routing snapshots (train.routing_snapshots
    > 0 and eval.probe_blocks > 0), whose trainer reads the routing probe from them (gtmoe.train). A run without
    has no such input: a new input of every run would make Snakemake retrain every existing run. `ancient`: the
    probe changes no weight, so a newer mtime alone (a touched or copied shard directory) retrains nothing; shards
    rebuilt in the same invocation do retrain the runs that read them (Snakemake reruns a job's consumers)."""
    cfg = STUDY.run_config(wildcards.variant, int(wildcards.seed))
    return ancient(f"{SHARDS}/validation") if cfg.train.routing_snapshots > 0 and cfg.eval.probe_blocks > 0 else []


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


# ----------------------------------------------------------- rebuild what is missing or is not the study's run
# Snakemake (>= 7.7) rebuilds a missing file only when a job that reads it runs anyway: a deleted run file,
# run directory, tokenizer or corpus under up-to-date tables stays deleted. Without its metadata
# (.snakemake/, or results/ copied to another clone) it cannot see either that a run was trained with
# other settings. So each job that builds data or a run has a trigger file among its inputs, set here when
# the workflow parses (main process only; deletes nothing): if the job must run again, it gets new content
# (Snakemake compares the checksums of small inputs) and the current time, newer than every output; else it
# is dated 2000-01-01 and never triggers. A job must run again when one of its outputs is missing while
# another output or something built from it exists, and a training run also when its recorded
# config.yaml is not the run the study asks for (gtmoe.contract.weight_config through
# gtmoe.runfiles.config_differences). What is built from a rebuilt file reruns after it, as Snakemake
# reruns whatever reads a newer input: the aggregate included, so run_status never keeps a deleted run.
import time

TRIGGERS = f"{LAYOUT.root}/triggers"
CORPUS_TRIGGER = f"{TRIGGERS}/corpus"
TOKENIZER_TRIGGER = f"{TRIGGERS}/tokenizer"
SHARDS_TRIGGER = f"{TRIGGERS}/shards/{{split}}"
NGRAM_TRIGGER = f"{TRIGGERS}/ngram_baselines"
TRAIN_TRIGGER = f"{TRIGGERS}/train/{{variant}}/seed{{seed}}"
EVALUATE_TRIGGER = f"{TRIGGERS}/evaluate/{{variant}}/seed{{seed}}"
_UNTRIGGERED = 946_684_800  # 2000-01-01: older than any output


def _set_trigger(path, reason):
    """Make `path` trigger its job (`reason`: why) or not (None)."""
    path = Path(path)
    if reason is None:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{"rebuild": null}\n')
        if path.stat().st_mtime != _UNTRIGGERED:
            os.utime(path, (_UNTRIGGERED, _UNTRIGGERED))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.time_ns()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rebuild": reason, "at_ns": stamp}) + "\n")
    os.replace(tmp, path)
    newest = max([time.time(), *(os.stat(p).st_mtime + 1 for p in _products(path))], default=time.time())
    os.utime(path, (newest, newest))
    print(f"gtmoe: {reason}", file=sys.stderr, flush=True)


_PRODUCTS = {}  # trigger -> the files it must be newer than (its job's outputs and what is built from them)


def _products(trigger):
    return [p for p in _PRODUCTS.get(str(trigger), []) if os.path.exists(p)]


def _missing_reason(outputs, built_from, what):
    """Why a job whose outputs are `outputs` must run again (None: it need not): an output is missing while
    another output, or a file in `built_from`, exists."""
    missing = [p for p in outputs if not os.path.exists(p)]
    present = [p for p in (*outputs, *built_from) if os.path.exists(p)]
    if not missing or not present:
        return None
    more = f" (and {len(missing) - 1} more of its files)" if len(missing) > 1 else ""
    return f"{missing[0]}{more} is missing while {present[0]} exists: rebuilding {what}"


def _statused_runs():
    """(variant, seed) of every run in the aggregate's run_status.csv (empty if there is none)."""
    import csv

    path = Path(summary_file(f"{outputs.STATUS}.csv"))
    try:
        with path.open(newline="") as handle:
            return {(row.get("variant"), str(row.get("seed"))) for row in csv.DictReader(handle)}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()


def _foreign_run_reason(run_dir, variant, seed):
    """Why an existing run directory is not the run the study asks for (None: it is, or it has no config)."""
    from gtmoe.runfiles import config_differences, describe_differences

    path = Path(run_dir) / contract.RUN_CONFIG
    if not path.exists():
        return None
    try:
        stored = load_yaml(path)
    except ConfigError as exc:
        return f"{path} is unreadable ({exc}): retraining {run_dir}"
    if not isinstance(stored, dict):
        return f"{path} is not a run config: retraining {run_dir}"
    differences = config_differences(stored, STUDY.run_config(variant, int(seed)).to_dict())
    if not differences:
        return None
    shown = describe_differences(differences, contract.RUN_CONFIG, "the study")
    return f"{run_dir} is not the run the study asks for: {shown}; retraining it"


def set_triggers():
    corpus = [*(f"{LAYOUT.corpus}/{split}.txt" for split in SPLITS), f"{LAYOUT.corpus}/corpus.json"]
    shards = {split: f"{SHARDS}/{split}" for split in SPLITS}
    statused = _statused_runs()
    jobs = [  # (trigger, outputs, what is built from them, what the job builds, another reason)
        (CORPUS_TRIGGER, corpus, [LAYOUT.tokenizer, *shards.values()], "the corpus", None),
        (TOKENIZER_TRIGGER, [LAYOUT.tokenizer], shards.values(), "the tokenizer", None),
    ]
    for split, shard in shards.items():
        built = [NGRAM, *(eval_files() if split in EVAL_SPLITS else run_files(contract.CHECKPOINT))]
        jobs.append((SHARDS_TRIGGER.format(split=split), [shard], built, f"the {split} shards", None))
    # The statistics table shows the n-gram baselines as reference rows.
    jobs.append((NGRAM_TRIGGER, [NGRAM], [summary_file("summary.parquet")], "the n-gram baselines", None))
    trained = [contract.CHECKPOINT, contract.RUN_CONFIG, contract.TRAIN_LOG, contract.ROUTER_LOG]
    trained.append(contract.TRAIN_SUMMARY)
    for variant, seed in RUNS:
        run = RUN.format(variant=variant, seed=seed)
        evals = [f"{run}/{contract.eval_file(split)}" for split in EVAL_SPLITS]
        # The aggregate's tables count as built from this run only when its run_status lists it.
        tables = [summary_file(f"{outputs.STATUS}.csv")] if (variant, str(seed)) in statused else []
        wildcards = dict(variant=variant, seed=seed)
        train = (_foreign_run_reason(run, variant, seed), [f"{run}/{name}" for name in trained], [*evals, *tables])
        jobs.append((TRAIN_TRIGGER.format(**wildcards), *train[1:], f"the run {run}", train[0]))
        # (a run that retrains is evaluated again anyway)
        if not (train[0] or _missing_reason(*train[1:], "")):
            jobs.append((EVALUATE_TRIGGER.format(**wildcards), evals, tables, f"the evaluation of {run}", None))
        else:
            _set_trigger(EVALUATE_TRIGGER.format(**wildcards), None)
    for trigger, products, built_from, what, reason in jobs:
        _PRODUCTS[trigger] = [*products, *built_from]
        _set_trigger(trigger, reason or _missing_reason(products, built_from, what))


if workflow.is_main_process:
    set_triggers()
