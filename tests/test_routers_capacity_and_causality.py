"""Switch's training and evaluation capacities and its input jitter; the load a router asked for before
capacity and the share dropped; expert choice's causal evaluation by per-expert thresholds, and what the
evaluation JSON and the analysis report about all of them. Each against a direct computation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_no_host_sync import train_step_without_data
from torch._subclasses.fake_tensor import FakeTensorMode

from analysis import collect, findings
from gtmoe import contract, metrics, routers
from gtmoe.config import ConfigError, EvalConfig, RouterConfig
from gtmoe.evaluate import LayerStats, _evaluate_split, _load_final, evaluate_splits, evaluation_routing, routing_mode
from gtmoe.model import MoETransformer
from gtmoe.moe import MoELayer
from gtmoe.routers.base import Routing
from gtmoe.train import train

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model, tiny_run

D_MODEL, N_EXPERTS, TOP_K = 16, 4, 2


def make_router(name: str, **options):
    cfg = RouterConfig.from_mapping({"name": name, **options}).for_horizon(100)
    return routers.get(name)(cfg.resolve(), D_MODEL, N_EXPERTS, TOP_K)


def brute_force_switch(choice: list[int], valid: list[bool], capacity: int) -> list[int]:
    """Each valid token joins its expert's queue in token order; past `capacity` it is dropped (E)."""
    seen, expert = [0] * N_EXPERTS, []
    for e, ok in zip(choice, valid):
        if not ok:
            expert.append(N_EXPERTS)
            continue
        expert.append(e if seen[e] < capacity else N_EXPERTS)
        seen[e] += 1
    return expert


# --------------------------------------------------------------------------- Switch: capacities and jitter


def test_switch_uses_the_eval_capacity_factor_in_eval_mode_only():
    torch.manual_seed(0)
    router = make_router("switch", capacity_factor=1.0, eval_capacity_factor=2.0)
    with torch.no_grad():
        router.gate.weight.mul_(0.1)
        router.gate.weight[1] += 0.5  # a popular expert, so capacity binds in both modes
    x = torch.randn(40, D_MODEL).abs()
    valid = torch.rand(40) < 0.9
    choice = router.gate(x).argmax(-1).tolist()
    results = {}
    for mode, factor in (("train", 1.0), ("eval", 2.0)):
        router.train(mode == "train")
        routing = router(x, valid)
        capacity = math.ceil(factor * 40 / N_EXPERTS)
        assert routing.expert.tolist() == brute_force_switch(choice, valid.tolist(), capacity), mode
        assert routing.choice.squeeze(-1).tolist() == choice  # the request, before the capacity cut
        results[mode] = (routing.expert < N_EXPERTS).sum().item()
    assert results["eval"] > results["train"]  # the case is not degenerate: the factors differ in effect
    router.train()
    assert router.capacity(40) == 10 and router.eval().capacity(40) == 20


def test_switch_options_are_recorded_and_validated():
    recorded = RouterConfig.from_mapping({"name": "switch"}).to_dict()
    assert recorded["capacity_factor"] == 1.25 and recorded["eval_capacity_factor"] == 2.0
    assert recorded["jitter_eps"] == 0.0
    for key, value, why in (
        ("eval_capacity_factor", 0.0, "must be > 0"),
        ("jitter_eps", -0.01, r"must be in \[0, 1\)"),
        ("jitter_eps", 1.0, r"must be in \[0, 1\)"),
    ):
        with pytest.raises(ConfigError, match=rf"'router.{key}' = {value}: {why}"):
            RouterConfig.from_mapping({"name": "switch", key: value})


def test_switch_jitter_scales_the_gate_input_within_bounds_in_training_only():
    torch.manual_seed(1)
    eps = 0.1
    router = make_router("switch", jitter_eps=eps)
    seen = []
    router.gate.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.randn(64, D_MODEL)
    routing = router(x)
    ratio = seen[-1] / x
    assert ratio.min() >= 1 - eps - 1e-6 and ratio.max() <= 1 + eps + 1e-6
    assert ratio.std() > eps / 4  # spread over the interval (uniform: std = eps / sqrt(3))
    # The combine weight is the probability of the jittered gate, as in the paper's router.
    jittered = torch.softmax(router.gate(seen[-1]).float(), dim=-1)
    assert torch.allclose(routing.weight, jittered.gather(-1, routing.choice).squeeze(-1))
    router.eval()
    router(x)
    assert torch.equal(seen[-1], x)  # no jitter at evaluation
    plain = make_router("switch")
    plain.load_state_dict(router.state_dict())
    plain.gate.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    plain(x)
    assert torch.equal(seen[-1], x)  # jitter_eps 0: off


