"""Routing stability over training (gtmoe.stability): the metrics against a brute force, the snapshots training
takes (weights and logs unchanged, kept across a resume), their config, and the train rule's extra input."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex

import numpy as np
import pandas as pd
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gtmoe import routers, stability
from gtmoe.config import ConfigError, RouterConfig, TrainConfig, from_dict, routing_snapshot_bytes
from gtmoe.contract import (
    CHECKPOINT,
    EVAL_METRIC_RANGES,
    PER_LAYER_ARRAYS,
    RESUME_CHECKPOINT,
    STABILITY_METRICS,
    WEIGHT_NEUTRAL_KEYS,
    weight_config,
)
from gtmoe.evaluate import evaluate_splits
from gtmoe.model import MoETransformer
from gtmoe.probe import route_probe
from gtmoe.runfiles import config_differences
from gtmoe.train import train

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model, tiny_run
from helpers import SMOKE, copy_checkout, snakemake, write_override

TIMING_COLUMNS = ["tokens_per_s", "elapsed_s"]

# --------------------------------------------------------------------------- the metrics, against a brute force


def brute_force(sets: np.ndarray, valid: np.ndarray, steps: list[int], max_steps: int) -> dict:
    """Every metric and array of one layer by loops over the valid tokens, straight from the definitions."""
    tokens = [t for t in range(sets.shape[1]) if valid[t]]
    as_set = [[frozenset(np.flatnonzero(sets[s, t]).tolist()) for t in range(sets.shape[1])] for s in range(len(steps))]
    curve = []
    for s in range(len(steps) - 1):
        curve.append(sum(as_set[s + 1][t] != as_set[s][t] for t in tokens) / len(tokens))
    last, last_index = {}, {}
    for t in tokens:
        last[t], last_index[t] = 0, -1
        for s in range(len(steps)):
            if as_set[s][t] != as_set[-1][t]:
                last[t], last_index[t] = steps[s], s
    settled = []
    for j in range(len(steps)):
        # settled at snapshot j: every set from j on is the final one
        settled.append(sum(all(as_set[s][t] == as_set[-1][t] for s in range(j, len(steps))) for t in tokens))
    ordered = sorted(last[t] for t in tokens)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "routing_fluctuation": sum(curve) / len(curve),
        "routing_fluctuation_last": curve[-1],
        "last_fluctuation_median": median / max_steps,
        "late_fluctuation_share": sum(last[t] > 0.2 * max_steps for t in tokens) / len(tokens),
        "snapshot_steps": list(steps),
        "fluctuation_curve": curve,
        "settled_curve": [count / len(tokens) for count in settled],
    }


def expert_sets(rows: list[list[set[int]]], n_experts: int) -> np.ndarray:
    """(S, N, E) bool from each snapshot's list of per-token expert sets."""
    out = np.zeros((len(rows), len(rows[0]), n_experts), dtype=bool)
    for s, row in enumerate(rows):
        for t, experts in enumerate(row):
            out[s, t, sorted(experts)] = True
    return out


# Five snapshots of seven tokens, four experts (top-2, some dropped): token 0 never changes, 1 changes back and
# forth, 2 is dropped (empty set) mid-training then settles, 3 changes only at the end, 4 only after step 0, 5 is
# dropped at the end, and 6 is padding (changing all the time, and never counted).
STEPS = [0, 25, 50, 75, 100]
HAND_MADE = [
    [{0, 1}, {0, 1}, {2, 3}, {0, 3}, {1, 2}, {0, 2}, {0, 1}],
    [{0, 1}, {2, 3}, set(), {0, 3}, {1, 3}, {0, 2}, {2, 3}],
    [{0, 1}, {0, 1}, {2}, {0, 3}, {1, 3}, {0, 2}, {1}],
    [{0, 1}, {2, 3}, {2}, {0, 3}, {1, 3}, {0, 2}, set()],
    [{0, 1}, {0, 1}, {2}, {1, 3}, {1, 3}, set(), {0, 1, 2, 3}],
]
VALID = np.array([True] * 6 + [False])


