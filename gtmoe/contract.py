"""The run-directory contract between the engine, the analysis and the workflow.

    results/runs/{variant}/seed{seed}/
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
EVAL_SPLITS = ("validation", "test")


def eval_file(split: str) -> str:
    """File name of the evaluation summary of one split."""
    return f"eval_{split}.json"


# Run status: in every evaluation JSON ("ok") and in the analysis's run-status table.
RUN_OK = "ok"
RUN_MISSING = "missing"
RUN_FAILED = "failed"

# Evaluation JSON: keys that identify a run rather than measure it, and the model-level load metrics
# every routed run's JSON holds (null for a non-finite value); dense runs have none.
EVAL_ID_KEYS = ("variant", "seed", "split", "router", "status", "per_layer")
PER_LAYER_ID_KEYS = ("layer", "load")
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
FLIP_RATE_PREFIX = "flip_rate_"  # + a router's selection term: in the training log and evaluation JSON

# Router log: one row per (step, layer, expert), then one column per state tensor the run's router
# declares (`Router.state_names`: rdesi reputation, load_hat, bonus; lossfree bias; none for topk).
ROUTER_LOG_INDEX = ("step", "layer", "expert", "load")

# Run-config keys that cannot change the trained weights (a top-level section, or a dotted key):
# `evaluate` accepts a run whose config.yaml differs from its checkpoint's config only in these, and
# the workflow's `train` rule does not rerun for them.
WEIGHT_NEUTRAL_KEYS = ("eval", "train.log_every", "train.router_log_every")