# --------------------------------------------------------------------------- requested load and drops


def brute_force_requested(routings, valid_list):
    requested, processed, tokens = np.zeros(N_EXPERTS), 0, 0
    for routing, valid in zip(routings, valid_list):
        for t, row in enumerate(routing.choice.tolist()):
            if valid[t]:
                for e in row:
                    requested[e] += 1
        for e, t in zip(routing.expert.tolist(), routing.token.tolist()):
            processed += int(e < N_EXPERTS and bool(valid[t]))
        tokens += int(valid.sum())
    return requested, processed, tokens


def test_requested_load_and_drop_rate_match_a_brute_force_count():
    rng = np.random.default_rng(2)
    stats, routings, valids = LayerStats(N_EXPERTS, 11, torch.device("cpu")), [], []
    for _ in range(3):
        choice = torch.tensor(np.stack([rng.permutation(N_EXPERTS)[:TOP_K] for _ in range(20)]))
        expert = choice.reshape(-1).clone()
        expert[torch.tensor(rng.random(expert.numel()) < 0.3)] = N_EXPERTS  # dropped by a capacity
        routing = Routing(
            expert=expert,
            token=torch.arange(20).repeat_interleave(TOP_K),
            weight=torch.ones(expert.numel()),
            loss=torch.zeros(()),
            choice=choice,
        )
        valid = torch.tensor(rng.random(20) < 0.8)
        stats.add(routing, torch.randint(0, 11, (20,)), valid)
        routings.append(routing)
        valids.append(valid)
    summary = stats.summary(0)
    requested, processed, tokens = brute_force_requested(routings, valids)
    assert summary["requested_load"] == requested.astype(int).tolist()
    assert summary["requested_gini"] == pytest.approx(metrics.gini(requested))
    assert summary["requested_maxvio_global"] == pytest.approx(requested.max() / requested.mean() - 1)
    assert summary["assignment_drop_rate"] == pytest.approx(1 - processed / requested.sum())
    assert 0.1 < summary["assignment_drop_rate"] < 0.5
    assert summary["experts_per_token"] == pytest.approx(processed / tokens)
    assert sum(summary["load"]) == processed


def test_switch_drop_rate_is_the_share_of_its_requests_capacity_dropped():
    torch.manual_seed(3)
    router = make_router("switch", eval_capacity_factor=1.0).eval()
    stats, routings, valids = LayerStats(N_EXPERTS, 11, torch.device("cpu")), [], []
    for _ in range(2):
        x, valid = torch.randn(32, D_MODEL), torch.rand(32) < 0.8
        routing = router(x, valid)
        stats.add(routing, torch.randint(0, 11, (32,)), valid)
        routings.append(routing)
        valids.append(valid)
    summary = stats.summary(0)
    requested, processed, _ = brute_force_requested(routings, valids)
    assert summary["requested_load"] == requested.astype(int).tolist()
    assert summary["assignment_drop_rate"] == pytest.approx(1 - processed / requested.sum())
    assert summary["assignment_drop_rate"] > 0  # capacity 1.0 binds
    assert summary["assignment_drop_rate"] == pytest.approx(summary["drop_rate"])  # top-1: a drop is a token


def test_a_router_without_a_choice_has_no_requested_load():
    router = make_router("expert_choice")
    stats = LayerStats(N_EXPERTS, 11, torch.device("cpu"))
    stats.add(router(torch.randn(16, D_MODEL)), torch.randint(0, 11, (16,)), torch.ones(16, dtype=torch.bool))
    summary = stats.summary(0)
    assert summary["requested_load"] is None and math.isnan(summary["requested_gini"])
    assert math.isnan(summary["assignment_drop_rate"]) and summary["experts_per_token"] == pytest.approx(TOP_K)


# --------------------------------------------------------------------------- expert choice: thresholds