def assert_layer_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected) == {*STABILITY_METRICS, *stability.STABILITY_ARRAYS}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_every_metric_matches_the_brute_force_on_hand_made_snapshots():
    sets = expert_sets(HAND_MADE, 4)
    got = stability.layer_stability(sets, VALID, np.array(STEPS), 100)
    assert_layer_equal(got, brute_force(sets, VALID, STEPS, 100))
    # Read off by hand: tokens 1, 3, 5 change in the last interval; token 1's last differing snapshot is step 75,
    # token 2's step 25, token 4's step 0; the late share counts tokens 1 (75), 2 (25), 3 (75), 5 (75).
    assert got["routing_fluctuation_last"] == pytest.approx(3 / 6)
    assert got["fluctuation_curve"] == pytest.approx([3 / 6, 2 / 6, 1 / 6, 3 / 6])
    assert got["late_fluctuation_share"] == pytest.approx(4 / 6)
    assert got["last_fluctuation_median"] == pytest.approx(50 / 100)  # steps 0, 0, 25, 75, 75, 75
    assert got["settled_curve"] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 3 / 6, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_every_metric_matches_the_brute_force_on_random_snapshots(seed):
    rng = np.random.default_rng(seed)
    n_snapshots, n_tokens, n_experts = rng.integers(2, 7), rng.integers(1, 40), rng.integers(1, 6)
    steps = sorted(rng.choice(np.arange(1, 200), n_snapshots - 1, replace=False).tolist())
    steps = [0, *steps]
    # Two candidate sets per token, so that tokens return to earlier sets and often agree with their final one.
    candidates = rng.random((n_tokens, 2, n_experts)) < 0.5
    sets = candidates[np.arange(n_tokens)[None, :], rng.integers(0, 2, (n_snapshots, n_tokens))]
    valid = rng.random(n_tokens) < 0.8
    valid[0] = True
    got = stability.layer_stability(sets, valid, np.array(steps), steps[-1])
    assert_layer_equal(got, brute_force(sets, valid, steps, steps[-1]))


def test_undefined_metrics_are_nan_without_valid_tokens_or_a_second_snapshot():
    sets = expert_sets(HAND_MADE, 4)
    none_valid = stability.layer_stability(sets, np.zeros(7, dtype=bool), np.array(STEPS), 100)
    one_snapshot = stability.layer_stability(sets[:1], VALID, np.array([0]), 100)
    for result in (none_valid, one_snapshot):
        assert all(math.isnan(result[name]) for name in STABILITY_METRICS)


