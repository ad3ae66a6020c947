"""Routers from the MoE literature (noisy_topk, group_limited, hash, sbase, softmax_all), each checked against
an independent computation of its paper's formulas (plain loops, written here from the papers)."""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gtmoe import routers
from gtmoe.config import ConfigError, RouterConfig, RunConfig, TrainConfig
from gtmoe.data.shards import TokenBlocks
from gtmoe.loss import IGNORE_INDEX
from gtmoe.model import MoETransformer
from gtmoe.moe import MoELayer
from gtmoe.routers.hash import balanced_map
from gtmoe.step import build_optimizer, train_step

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model

D_MODEL = 16
LITERATURE = ["noisy_topk", "group_limited", "hash", "sbase", "softmax_all"]


def make_router(name: str, n_experts: int = 4, top_k: int = 2, vocab_size: int = TINY_VOCAB, **options):
    """The router one MoE layer of a (d_model 16) model with these sizes builds, in training mode."""
    model_cfg = tiny_model(d_model=D_MODEL, n_experts=n_experts, top_k=top_k, vocab_size=vocab_size)
    cfg = RouterConfig.from_mapping({"name": name, **options})
    return routers.get(name).build(cfg.resolve(), model_cfg).train()


def model_for(name: str, **options) -> MoETransformer:
    return MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": name, **options}).for_horizon(100))


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def cv_squared(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values) / (mean**2 + 1e-10)


# --- registry ----------------------------------------------------------------------------------------------


def test_the_literature_routers_are_registered_with_labels_and_knobs():
    described = {name: routers.describe(name) for name in LITERATURE}
    assert {name: d["label"] for name, d in described.items()} == {
        "noisy_topk": "noisy top-k",
        "group_limited": "group-limited top-k",
        "hash": "hash (balanced)",
        "sbase": "S-BASE (Sinkhorn)",
        "softmax_all": "softmax over all experts",
    }
    assert {name: d["balance_knob"] for name, d in described.items()} == {
        "noisy_topk": "load_loss_coef",
        "group_limited": "aux_loss_coef",
        "hash": None,
        "sbase": "sinkhorn_iters",
        "softmax_all": None,
    }
    assert [name for name, d in described.items() if d["balanced_by_construction"]] == ["softmax_all"]
    assert all(d["routed"] for d in described.values())


@pytest.mark.parametrize(
    ("name", "active"), [("noisy_topk", 2), ("group_limited", 2), ("hash", 2), ("sbase", 2), ("softmax_all", 4)]
)
def test_active_experts_per_token(name, active):
    model = model_for(name)
    assert model.moe_layers[0].router.active_experts_per_token() == active
    total, active_params = model.parameter_counts()
    per_expert = sum(p[0].numel() for p in model.moe_layers[0].experts.parameters())
    assert total - active_params == len(model.moe_layers) * per_expert * (4 - active)


# --- noisy top-k (Shazeer et al. 2017) ---------------------------------------------------------------------


def noisy_topk_reference(x, w_gate, w_noise, eps, valid, k, noise_epsilon, w_importance, w_load):
    """Choices, weights and the two losses from §2.1 and Appendix A, one token and one expert at a time."""
    n_tokens, n_experts = eps.shape
    choices, weights, importance, load = [], [], [0.0] * n_experts, [0.0] * n_experts
    for t in range(n_tokens):
        clean = [float(x[t] @ w_gate[i]) for i in range(n_experts)]
        std = [math.log1p(math.exp(float(x[t] @ w_noise[i]))) + noise_epsilon for i in range(n_experts)]
        h = [clean[i] + float(eps[t, i]) * std[i] for i in range(n_experts)]
        top = sorted(range(n_experts), key=lambda i: -h[i])[:k]
        exp = [math.exp(h[i] - h[top[0]]) for i in top]
        gate = {i: e / sum(exp) for i, e in zip(top, exp)}
        choices.append(top)
        weights.append([gate[i] for i in top])
        if not valid[t]:
            continue
        for i in range(n_experts):
            others = sorted((h[j] for j in range(n_experts) if j != i), reverse=True)
            kth_excluding = others[k - 1]  # the k-th greatest of H leaving out component i
            load[i] += normal_cdf((clean[i] - kth_excluding) / std[i])
            importance[i] += gate.get(i, 0.0)
    loss = w_importance * cv_squared(importance) + w_load * cv_squared(load)
    return choices, weights, cv_squared(importance), cv_squared(load), loss


