"""The study's file layout and the run-directory contract between the engine, the analysis and the workflow.

Every study writes under its own root, results/<name>/ (config key `name`), laid out by StudyLayout:

    results/<name>/study.json            the resolved study record (gtmoe.study, written at parse time)
    results/<name>/data/                 corpus, tokenizer.json, shards/{split}/
    results/<name>/baselines/ngram.json  n-gram reference models
    results/<name>/runs/{variant}/seed{seed}/   one run (below)
    results/<name>/summary/, figures/    the analysis' tables and figures
    results/<name>/logs/, benchmarks/    Snakemake job logs and benchmark files
    results/<name>/report.html

A run directory holds:

    runs/{variant}/seed{seed}/
        checkpoint.pt (+ .manifest.json)   the trained model        (gtmoe.train)
        config.yaml                        the resolved run config  (gtmoe.train)
        train_log.parquet                  per logged step          (gtmoe.train)
        router_log.parquet                 per step, layer, expert  (gtmoe.train)
        train_summary.json                                          (gtmoe.train)
        eval_{split}.json                  per evaluation split     (gtmoe.evaluate)

`gtmoe` writes these names, `analysis` reads them and `workflow/rules/*.smk` declares them, all
from here. Standard library only: the workflow imports it when it parses, and the analysis never
needs torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePosixPath

RESULTS = "results"  # every study's root is RESULTS/<name>
STUDY_RECORD = "study.json"
STUDY_RECORD_FORMAT = 1  # the layout of study.json, for the code that reads it

CHECKPOINT = "checkpoint.pt"  # the finished run
RESUME_CHECKPOINT = "checkpoint_last.pt"  # rolling, while training; not a workflow output
SATURATION_CHECKPOINT = "checkpoint_saturation.pt"  # mid-training model, for router saturation
RUN_CONFIG = "config.yaml"
TRAIN_LOG = "train_log.parquet"
ROUTER_LOG = "router_log.parquet"
TRAIN_SUMMARY = "train_summary.json"
# The layout of the weights a checkpoint holds, for the model code that reads them. 2: rotary embeddings
# turn adjacent pairs of head dimensions (1: the two halves), so a format-1 model would load without
# error and compute a different function.
MODEL_FORMAT = 2
# What a finished `train` job leaves, in the order the workflow declares it.
TRAIN_OUTPUTS = (CHECKPOINT, RUN_CONFIG, TRAIN_LOG, ROUTER_LOG, TRAIN_SUMMARY)

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # target of a padded position in the shards: torch cross_entropy's default ignore_index
EVAL_SPLITS = ("validation", "test")
PROBE_SPLIT = "validation"  # the routing probe's blocks (gtmoe.probe): choices are made on validation


def eval_file(split: str) -> str:
    """File name of the evaluation summary of one split."""
    return f"eval_{split}.json"


@dataclass(frozen=True)
class StudyLayout:
    """Where every file of one study lives, relative to the workflow directory (posix paths as strings)."""

    root: str

    @classmethod
    def for_study(cls, name: str) -> StudyLayout:
        return cls(f"{RESULTS}/{name}")

    def _under(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    @property
    def record(self) -> str:
        return self._under(STUDY_RECORD)

    @property
    def data(self) -> str:
        return self._under("data")

    @property
    def corpus(self) -> str:
        return self._under("data", "corpus")

    @property
    def tokenizer(self) -> str:
        return self._under("data", "tokenizer.json")

    @property
    def shards(self) -> str:
        return self._under("data", "shards")

    @property
    def baselines(self) -> str:
        return self._under("baselines", "ngram.json")

    @property
    def runs(self) -> str:
        return self._under("runs")

    @property
    def summary(self) -> str:
        return self._under("summary")

    @property
    def figures(self) -> str:
        return self._under("figures")

    @property
    def logs(self) -> str:
        return self._under("logs")

    @property
    def benchmarks(self) -> str:
        return self._under("benchmarks")

    @property
    def report(self) -> str:
        return self._under("report.html")

    def run_dir(self, variant: str, seed: int | str) -> str:
        return self._under("runs", str(variant), f"seed{seed}")


# Run status: in every evaluation JSON ("ok") and in the analysis's run-status table.
RUN_OK = "ok"
RUN_MISSING = "missing"
RUN_FAILED = "failed"

# Evaluation JSON: keys that identify a run rather than measure it, and the model-level load metrics
# every routed run's JSON holds (null for a non-finite value); dense runs have none.
EVAL_ID_KEYS = ("variant", "seed", "split", "router", "status", "per_layer")
# A layer's per-expert count vectors: `load`, the assignments the experts processed (after any capacity cut),
# and `requested_load`, the experts the router chose before it (token-choice routers, `Routing.choice`; null
# for a router without one, e.g. expert choice). The analysis reads each as metrics `{name}_e{i}`.
PER_LAYER_LOADS = ("load", "requested_load")
# A layer's arrays for the specialisation analysis (analysis.stats.specialisation), read from the JSON, never
# averaged over layers or put in the tidy table: `coactivation` the E x E counts of tokens routed to both experts
# i and j (symmetric; the diagonal is the tokens routed to i; null above MAX_COACTIVATION_EXPERTS experts, where
# the matrix would dominate the file), `top_tokens` and `top_token_counts` each expert's TOP_TOKENS most routed
# token ids (most first, ties to the lower id) and how often each was routed to it.
# `probe_sets` the final model's routing of the probe, packed (gtmoe.probe; the validation split only).
# The routing stability's arrays for figures (gtmoe.stability, from the final checkpoint's routing snapshots): the
# snapshots' training steps, the share of probe tokens whose expert set changed between each consecutive pair
# (`fluctuation_curve`, S - 1 shares) and the share settled by each snapshot (`settled_curve`, S shares); null for
# a run without snapshots.
PER_LAYER_ARRAYS = (
    "coactivation",
    "top_tokens",
    "top_token_counts",
    "probe_sets",
    "snapshot_steps",
    "fluctuation_curve",
    "settled_curve",
)
PER_LAYER_ID_KEYS = ("layer", *PER_LAYER_LOADS, *PER_LAYER_ARRAYS)
TOP_TOKENS = 10  # N of "the share of an expert's tokens that come from its top-N token ids"
MAX_PROBE_BLOCKS = 1024  # eval.probe_blocks: 1024 blocks of 1024 tokens with 256 experts is 32 MiB a layer
MAX_ROUTING_SNAPSHOTS = 1000  # train.routing_snapshots: 1,001 snapshots of the default probe are 1 MiB a layer
MAX_COACTIVATION_EXPERTS = 256  # a 256 x 256 count matrix is ~0.4 MB of JSON per layer
LOAD_METRICS = (
    "gini",
    "load_entropy",
    "cv",
    "maxvio_global",
    "maxvio_batch",
    "dead_experts",
    "drop_rate",
    "token_expert_mi",
)
# What the experts learned (issue 23), per layer and, as for the load metrics, their mean over layers at model level:
# OLMoE's co-activation (the largest share of an expert's tokens also routed to one other expert, and the mean
# over experts of their strongest partner's share) and vocabulary specialisation (each token id's share of
# occurrences routed to its most used expert, weighted by frequency; and its distance from the floor that k
# experts per token impose), the share of an expert's tokens from its TOP_TOKENS token ids (mean over experts), the
# token-expert MI over its attainable maximum, and percentiles of the experts' utilisation E * f in each routing
# group (NeMo's expert utilisation, load over a fair share). Exploratory, and absent from evaluations written
# before them (the analysis shows n/a); null for a dense run.
SPECIALISATION_METRICS = (
    "coactivation_max",
    "coactivation_partner_mean",
    "vocab_specialisation",
    "vocab_specialisation_above_floor",
    "top_token_share",
    "token_expert_mi_share_of_max",
)
# Routing stability over training (StableMoE, Dai et al. 2022, arXiv 2204.08396), per layer and their mean over
# layers, from the routing snapshots of the probe taken while training (train.routing_snapshots, gtmoe.stability):
# the mean share of probe tokens whose expert set changes between consecutive snapshots, that share in the last
# interval, the median last fluctuation step (the last snapshot at which a token's set differs from its final one)
# as a fraction of training, and the share of tokens whose last fluctuation is past 20% of training. The same in
# both splits' JSON; null for a run without snapshots (older runs, routing_snapshots 0, dense).
STABILITY_METRICS = (
    "routing_fluctuation",
    "routing_fluctuation_last",
    "last_fluctuation_median",
    "late_fluctuation_share",
)
UTILISATION_PERCENTILES = {"min": 0, "p5": 5, "median": 50, "p95": 95, "max": 100}
UTILISATION_METRICS = tuple(f"utilisation_{name}" for name in UTILISATION_PERCENTILES)
FLIP_RATE_PREFIX = "flip_rate_"  # + a router's selection term: in the training log and evaluation JSON


# The range of every evaluation metric, checked when the analysis collects a run (analysis.collect): a value
# outside it, or a required metric missing, not a number or null, fails the run. Every range is finite and
# ends at MAX_METRIC at most: far above anything a run can produce (a PPL of 1e100 is 230 nats per token;
# uniform guessing over 2^64 token types is 44), and small enough that sums and squares over any number of
# seeds stay finite (a PPL of 1.7e308 is finite, but the mean of two overflows to inf).
MAX_METRIC = 1e100
# A closed end admits this much float round-off beyond it (a normalised entropy of a uniform load computes as
# 1.0000000000000002); an open end admits nothing. The ranges' ends are 0 and 1, so it is absolute.
RANGE_SLACK = 1e-9


@dataclass(frozen=True)
class MetricRange:
    """The values one metric can take: ``low`` to ``high``, each end open or closed; finite numbers only."""

    low: float
    high: float = MAX_METRIC
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low - RANGE_SLACK
        below = value < self.high if self.high_open else value <= self.high + RANGE_SLACK
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


_PPL = MetricRange(1, low_open=True)  # exp(NLL) with NLL > 0
_FRACTION = MetricRange(0, 1)
_NON_NEGATIVE = MetricRange(0)  # counts, ratios without an upper bound, times, sizes
EVAL_METRIC_RANGES = {
    "ppl": _PPL,
    "word_ppl": _PPL,
    "nll": MetricRange(0, low_open=True),
    "tokens": _NON_NEGATIVE,
    "words": _NON_NEGATIVE,
    "gini": MetricRange(0, 1, high_open=True),  # at most (E - 1) / E
    "load_entropy": _FRACTION,  # normalised by ln E
    "cv": _NON_NEGATIVE,
    "maxvio_global": _NON_NEGATIVE,
    "maxvio_batch": _NON_NEGATIVE,
    "dead_experts": _NON_NEGATIVE,  # a count per layer, its mean over layers at model level
    "drop_rate": _FRACTION,
    "token_expert_mi": _FRACTION,  # normalised by H(expert)
    "router_saturation": _FRACTION,
    **{name: _FRACTION for name in SPECIALISATION_METRICS},
    **{name: _FRACTION for name in STABILITY_METRICS},
    **{name: _NON_NEGATIVE for name in UTILISATION_METRICS},  # E * f: 0 (unused) to E (took the whole group)
    # The load the router asked for, before capacity (token-choice routers; null for others): Gini and MaxVio of
    # the requested counts, and the share of the requested (valid) assignments that capacity dropped.
    "requested_gini": MetricRange(0, 1, high_open=True),
    "requested_maxvio_global": _NON_NEGATIVE,
    "assignment_drop_rate": _FRACTION,
    "experts_per_token": _NON_NEGATIVE,  # measured: processed assignments per valid token (0..E)
    # 1 where every token's routing in the reported perplexity used only that token and its past, else 0.
    "causal_routing": _FRACTION,
    # The perplexity with the router's non-causal evaluation routing (expert choice's top-C of the group), for
    # a router that has one; null otherwise. Equal to ppl / word_ppl / nll where the reported routing is it.
    "ppl_noncausal": _PPL,
    "word_ppl_noncausal": _PPL,
    "nll_noncausal": MetricRange(0, low_open=True),
    "n_params": _NON_NEGATIVE,
    "n_active_params": _NON_NEGATIVE,
    "tokens_per_s": _NON_NEGATIVE,
    "wall_s": _NON_NEGATIVE,
    "peak_mem_mb": _NON_NEGATIVE,
    "n_experts": _NON_NEGATIVE,
    "top_k": _NON_NEGATIVE,
    "train_step": _NON_NEGATIVE,
    "group_tokens": _NON_NEGATIVE,
    "eval_blocks": _NON_NEGATIVE,
    "split_blocks": _NON_NEGATIVE,
}
LOAD_COUNT_RANGE = _NON_NEGATIVE  # each entry of a layer's `load` and `requested_load`: tokens per expert
# Model-level metrics every evaluation JSON holds as numbers (a routed run's also LOAD_METRICS); any other
# metric with a range may be null (undefined: gtmoe writes NaN and inf as null) but nothing else out of range.
EVAL_REQUIRED_METRICS = ("ppl", "word_ppl", "nll", "tokens", "words")


def metric_range(name: str) -> MetricRange | None:
    """The range of an evaluation metric (a flip rate's is [0, 1]); None for a key without one."""
    if name.startswith(FLIP_RATE_PREFIX):
        return _FRACTION
    return EVAL_METRIC_RANGES.get(name)


# Router log: one row per (step, layer, expert), then one column per state tensor the run's router
# declares (`Router.state_names`: rdesi reputation, load_hat, bonus; lossfree bias; none for topk).
ROUTER_LOG_INDEX = ("step", "layer", "expert", "load")

# Run-config keys that cannot change the trained weights (a top-level section, or a dotted key), the one
# definition of "the same run" (gtmoe.config.weight_config): resume continues a run whose config differs
# only in these, `evaluate` accepts such a run, and the workflow's `train` rule does not rerun for them.
# checkpoint_every only says when a checkpoint is written: saving changes no computation, and a resumed
# run ends with the weights of an uninterrupted one.
# routing_snapshots only routes the probe in eval mode, which changes no weight, router state or random number
# (gtmoe.probe).
WEIGHT_NEUTRAL_KEYS = (
    "eval",
    "train.log_every",
    "train.router_log_every",
    "train.checkpoint_every",
    "train.routing_snapshots",
)


def weight_config(run_config: dict) -> dict:
    """The run config (as `RunConfig.to_dict()` writes it) without WEIGHT_NEUTRAL_KEYS: the one definition of
    "the same run", used by resume, by evaluate's check of a run directory and by the workflow's train trigger.
    Returns a new mapping; the argument is not changed."""

    def keep(value, prefix: str):
        if not isinstance(value, dict):
            return value
        return {
            key: keep(item, f"{prefix}{key}.")
            for key, item in value.items()
            if f"{prefix}{key}" not in WEIGHT_NEUTRAL_KEYS
        }

    return keep(run_config, "")