def test_expert_choice_options_are_validated():
    for key, value, why in (
        ("eval_routing", "sideways", "must be 'causal' or 'group'"),
        ("threshold_ema_rate", 0.0, r"must be in \(0, 1\]"),
        ("threshold_ema_rate", 1.5, r"must be in \(0, 1\]"),
    ):
        with pytest.raises(ConfigError, match=rf"'router.{key}' = '?{value}'?: {why}"):
            RouterConfig.from_mapping({"name": "expert_choice", key: value})


def test_expert_choice_thresholds_are_a_bias_corrected_ema_of_the_top_c_score():
    torch.manual_seed(4)
    rate = 0.3
    router = make_router("expert_choice", threshold_ema_rate=rate)
    ema, n = np.zeros(N_EXPERTS), 0
    for step in range(4):
        observed = []
        for _ in range(2):  # micro-batches of the step
            x = torch.randn(24, D_MODEL)
            valid = torch.arange(24) < (24 if step % 2 else 10)  # padding in some groups: C > valid tokens
            router(x, valid)
            probs = torch.softmax(router.gate(x).float(), dim=-1)
            capacity = router.capacity(24)
            row = []
            for e in range(N_EXPERTS):
                scores = sorted((float(probs[t, e]) if valid[t] else -1.0 for t in range(24)), reverse=True)
                row.append(max(scores[capacity - 1], 0.0))
            observed.append(row)
        if step == 2:  # a skipped step: its statistics are forgotten
            router.reset_step_statistics()
            router.update_state()
            continue
        ema = (1 - rate) * ema + rate * np.mean(observed, axis=0)
        n += 1
        router.update_state()
        assert router.threshold.numpy() == pytest.approx(ema / (1 - (1 - rate) ** n), rel=1e-5), step
    assert int(router.threshold_updates) == n == 3
    assert router.logged_state()["threshold"] is router.threshold
    assert {"threshold", "threshold_ema", "threshold_updates"} <= set(router.state_dict())  # in the checkpoint


def test_causal_evaluation_routes_each_token_by_its_own_thresholds():
    torch.manual_seed(5)
    router = make_router("expert_choice")
    router.threshold.copy_(torch.tensor([0.2, 0.3, 0.25, 0.4]))
    router.eval()
    x, valid = torch.randn(30, D_MODEL), torch.arange(30) < 26
    routing = router(x, valid)
    probs = torch.softmax(router.gate(x).float(), dim=-1)
    got = {(t, e) for t, e in zip(routing.token.tolist(), routing.expert.tolist()) if e < N_EXPERTS}
    expected_pairs = {(t, e) for t in range(26) for e in range(N_EXPERTS) if probs[t, e] >= router.threshold[e]}
    assert got == expected_pairs and 0 < len(got) < 26 * N_EXPERTS
    for t, e, w in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight.tolist()):
        if e < N_EXPERTS:
            assert w == pytest.approx(float(probs[t, e]))
    # The MoE layer: each token's output is the gate-weighted sum over its experts, zero for none.
    layer = MoELayer(router, D_MODEL, 8, N_EXPERTS)
    for weight in layer.experts.parameters():
        torch.nn.init.normal_(weight, std=0.3)
    with torch.no_grad():
        y = layer(x, valid)
        expected = torch.zeros_like(x)
        w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
        for t, e in expected_pairs:
            expected[t] += probs[t, e] * ((torch.nn.functional.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e])
    assert torch.allclose(y, expected, atol=1e-5)
    alone = [t for t in range(26) if not any(pair[0] == t for pair in expected_pairs)]
    assert alone and all(torch.equal(y[t], torch.zeros(D_MODEL)) for t in alone)  # residual only
    router.evaluation_mode = "group"  # the paper's routing: exactly C tokens per expert
    kept = router(x, valid).expert
    assert torch.equal(torch.bincount(kept[kept < N_EXPERTS], minlength=N_EXPERTS), torch.full((4,), 15))


def trained_expert_choice_model(eval_routing: str) -> MoETransformer:
    """A tiny expert-choice model whose thresholds have seen a few training groups (forwards + updates)."""
    torch.manual_seed(6)
    router = RouterConfig.from_mapping({"name": "expert_choice", "eval_routing": eval_routing})
    model = MoETransformer(tiny_model(), router)
    with torch.no_grad():
        for _ in range(3):
            idx = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ))
            model(idx, idx)
            model.update_router_states()
    return model.eval()