def test_noisy_topk_matches_the_papers_gate_and_losses():
    torch.manual_seed(0)
    options = dict(importance_loss_coef=0.3, load_loss_coef=0.7, noise_epsilon=0.05)
    router = make_router("noisy_topk", n_experts=6, top_k=2, **options)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.3)
        router.noise.weight.normal_(std=0.3)
    x = torch.randn(40, router.gate.in_features)
    valid = torch.ones(40, dtype=torch.bool)
    valid[-7:] = False  # padding: routed, but in neither loss

    torch.manual_seed(11)
    eps = torch.randn(40, 6)  # the draw the router makes next, from the same generator state
    torch.manual_seed(11)
    r = router(x, valid)

    w_gate, w_noise = router.gate.weight.detach().double(), router.noise.weight.detach().double()
    choices, weights, importance, load, loss = noisy_topk_reference(
        x.double(), w_gate, w_noise, eps.double(), valid.tolist(), 2, 0.05, 0.3, 0.7
    )
    assert r.choice.tolist() == choices
    assert torch.allclose(r.weight.view(40, 2).double(), torch.tensor(weights, dtype=torch.float64), atol=1e-5)
    assert r.metrics["importance_loss"].item() == pytest.approx(importance, rel=1e-4)
    assert r.metrics["load_loss"].item() == pytest.approx(load, rel=1e-4)
    assert r.loss.item() == pytest.approx(loss, rel=1e-4)


def test_noisy_topk_load_loss_trains_the_noise_projection_and_padding_counts_in_neither_loss():
    torch.manual_seed(1)
    router = make_router("noisy_topk", importance_loss_coef=0.0, load_loss_coef=1.0)
    x = torch.randn(24, router.gate.in_features)
    router(x).loss.backward()
    assert router.noise.weight.grad.abs().sum() > 0 and router.gate.weight.grad.abs().sum() > 0

    # Padding rows of any value leave both losses unchanged (same noise draw for the shared rows).
    valid = torch.tensor([True] * 20 + [False] * 4)
    padded = torch.cat([x[:20], 50 * torch.randn(4, x.shape[1])])
    torch.manual_seed(5)
    a = router(padded, valid)
    torch.manual_seed(5)
    b = router(torch.cat([x[:20], x[20:]]), valid)
    assert a.metrics["load_loss"].item() == pytest.approx(b.metrics["load_loss"].item(), rel=1e-5)
    assert a.metrics["importance_loss"].item() == pytest.approx(b.metrics["importance_loss"].item(), rel=1e-5)


def test_noisy_topk_evaluates_without_noise():
    torch.manual_seed(2)
    router = make_router("noisy_topk").eval()
    x = torch.randn(16, router.gate.in_features)
    state = torch.get_rng_state()
    a, b = router(x), router(x)
    assert torch.equal(torch.get_rng_state(), state)  # no noise drawn at evaluation
    assert torch.equal(a.choice, b.choice) and torch.equal(a.weight, b.weight)
    top = router.gate(x).topk(2, dim=-1)
    assert torch.equal(a.choice, top.indices)
    assert torch.allclose(a.weight.view(16, 2), torch.softmax(top.values, dim=-1))
    assert a.loss.item() == 0 and "load_loss" not in a.metrics


# --- group-limited (DeepSeek-V2 / V3) -----------------------------------------------------------------------