@pytest.mark.parametrize("n_experts", [1, 4, 8, 13])
def test_packed_snapshots_unpack_to_the_same_sets_as_numpy_packs_them(n_experts):
    sets = torch.rand(3, 5, n_experts, generator=torch.Generator().manual_seed(n_experts)) < 0.4
    packed = stability.pack_snapshot(sets)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, -(-n_experts // 8))
    assert np.array_equal(packed.numpy(), np.packbits(sets.numpy(), axis=-1))
    assert np.array_equal(stability.unpack_snapshots(packed.numpy(), n_experts), sets.numpy())


def test_a_run_without_snapshots_has_every_value_null():
    for record in (None, {}, {"steps": []}):
        layers = stability.per_layer(record, 2, 100)
        assert len(layers) == 2
        assert all(value is None for layer in layers for value in layer.values())
        assert set(layers[0]) == {*STABILITY_METRICS, *stability.STABILITY_ARRAYS}


def test_the_contract_declares_the_names():
    assert set(stability.STABILITY_ARRAYS) <= set(PER_LAYER_ARRAYS)
    assert all(EVAL_METRIC_RANGES[name].low == 0 and EVAL_METRIC_RANGES[name].high == 1 for name in STABILITY_METRICS)
    assert "train.routing_snapshots" in WEIGHT_NEUTRAL_KEYS


# --------------------------------------------------------------------------- config


def test_snapshot_steps_are_step_zero_and_evenly_spaced():
    assert TrainConfig(max_steps=10, routing_snapshots=0).snapshot_steps() == []
    assert TrainConfig(max_steps=10, routing_snapshots=3).snapshot_steps() == [0, 3, 7, 10]
    assert TrainConfig(max_steps=10, routing_snapshots=10).snapshot_steps() == list(range(11))
    assert len(TrainConfig(max_steps=1500, routing_snapshots=20).snapshot_steps()) == 21


@pytest.mark.parametrize(
    "raw, shown",
    [
        ({"routing_snapshots": -1}, "-1"),
        ({"routing_snapshots": 11, "max_steps": 10}, "11"),
        ({"routing_snapshots": 1001, "max_steps": 5000}, "1001"),
        ({"routing_snapshots": True}, "True"),
        ({"routing_snapshots": 2.5}, "2.5"),
        ({"routing_snapshots": "4"}, "'4'"),
    ],
)
def test_a_bad_routing_snapshots_names_the_key_and_value(raw, shown):
    with pytest.raises(ConfigError) as caught:
        from_dict(TrainConfig, {"max_steps": 100, "warmup_steps": 1, **raw}, "train").validate()
    message = str(caught.value)
    assert "train.routing_snapshots" in message and shown in message, message
    assert "\n" not in message


def test_routing_snapshots_is_weight_neutral():
    a = tiny_run("shards", routing_snapshots=0).to_dict()
    b = tiny_run("shards", routing_snapshots=4).to_dict()
    assert weight_config(a) == weight_config(b) and not config_differences(a, b)


def test_the_memory_estimate_counts_the_snapshots():
    cfg = tiny_run("shards", max_steps=1500, warmup_steps=75, routing_snapshots=20)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_experts=8))
    assert routing_snapshot_bytes(cfg, 64) == 21 * 2 * 16 * 64 * 1  # a bit per (token, expert), 8 experts a byte
    assert routing_snapshot_bytes(dataclasses.replace(cfg, train=TrainConfig(max_steps=1500)), 64) == 0


# --------------------------------------------------------------------------- training with snapshots


def final_state(run_dir) -> dict:
    return torch.load(run_dir / CHECKPOINT, weights_only=False)


def read_log(run_dir, name: str) -> pd.DataFrame:
    return pd.read_parquet(run_dir / name).drop(columns=TIMING_COLUMNS, errors="ignore")


def assert_same_record(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"] and a["probe_blocks"] == b["probe_blocks"] and a["n_experts"] == b["n_experts"]
    assert torch.equal(a["sets"], b["sets"]) and torch.equal(a["valid"], b["valid"])


# Routers with random numbers (noise, jitter), with state updated from the step's routing, and expert choice.
@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "rdesi", "expert_choice"])
def test_snapshots_change_neither_the_weights_nor_the_logs(tmp_path, tiny_shards, router):
    plain = tiny_run(tiny_shards, router, max_steps=8, checkpoint_every=3)
    snapshots = dataclasses.replace(plain, train=dataclasses.replace(plain.train, routing_snapshots=4))
    train(plain, tmp_path / "plain")
    train(snapshots, tmp_path / "snapshots")
    a, b = final_state(tmp_path / "plain"), final_state(tmp_path / "snapshots")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for log in ("train_log.parquet", "router_log.parquet"):
        pd.testing.assert_frame_equal(read_log(tmp_path / "plain", log), read_log(tmp_path / "snapshots", log))
    assert a.get(stability.SNAPSHOT_RECORD) is None
    record = b[stability.SNAPSHOT_RECORD]
    assert record["steps"] == [0, 2, 4, 6, 8] and record["n_experts"] == 4
    assert record["probe_blocks"] == stability_probe_blocks(tiny_shards, plain.eval.probe_blocks)
    n_tokens = len(record["probe_blocks"]) * TINY_SEQ
    assert record["sets"].shape == (5, 2, n_tokens, 1) and record["valid"].shape == (n_tokens,)
    sets = stability.unpack_snapshots(record["sets"].numpy(), 4)
    if router != "expert_choice":  # token choice: at most top_k experts a token
        assert (sets.sum(axis=-1) <= 2).all()
    assert not np.array_equal(sets[0], sets[-1])  # training moved the routing