def token_experts(routing: Routing, n_tokens: int) -> list[set[int]]:
    experts = [set() for _ in range(n_tokens)]
    for t, e in zip(routing.token.tolist(), routing.expert.tolist()):
        if e < N_EXPERTS:
            experts[t].add(e)
    return experts


@pytest.mark.parametrize("mode", ["causal", "group"])
def test_changing_later_tokens_changes_earlier_routing_and_loss_only_in_group_mode(mode):
    model = trained_expert_choice_model(mode)
    torch.manual_seed(7)
    idx = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ))
    targets = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ))
    later = idx.clone()
    cut = TINY_SEQ // 2
    later[:, cut:] = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ - cut))  # every later position of every sequence
    earlier = (torch.arange(TINY_SEQ) < cut).repeat(4)  # the flattened tokens before the change
    outputs, routes = [], []
    with torch.no_grad():
        for tokens in (idx, later):
            outputs.append(model(tokens, targets).token_loss)
            routes.append([token_experts(layer.last_routing, 4 * TINY_SEQ) for layer in model.moe_layers])
    earlier_ids = earlier.nonzero().squeeze(-1).tolist()
    same_routing = all(routes[0][i][t] == routes[1][i][t] for i in range(len(routes[0])) for t in earlier_ids)
    loss_change = (outputs[0][earlier] - outputs[1][earlier]).abs().max().item()
    if mode == "causal":
        assert same_routing and loss_change < 1e-5
        assert any(len(experts) != TOP_K for experts in routes[0][0])  # thresholds: 0..E experts per token
    else:
        assert not same_routing and loss_change > 1e-4


def test_the_evaluator_finds_the_noncausal_mode_and_restores_the_routing():
    causal = trained_expert_choice_model("causal")
    assert evaluation_routing(causal) == (True, "group")
    with routing_mode(causal, "group"):
        assert evaluation_routing(causal) == (False, None)
        assert all(layer.router.evaluation_mode == "group" for layer in causal.moe_layers)
    assert all(layer.router.evaluation_mode == "causal" for layer in causal.moe_layers)
    assert evaluation_routing(trained_expert_choice_model("group")) == (False, None)
    topk = MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": "topk"}))
    assert evaluation_routing(topk) == (True, None)


# --------------------------------------------------------------------------- no host reads