def group_limited_reference(scores, n_groups, top_groups, k, group_score):
    """Per token: affinities softmax(scores); groups ranked by their max or top-2 sum; top k in the kept."""
    n_experts = len(scores[0])
    size = n_experts // n_groups
    chosen = []
    for row in scores:
        z = sum(math.exp(s) for s in row)
        affinity = [math.exp(s) / z for s in row]
        group_value = []
        for m in range(n_groups):
            members = sorted(affinity[m * size : (m + 1) * size], reverse=True)
            group_value.append(members[0] if group_score == "max" else sum(members[:2]))
        kept = sorted(range(n_groups), key=lambda m: -group_value[m])[:top_groups]
        allowed = [e for e in range(n_experts) if e // size in kept]
        chosen.append(set(sorted(allowed, key=lambda e: -row[e])[:k]))
    return chosen


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize(("n_groups", "top_groups", "top_k"), [(4, 2, 2), (2, 1, 3), (4, 1, 1), (8, 3, 2)])
def test_group_limited_selects_like_the_reference(group_score, n_groups, top_groups, top_k):
    torch.manual_seed(3)
    router = make_router(
        "group_limited", n_experts=8, top_k=top_k, n_groups=n_groups, top_groups=top_groups, group_score=group_score
    )
    scores = 2 * torch.randn(64, 8)
    expected = group_limited_reference(scores.tolist(), n_groups, top_groups, top_k, group_score)
    assert [set(row) for row in router.select(scores).tolist()] == expected


def test_group_limited_scores_groups_by_affinity_not_logits():
    # Group 0 = logits (3, -10), group 1 = (2, 2): top-2 sums of softmax affinities rank group 0 first
    # (e^3 > 2 e^2), sums of logits would rank group 1 first.
    router = make_router("group_limited", n_experts=4, top_k=1, n_groups=2, top_groups=1)
    assert router.select(torch.tensor([[3.0, -10.0, 2.0, 2.0]])).tolist() == [[0]]
    # With the group-1 experts slightly above e^3 / 2 each, group 1 wins and its best expert is taken.
    assert router.select(torch.tensor([[3.0, -10.0, 2.4, 2.5]])).tolist() == [[3]]


def test_group_limited_weights_come_from_the_gate_and_the_limit_binds():
    torch.manual_seed(4)
    router = make_router("group_limited", n_experts=8, top_k=2, n_groups=4, top_groups=1)
    x = torch.randn(32, router.gate.in_features)
    r = router(x)
    logits = router.gate(x)
    assert torch.allclose(r.weight.view(32, 2), torch.softmax(logits.gather(-1, r.choice), dim=-1))
    assert (r.choice[:, 0] // 2 == r.choice[:, 1] // 2).all()  # both experts from the one kept group
    assert r.loss.item() > 0 and "aux_loss" in r.metrics  # the top-k family's balance loss applies


def test_group_limited_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"'router.top_groups' = 5: must be between 1 and router.n_groups = 4"):
        RouterConfig.from_mapping({"name": "group_limited", "top_groups": 5})
    with pytest.raises(ConfigError, match=r"'router.n_groups' = 0: must be >= 1"):
        RouterConfig.from_mapping({"name": "group_limited", "n_groups": 0})
    with pytest.raises(ConfigError, match=r"'router.group_score' = 'sum'"):
        RouterConfig.from_mapping({"name": "group_limited", "group_score": "sum"})
    with pytest.raises(ConfigError, match=r"'router.n_groups' = 4: must divide model.n_experts = 6"):
        RunConfig(model=tiny_model(n_experts=6), router=RouterConfig.from_mapping({"name": "group_limited"})).validate()
    options = RouterConfig.from_mapping({"name": "group_limited", "n_groups": 4, "top_groups": 1}).resolve()
    with pytest.raises(ConfigError, match=r"'variants.glim.router.top_groups' = 1: keeps 2 experts .* model.top_k = 3"):
        options.validate_for_model(tiny_model(n_experts=8, top_k=3), "variants.glim.router")
    options.validate_for_model(tiny_model(n_experts=8, top_k=2), "variants.glim.router")  # fits
    with pytest.raises(ConfigError, match=r"router.n_groups"):  # a model built without RunConfig.validate()
        MoETransformer(tiny_model(n_experts=6), RouterConfig.from_mapping({"name": "group_limited"}))


# --- hash layers (Roller et al. 2021) -----------------------------------------------------------------------


def greedy_reference(counts: list[int], n_experts: int, k: int) -> dict[int, set[int]]:
    """The paper's balanced assignment with a heap: most frequent token first, to the emptiest k buckets."""
    heap = [(0, e) for e in range(n_experts)]
    assignment = {}
    for token in sorted((t for t in range(len(counts)) if counts[t]), key=lambda t: (-counts[t], t)):
        taken = [heapq.heappop(heap) for _ in range(k)]
        assignment[token] = {e for _, e in taken}
        for load, e in taken:
            heapq.heappush(heap, (load + counts[token], e))
    return assignment


def test_hash_balanced_assignment_by_hand_and_against_a_heap_reference():
    # E = 2, k = 1: 10 -> e0; 7 -> e1; 5 -> e1 (7 < 10); 3 -> e0 (10 < 12); 1 -> e1 (12 < 13); unseen: id mod 2.
    assert balanced_map(torch.tensor([10, 7, 5, 3, 1, 0]), 2, 1).flatten().tolist() == [0, 1, 1, 0, 1, 1]
    # E = 3, k = 2: 6 -> {0, 1}; 4 -> {2, 0}; 2 -> {2, 1}.
    assert balanced_map(torch.tensor([6, 4, 2]), 3, 2).tolist() == [[0, 1], [2, 0], [2, 1]]

    rng = np.random.default_rng(0)
    counts = (rng.zipf(1.3, size=500) * (rng.random(500) < 0.8)).clip(max=10**6)  # Zipf-like, some unseen
    for n_experts, k in [(8, 1), (8, 2), (5, 3)]:
        got = balanced_map(torch.tensor(counts), n_experts, k)
        reference = greedy_reference(counts.tolist(), n_experts, k)
        assert {t: set(got[t].tolist()) for t in reference} == reference
        assert all(len(set(row)) == k for row in got.tolist())  # k distinct experts per token
        unseen = [t for t in range(500) if counts[t] == 0]
        assert got[unseen].tolist() == [[(t + j) % n_experts for j in range(k)] for t in unseen]
        loads = np.zeros(n_experts)
        for t, experts in reference.items():
            loads[list(experts)] += counts[t]
        assert loads.max() - loads.min() <= counts.max()  # greedy: within one token's count of balance


def test_hash_counts_exactly_the_routed_train_tokens(tiny_shards):
    blocks = TokenBlocks(tiny_shards / "train")
    counts = blocks.routed_token_counts(TINY_VOCAB, chunk=7)  # a chunk that does not divide the blocks
    expected = np.zeros(TINY_VOCAB, dtype=np.int64)
    for i in range(blocks.n_full_blocks):  # what training routes: the full blocks (DataOrder)
        inputs, targets = blocks.batch([i])
        for token, target in zip(inputs[0].tolist(), targets[0].tolist()):
            if target != IGNORE_INDEX:
                expected[token] += 1
    assert counts.tolist() == expected.tolist() and counts.sum() == blocks.n_full_blocks * blocks.seq_len


def test_hash_routes_each_token_id_through_its_fitted_map():
    torch.manual_seed(6)
    model = model_for("hash")
    counts = torch.randint(0, 50, (TINY_VOCAB,))
    for layer in model.moe_layers:
        assert type(layer.router).wants_train_token_counts
        layer.router.fit_to_token_counts(counts)
    expert_map = balanced_map(counts, 4, 2)
    idx = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
    out = model(idx, idx)
    for layer in model.moe_layers:
        r = layer.last_routing
        assert torch.equal(r.choice, expert_map[idx.flatten()])
        assert torch.equal(r.token, torch.arange(2 * TINY_SEQ).repeat_interleave(2))
        assert torch.equal(r.weight, torch.full((4 * TINY_SEQ,), 0.5))
        assert r.loss.item() == 0 and not list(layer.router.parameters())
    assert out.router_loss.item() == 0 and torch.isfinite(out.loss)

    state = model.state_dict()
    assert torch.equal(state["blocks.1.ffn.router.expert_map"], expert_map)
    restored = model_for("hash")
    restored.load_state_dict(state)
    assert torch.equal(restored.moe_layers[0].router.expert_map, expert_map)


def test_hash_without_token_ids_or_with_bad_counts_says_why():
    router = make_router("hash")
    with pytest.raises(RuntimeError, match=r"routing 8 tokens but observe_batch\(\) gave no token ids"):
        router(torch.randn(8, D_MODEL))
    router.observe_batch(torch.zeros(2, 3, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match=r"gave 6 token ids"):
        router(torch.randn(8, D_MODEL))
    with pytest.raises(ValueError, match=rf"expected \({TINY_VOCAB},\)"):
        router.fit_to_token_counts(torch.ones(5, dtype=torch.long))


def test_hash_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"'router.aux_loss_coef' = 0.01: must be 0: hash routing has no"):
        RouterConfig.from_mapping({"name": "hash", "aux_loss_coef": 0.01})
    with pytest.raises(ConfigError, match=r"'router.z_loss_coef' = -1.0"):
        RouterConfig.from_mapping({"name": "hash", "z_loss_coef": -1.0})


# --- S-BASE (Clark et al. 2022) -----------------------------------------------------------------------------


def sinkhorn_reference(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """The reference's Sinkhorn (Megatron-Core moe_utils.sinkhorn) for a fixed number of iterations, in float64."""
    cost = torch.exp(logits.double())
    d0, d1 = torch.ones(cost.shape[0], dtype=torch.float64), torch.ones(cost.shape[1], dtype=torch.float64)
    for _ in range(n_iters):
        d0 = (1 / d0.numel()) / (torch.sum(d1 * cost, 1) + 1e-8)
        d1 = (1 / d1.numel()) / (torch.sum(d0.unsqueeze(1) * cost, 0) + 1e-8)
    return d1 * cost * d0.unsqueeze(1)


@pytest.mark.parametrize("top_k", [1, 2])
def test_sbase_trains_on_the_top_k_of_the_sinkhorn_plan(top_k):
    torch.manual_seed(7)
    router = make_router("sbase", n_experts=8, top_k=top_k, sinkhorn_iters=5)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.5)
        router.gate.weight[0] += 0.3  # a favoured expert: the plan must move tokens off it
    x = torch.randn(96, router.gate.in_features)
    r = router(x)
    logits = router.gate(x).detach()
    plan = sinkhorn_reference(logits, 5)
    assert [set(row) for row in r.choice.tolist()] == [set(row) for row in plan.topk(top_k, dim=-1).indices.tolist()]
    assert (plan.sum(0) * 8 - 1).abs().max() < 1e-6  # the plan's columns: 1/E each (to the reference's eps)
    greedy = logits.topk(top_k, dim=-1).indices
    assert not torch.equal(r.choice.sort(-1).values, greedy.sort(-1).values)  # balancing changed choices
    if top_k == 1:  # the reference's combine weights: sigmoid for k = 1, softmax over all E for k > 1
        expected = torch.sigmoid(logits.gather(-1, r.choice))
    else:
        expected = torch.softmax(logits, dim=-1).gather(-1, r.choice)
    assert torch.allclose(r.weight.view(96, top_k), expected, atol=1e-6)
    assert r.loss.item() == 0


def test_sbase_balances_in_training_and_takes_the_logits_top_k_in_evaluation():
    torch.manual_seed(8)
    router = make_router("sbase", n_experts=4, top_k=1)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.3)
        router.gate.weight[0] += 0.4
    x = torch.randn(256, router.gate.in_features)
    trained = torch.bincount(router(x).choice.flatten(), minlength=4)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.choice, b.choice) and torch.equal(a.weight, b.weight)
    assert torch.equal(a.choice, router.gate(x).topk(1, dim=-1).indices)
    evaluated = torch.bincount(a.choice.flatten(), minlength=4)
    assert trained.max() - trained.min() < (evaluated.max() - evaluated.min()) / 2
    router.train()
    router.options.sinkhorn_iters = 0  # no iteration: plain top-k of the logits
    assert torch.equal(router(x).choice, a.choice)