def stability_probe_blocks(shards, probe_blocks: int) -> list[int]:
    from gtmoe.data import TokenBlocks
    from gtmoe.probe import probe_block_ids

    return probe_block_ids(len(TokenBlocks(shards / "validation")), probe_blocks).tolist()


@pytest.mark.parametrize("stop_after", [4, 5])  # at a snapshot step, and between two
def test_a_resumed_run_ends_with_the_snapshots_of_an_uninterrupted_one(tmp_path, tiny_shards, stop_after):
    cfg = tiny_run(tiny_shards, "rdesi", max_steps=10, checkpoint_every=4, routing_snapshots=5)
    train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "resumed", stop_after=stop_after) == {"stopped_at": stop_after}
    rolling = torch.load(tmp_path / "resumed" / RESUME_CHECKPOINT, weights_only=False)[stability.SNAPSHOT_RECORD]
    assert rolling["steps"] == [step for step in (0, 2, 4, 6, 8, 10) if step <= stop_after]
    train(cfg, tmp_path / "resumed")
    full, resumed = final_state(tmp_path / "full"), final_state(tmp_path / "resumed")
    assert_same_record(full[stability.SNAPSHOT_RECORD], resumed[stability.SNAPSHOT_RECORD])
    for key in full["model"]:
        assert torch.equal(full["model"][key], resumed["model"][key]), key


def test_a_run_resumed_with_another_probe_drops_the_snapshots_of_the_old_one(tmp_path, tiny_shards):
    cfg = tiny_run(tiny_shards, "topk", max_steps=10, checkpoint_every=4, routing_snapshots=5)
    train(cfg, tmp_path, stop_after=5)
    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, probe_blocks=8))  # weight-neutral
    train(other, tmp_path)
    assert final_state(tmp_path)[stability.SNAPSHOT_RECORD]["steps"] == [6, 8, 10]


def test_no_snapshots_for_a_dense_run_or_without_a_probe(tmp_path, tiny_shards):
    dense = tiny_run(tiny_shards, "dense", max_steps=4, routing_snapshots=2)
    no_probe = tiny_run(tiny_shards, "topk", max_steps=4, routing_snapshots=2)
    no_probe = dataclasses.replace(no_probe, eval=dataclasses.replace(no_probe.eval, probe_blocks=0))
    for name, cfg in (("dense", dense), ("no_probe", no_probe)):
        train(cfg, tmp_path / name)
        assert final_state(tmp_path / name)[stability.SNAPSHOT_RECORD] is None


def test_the_evaluation_reports_the_stability_in_both_splits(tmp_path, tiny_shards):
    cfg = tiny_run(tiny_shards, "topk", max_steps=8, routing_snapshots=4)
    train(cfg, tmp_path / "snapshots")
    plain = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, routing_snapshots=0))
    train(plain, tmp_path / "plain")
    expected = stability.per_layer(final_state(tmp_path / "snapshots")[stability.SNAPSHOT_RECORD], 2, 8)
    results = evaluate_splits(tmp_path / "snapshots", ["validation", "test"])
    for split, result in results.items():
        assert list(result)[-1] == "per_layer"
        for name in STABILITY_METRICS:
            assert result[name] == pytest.approx(np.mean([layer[name] for layer in expected])), (split, name)
            assert 0 <= result[name] <= 1
        for entry, layer in zip(result["per_layer"], expected):
            assert {name: entry[name] for name in layer} == layer
    assert results["validation"]["routing_fluctuation"] == results["test"]["routing_fluctuation"]
    json.dumps(results, allow_nan=False)  # every value JSON can hold
    without = evaluate_splits(tmp_path / "plain", ["validation", "test"])
    for result in without.values():
        assert all(result[name] is None for name in STABILITY_METRICS)
        assert all(entry[name] is None for entry in result["per_layer"] for name in stability.STABILITY_ARRAYS)
    # Everything else is the same run's evaluation.
    for name in ("ppl", "gini", "token_expert_mi", "router_saturation"):
        assert results["validation"][name] == without["validation"][name], name