@pytest.mark.parametrize(
    "router",
    [{"name": "switch"}, {"name": "expert_choice"}, {"name": "expert_choice", "eval_routing": "group"}],
    ids=lambda r: "-".join(map(str, r.values())),
)
def test_evaluation_routing_reads_nothing_on_the_host(router):
    with FakeTensorMode():
        model = MoETransformer(tiny_model(), RouterConfig.from_mapping(router)).eval()
        idx = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
        with torch.no_grad():
            model(idx, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_switch_jitter_trains_without_host_reads(dtype):
    train_step_without_data({"name": "switch", "jitter_eps": 0.01}, dtype)


# --------------------------------------------------------------------------- evaluation JSON and analysis


def check_ranges(result: dict) -> None:
    for mapping in (result, *result["per_layer"]):
        for key, value in mapping.items():
            limits = contract.metric_range(key)
            if limits is not None and value is not None:
                assert value in limits, (key, value)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_shards):
    """A tiny Switch run and a tiny expert-choice run, trained and evaluated on both splits."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for name in ("switch", "expert_choice"):
        cfg = tiny_run(tiny_shards, name, max_steps=6)
        cfg = dataclasses.replace(cfg, eval=EvalConfig(max_blocks={"validation": 12, "test": 12}))
        run_dir = root / name / "seed0"
        train(cfg, run_dir)
        results[name] = (run_dir, cfg, evaluate_splits(run_dir, list(contract.EVAL_SPLITS)))
        for split, result in results[name][2].items():
            (run_dir / contract.eval_file(split)).write_text(json.dumps(result))
    return results


NEW_KEYS = (
    "requested_gini",
    "requested_maxvio_global",
    "assignment_drop_rate",
    "experts_per_token",
    "causal_routing",
    "ppl_noncausal",
    "word_ppl_noncausal",
    "nll_noncausal",
)


def test_switch_evaluation_reports_requested_load_and_drops_within_range(evaluated):
    run_dir, cfg, results = evaluated["switch"]
    recorded = yaml.safe_load((run_dir / contract.RUN_CONFIG).read_text())["router"]
    assert recorded["eval_capacity_factor"] == 2.0 and recorded["capacity_factor"] == 1.25
    for result in results.values():
        assert set(NEW_KEYS) <= set(result)
        check_ranges(result)
        assert result["causal_routing"] == 1.0 and result["ppl_noncausal"] is None
        assert result["n_active_params"] < result["n_params"]
        for layer in result["per_layer"]:
            assert sum(layer["requested_load"]) == result["tokens"]  # one request per valid token
            assert sum(layer["load"]) <= sum(layer["requested_load"])
            assert layer["assignment_drop_rate"] == pytest.approx(layer["drop_rate"])
            assert layer["requested_gini"] == pytest.approx(metrics.gini(layer["requested_load"]))


def test_expert_choice_evaluation_reports_the_causal_and_the_noncausal_perplexity(evaluated):
    run_dir, cfg, results = evaluated["expert_choice"]
    for result in results.values():
        assert set(NEW_KEYS) <= set(result)
        check_ranges(result)
        assert result["causal_routing"] == 1.0 and result["requested_gini"] is None
        assert result["ppl_noncausal"] is not None and result["ppl_noncausal"] != result["ppl"]
        assert all(layer["requested_load"] is None for layer in result["per_layer"])
        assert result["gini"] > 0  # thresholds: measured, not balanced by construction
    # The non-causal number is the perplexity of the same evaluation routed over the group.
    model, step, *_ = _load_final(run_dir, cfg, torch.device("cpu"))
    with routing_mode(model, "group"):
        group = _evaluate_split(cfg, model, None, "validation", torch.device("cpu"), step)
    assert group["ppl"] == pytest.approx(results["validation"]["ppl_noncausal"], rel=1e-9)
    assert group["causal_routing"] == 0.0 and group["ppl_noncausal"] == group["ppl"]
    assert group["gini"] == pytest.approx(0.0, abs=0.02)  # top-C of the group: balanced (up to padding)


def test_the_analysis_collects_the_new_columns_generically(evaluated):
    tidy = []
    for name, (run_dir, _, _) in evaluated.items():
        reading = collect.read_run(run_dir, name, 0, routed=True)
        assert reading.status == contract.RUN_OK, reading.detail
        tidy += reading.records
    tidy = pd.DataFrame(tidy)
    model = tidy[tidy["layer"] == collect.MODEL_LEVEL].set_index(["variant", "split", "metric"])["value"]
    assert model["expert_choice", "test", "ppl_noncausal"] > 1
    assert math.isnan(model["switch", "test", "ppl_noncausal"])  # a column for every router, NaN without it
    assert math.isnan(model["expert_choice", "test", "requested_gini"])
    assert (tidy["metric"] == "requested_load_e0").any() and (tidy["metric"] == "load_e0").any()
    assert not ((tidy["variant"] == "expert_choice") & tidy["metric"].str.startswith("requested_load_e")).any()


def test_a_requested_count_out_of_range_fails_the_run(evaluated, tmp_path):
    run_dir, _, results = evaluated["switch"]
    bad = json.loads(json.dumps(results["test"]))
    bad["per_layer"][0]["requested_load"][0] = -1
    bad["ppl_noncausal"] = 0.5
    problems = collect._check_evaluation(bad, "eval_test.json", "switch", 0, "test", True)
    assert "eval_test.json: per_layer/0/requested_load/0 = -1 outside [0, 1e+100]" in problems
    assert "eval_test.json: ppl_noncausal = 0.5 outside (1, 1e+100]" in problems


def test_the_caveat_follows_the_measured_evaluation_routing():
    def summary(rows):
        return pd.DataFrame(
            [dict(variant=v, split="test", metric="causal_routing", n=n, mean=m, kind="variant") for v, n, m in rows]
            + [dict(variant="ngram", split="test", metric="ppl", n=1, mean=90.0, kind="reference baseline")]
        )

    table = summary([("topk", 3, 1.0), ("ec_causal", 3, 1.0), ("ec_group", 3, 0.0), ("old_ec", 0, math.nan)])
    balanced = ["ec_causal", "ec_group", "old_ec"]  # expert choice's declaration: balanced in training
    assert findings.noncausal_variants(table, "test", balanced) == ["ec_group", "old_ec"]