def test_sbase_padding_carries_no_mass():
    torch.manual_seed(9)
    router = make_router("sbase", n_experts=4, top_k=2)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.5)
    x = torch.randn(40, router.gate.in_features)
    valid = torch.tensor([True] * 30 + [False] * 10)
    padded = torch.cat([x[:30], 20 * torch.randn(10, x.shape[1])])  # padding that would skew the plan
    assert torch.equal(router(padded, valid).choice[:30], router(x[:30]).choice)


def test_sbase_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"'router.sinkhorn_iters' = -1: must be >= 0"):
        RouterConfig.from_mapping({"name": "sbase", "sinkhorn_iters": -1})
    with pytest.raises(ConfigError, match=r"'router.sinkhorn_iters' = 2.5: must be of type int"):
        RouterConfig.from_mapping({"name": "sbase", "sinkhorn_iters": 2.5})


# --- softmax over all experts --------------------------------------------------------------------------------


def test_softmax_all_mixes_every_expert_by_the_gate_softmax():
    torch.manual_seed(10)
    router = make_router("softmax_all", n_experts=4, top_k=2)
    layer = MoELayer(router, D_MODEL, 8, 4)
    for w in layer.experts.parameters():
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(12, D_MODEL)
    y = layer(x)
    r = layer.last_routing
    assert torch.equal(r.choice, torch.arange(4).expand(12, 4))
    probs = torch.softmax(router.gate(x), dim=-1)
    e = layer.experts
    expected = torch.stack(
        [
            sum(probs[t, i] * ((F.silu(x[t] @ e.w1[i]) * (x[t] @ e.w3[i])) @ e.w2[i]) for i in range(4))
            for t in range(12)
        ]
    )
    assert torch.allclose(y, expected, atol=1e-5)
    assert r.loss.item() == 0