def test_a_dense_run_has_null_stability(tmp_path, tiny_shards):
    train(tiny_run(tiny_shards, "dense", max_steps=4), tmp_path)
    result = evaluate_splits(tmp_path, ["validation"])["validation"]
    assert result["per_layer"] == [] and all(result[name] is None for name in STABILITY_METRICS)


@pytest.mark.parametrize("router", [{"name": name} for name in routers.known()], ids=lambda r: r["name"])
def test_a_snapshot_reads_nothing_on_the_host(router):
    """The probe's routing and its packing (gtmoe.train.Trainer.take_snapshot) on fake tensors: a host read raises."""
    with FakeTensorMode():
        model = MoETransformer(tiny_model(), RouterConfig.from_mapping(router).for_horizon(100)).train()
        if not model.moe_layers:
            return
        idx = torch.randint(0, TINY_VOCAB, (5, TINY_SEQ))
        sets, valid = route_probe(model, idx, idx, 2, torch.device("cpu"))
        stability.pack_snapshot(sets)
    assert model.training


# --------------------------------------------------------------------------- the workflow


def train_inputs(output: str) -> dict[str, list[str]]:
    """Each planned train job's inputs ("variant/seedN" -> paths) from a dry run's output."""
    jobs, inputs, current = {}, None, False
    for line in output.splitlines():
        if line.startswith("rule "):
            inputs = None
            current = line.strip() == "rule train:"
        elif current and line.strip().startswith("input: "):
            inputs = line.strip()[len("input: ") :].split(", ")
        elif current and inputs is not None and line.strip().startswith("wildcards: "):
            wildcards = dict(item.split("=") for item in line.strip()[len("wildcards: ") :].split(", "))
            jobs[f"{wildcards['variant']}/seed{wildcards['seed']}"] = inputs
    return jobs


def test_only_a_run_that_takes_snapshots_reads_the_validation_shards(tmp_path):
    study = copy_checkout(tmp_path / "study")
    validation = "results/smoke/data/shards/validation"
    variants = [
        {"name": "topk", "router": "topk"},
        {"name": "rdesi", "router": "rdesi", "train": {"routing_snapshots": 4}},
    ]
    every = {"topk", "rdesi", "rdesi-c0", "rdesi-c30"}  # the smoke preset's variants and its sweep's points
    off = {"train": {"routing_snapshots": 0}}
    for override, runs, reads in (  # the smoke preset takes 5 snapshots
        ({}, every, every),
        (off, every, set()),
        ({"train": {"routing_snapshots": 4}, "eval": {"probe_blocks": 0}}, every, set()),
        ({**off, "variants": variants, "sweeps": []}, {"topk", "rdesi"}, {"rdesi"}),  # a variant's own train wins
    ):
        configs = ["--configfile", SMOKE, *([write_override(tmp_path, override)] if override else [])]
        plan = snakemake("--dry-run", "--forceall", *configs, cwd=study, timeout=300)
        assert plan.returncode == 0, plan.stderr[-2000:]
        jobs = train_inputs(plan.stdout)
        assert {run.split("/")[0] for run in jobs} == runs, (shlex.join(configs), plan.stdout[-2000:])
        assert {run.split("/")[0] for run, inputs in jobs.items() if validation in inputs} == reads, override