def test_softmax_all_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"'router.aux_loss_coef' = 0.01: must be 0: every expert takes every"):
        RouterConfig.from_mapping({"name": "softmax_all", "aux_loss_coef": 0.01})
    RouterConfig.from_mapping({"name": "softmax_all", "z_loss_coef": 0.001})  # the z-loss still applies


# --- all five: validation, evaluation, training ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("noisy_topk", "importance_loss_coef"),
        ("noisy_topk", "load_loss_coef"),
        ("noisy_topk", "noise_epsilon"),
        ("group_limited", "aux_loss_coef"),
        ("sbase", "z_loss_coef"),
        ("softmax_all", "z_loss_coef"),
    ],
)
def test_negative_coefficients_are_refused_naming_the_key(name, key):
    with pytest.raises(ConfigError, match=rf"'variants.v.router.{key}' = -0.1: must be >= 0"):
        RouterConfig.from_mapping({"name": name, key: -0.1}, "variants.v.router")


@pytest.mark.parametrize("name", LITERATURE)
def test_evaluation_is_deterministic(name):
    torch.manual_seed(12)
    model = model_for(name).eval()
    idx = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
    with torch.no_grad():
        a, b = model(idx), model(idx)
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("name", LITERATURE)
def test_a_few_training_steps_lower_the_loss(name):
    torch.manual_seed(13)
    model = model_for(name).train()
    if name == "hash":
        for layer in model.moe_layers:
            layer.router.fit_to_token_counts(torch.randint(1, 20, (TINY_VOCAB,)))
    tcfg = TrainConfig(grad_accum=1, grad_clip=1.0, lr=1e-2, warmup_steps=1)
    optimizer = build_optimizer(model, tcfg)
    idx = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ))
    losses = [train_step(model, model, optimizer, [(idx, idx)], tcfg, idx.device).loss for _ in range(6)]
    losses = [float(loss) for loss in losses]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]

    out = model(idx, idx)
    (out.loss + out.router_loss).backward()
    for p_name, p in model.named_parameters():  # the experts and every learned gate (hash has none)
        assert p.grad is not None and p.grad.abs().sum() > 0, p_name
