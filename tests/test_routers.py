"""Routing semantics of every router, checked against direct computations."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from gtmoe import routers
from gtmoe.config import ConfigError, RouterConfig
from gtmoe.ffn import SwiGLU
from gtmoe.model import MoETransformer
from gtmoe.moe import MoELayer
from gtmoe.routers.base import balance_loss, expert_counts

from conftest import tiny_model

D_MODEL, N_EXPERTS, TOP_K = 16, 4, 2
MOE_ROUTERS = ["topk", "switch", "expert_choice", "lossfree", "rdesi"]


def make_router(name: str, **options):
    entry = routers.get(name)
    cfg = RouterConfig.from_mapping({"name": name, **options}).for_horizon(100)
    return entry(cfg.resolve(), D_MODEL, N_EXPERTS, TOP_K)


def test_registry_lists_every_router_and_rejects_unknown_names():
    assert set(routers.known()) >= {"topk", "switch", "expert_choice", "lossfree", "rdesi", "dense"}
    with pytest.raises(ConfigError, match=r"'router.name' = 'topq'.*known routers: dense, dense_total, expert_choice"):
        routers.get("topq")


LABELS = {
    "topk": "top-k",
    "switch": "Switch (top-1)",
    "expert_choice": "expert choice",
    "lossfree": "loss-free",
    "rdesi": "RD-ESI",
    "dense": "dense",
}


def test_describe_gives_each_routers_own_names_for_the_analysis():
    described = {name: routers.describe(name) for name in routers.known()}
    assert json.loads(json.dumps(described)) == described  # goes into study.json as it is
    assert {name: entry["label"] for name, entry in described.items() if name in LABELS} == LABELS
    for entry in described.values():
        assert set(entry) == {"label", "routed", "balanced_by_construction", "terms", "states", "balance_knob"}
    assert "dense" in [name for name, entry in described.items() if not entry["routed"]]
    assert "expert_choice" in [name for name, entry in described.items() if entry["balanced_by_construction"]]
    knobs = {name: described[name]["balance_knob"] for name in ("topk", "switch", "lossfree", "rdesi", "dense")}
    assert knobs == {
        "topk": "aux_loss_coef",
        "switch": "aux_loss_coef",
        "lossfree": "bias_update_rate",
        "rdesi": "gamma",
        "dense": None,
    }
    assert described["rdesi"]["terms"] == {
        "reputation": "reputation β·R",
        "load": "load penalty γ·L̂",
        "bonus": "exploration bonus",
    }
    assert described["rdesi"]["states"] == {
        "reputation": "reputation R",
        "load_hat": "load L̂ = L − 1",
        "bonus": "exploration bonus",
    }
    assert described["lossfree"]["terms"] == described["lossfree"]["states"] == {"bias": "loss-free bias b"}
    assert described["topk"]["terms"] == described["topk"]["states"] == described["dense"]["terms"] == {}


@pytest.mark.parametrize("name", routers.known())
def test_every_declared_balance_knob_is_an_option_of_the_router(name):
    knob = routers.get(name).balance_knob
    assert knob is None or knob in {f.name for f in dataclasses.fields(routers.get(name).Config)}


@pytest.mark.parametrize("name", MOE_ROUTERS)
def test_every_term_and_state_a_router_can_report_has_a_label(name):
    entry, router = routers.get(name), make_router(name)
    terms = getattr(router, "selection_terms", dict)()
    assert set(terms) | set(entry.option_terms.values()) <= set(entry.term_labels)
    routed = router(torch.randn(8, D_MODEL))
    flips = {key.removeprefix("flip_rate_") for key in routed.metrics if key.startswith("flip_rate_")}
    assert flips <= set(entry.term_labels)
    assert list(routers.describe(name)["states"]) == list(entry.state_names) == list(router.logged_state())
    assert set(entry.state_names) <= set(entry.state_labels)


def test_registering_refuses_unlabelled_terms_and_states_and_taken_names(monkeypatch):
    from gtmoe.routers.registry import _REGISTRY, register
    from gtmoe.routers.topk import TopKRouter

    routers.known()  # the package's routers register in the real registry before it is swapped for a copy
    monkeypatch.setattr("gtmoe.routers.registry._REGISTRY", dict(_REGISTRY))

    class Unlabelled(TopKRouter):
        option_terms = {"strength": "push"}
        state_names = ("visits",)

    with pytest.raises(
        ConfigError, match=r"'unlabelled' .*term_labels lacks \['push'\]; state_labels lacks \['visits'\]"
    ):
        register("unlabelled")(Unlabelled)
    with pytest.raises(ConfigError, match=r"router name 'topk' registered twice: gtmoe.routers.topk.TopKRouter and"):
        register("topk")(type("Again", (TopKRouter,), {}))

    Plain = register("plain")(type("Plain", (TopKRouter,), {}))  # no label: the registered name
    assert routers.describe("plain")["label"] == "plain" and Plain.label == "plain"


def test_unknown_router_option_names_the_key():
    with pytest.raises(ConfigError, match=r"router.betta"):
        RouterConfig.from_mapping({"name": "rdesi", "betta": 0.1})
    with pytest.raises(ConfigError, match=r"router.capacity_factor' = 0"):
        RouterConfig.from_mapping({"name": "switch", "capacity_factor": 0})


def test_topk_selects_top_logits_with_softmax_weights_over_the_selected():
    torch.manual_seed(0)
    router = make_router("topk")
    x = torch.randn(10, D_MODEL)
    r = router(x)
    logits = router.gate(x)
    expected = logits.topk(TOP_K, dim=-1)
    assert torch.equal(r.choice, expected.indices)
    assert torch.allclose(r.weight.view(10, TOP_K), torch.softmax(expected.values, dim=-1))
    assert torch.equal(r.token, torch.arange(10).repeat_interleave(TOP_K))


def test_balance_loss_matches_brute_force():
    torch.manual_seed(1)
    logits = torch.randn(20, N_EXPERTS)
    probs = torch.softmax(logits, dim=-1)
    choice = logits.topk(TOP_K, dim=-1).indices
    f = [sum(int((row == i).any()) for row in choice) / (20 * TOP_K) for i in range(N_EXPERTS)]
    P = probs.mean(0)
    expected = N_EXPERTS * sum(f[i] * P[i] for i in range(N_EXPERTS))
    assert balance_loss(probs, choice, N_EXPERTS).item() == pytest.approx(float(expected), rel=1e-6)


def test_rdesi_without_incentives_selects_exactly_what_topk_selects():
    torch.manual_seed(2)
    topk = make_router("topk")
    rdesi = make_router("rdesi", beta=0.0, gamma=0.0, c=0.0)
    rdesi.gate.load_state_dict(topk.gate.state_dict())
    # Give R, L and n non-trivial values: with zero weights they must still not matter.
    rdesi.reputation.copy_(torch.tensor([3.0, -1.0, -1.0, -1.0]))
    rdesi.load_ema.copy_(torch.tensor([0.1, 2.0, 1.0, 0.9]))
    rdesi.usage.copy_(torch.tensor([0.0, 50.0, 3.0, 9.0]))
    rdesi.steps.fill_(60)
    x = torch.randn(64, D_MODEL)
    a, b = topk(x), rdesi(x)
    assert torch.equal(a.choice, b.choice)
    assert torch.equal(a.weight, b.weight)


def test_rdesi_incentives_steer_selection_but_weights_come_from_the_gate():
    torch.manual_seed(3)
    router = make_router("rdesi", beta=100.0, gamma=0.0, c=0.0)
    router.reputation.copy_(torch.tensor([0.0, 0.0, 1.0, 1.0]))  # reputation dominates the score
    x = torch.randn(32, D_MODEL)
    r = router(x)
    assert set(r.choice.flatten().tolist()) == {2, 3}
    logits = router.gate(x)
    assert torch.allclose(r.weight.view(32, 2), torch.softmax(logits.gather(-1, r.choice), dim=-1))


def test_rdesi_state_update_follows_the_spec():
    torch.manual_seed(4)
    o = dict(alpha=0.2, rho=0.5, lam=0.8)
    router = make_router("rdesi", **o)
    router.train()
    router.reputation.copy_(torch.tensor([0.3, -0.1, -0.1, -0.1]))
    x = torch.randn(40, D_MODEL)
    r = router(x)
    token_loss = torch.rand(40)
    router.observe_token_loss(token_loss)

    counts = expert_counts(r.expert, N_EXPERTS).float()
    perf = token_loss.mean() - token_loss
    before = router.reputation.clone()
    expected_rep = []
    for i in range(N_EXPERTS):
        mask = r.expert == i
        if mask.any():
            expected_rep.append((1 - o["alpha"]) * before[i] + o["alpha"] * perf[r.token[mask]].mean())
        else:
            expected_rep.append(o["rho"] * before[i])
    expected_rep = torch.stack(expected_rep)
    expected_rep -= expected_rep.mean()
    f = counts / counts.sum()

    router.update_state()
    assert torch.allclose(router.reputation, expected_rep, atol=1e-6)
    assert router.reputation.mean().abs() < 1e-6  # kept centred
    assert torch.allclose(router.load_ema, o["lam"] * 1.0 + (1 - o["lam"]) * N_EXPERTS * f)
    assert torch.allclose(router.usage, N_EXPERTS * f)
    assert router.steps.item() == 1
    assert torch.allclose(router.bonus(), router.options.c * torch.sqrt(math.log(2.0) / (N_EXPERTS * f + 1)))
    assert router.step_counts.sum() == 0 and router.perf_count.sum() == 0  # accumulators reset


def test_rdesi_unused_expert_reputation_decays_and_bonus_grows():
    router = make_router("rdesi", rho=0.9, beta=0.0, gamma=0.0, c=1.0)
    router.train()
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 1.0  # expert 0 always wins ...
        router.gate.weight[1] = 0.5  # ... with expert 1; experts 2, 3 starve
    router.reputation.copy_(torch.tensor([0.0, 0.0, 1.0, -1.0]))
    x = torch.rand(16, D_MODEL) + 0.1
    bonuses = []
    for _ in range(3):
        router(x)
        router.observe_token_loss(torch.rand(16))
        router.update_state()
        bonuses.append(router.bonus().clone())
    assert bonuses[-1][2] > bonuses[0][2]  # starved expert's bonus grows
    assert bonuses[-1][2] > bonuses[-1][0]  # and exceeds the busy expert's
    # Starved experts 2 and 3 decayed by rho each step (before re-centring shifts all equally).
    assert (router.reputation[2] - router.reputation[3]).item() == pytest.approx(2.0 * 0.9**3, rel=1e-5)


def test_rdesi_state_is_frozen_in_eval_mode():
    router = make_router("rdesi")
    router.eval()
    router(torch.randn(8, D_MODEL))
    router.observe_token_loss(torch.rand(8))
    assert router.step_counts.sum() == 0 and router.perf_count.sum() == 0


def test_lossfree_bias_moves_toward_balance():
    router = make_router("lossfree", bias_update_rate=0.01)
    router.train()
    torch.manual_seed(8)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.05)
        router.gate.weight[0] += 0.05  # expert 0 overloaded by a logit margin of about 0.4
    x = torch.rand(32, D_MODEL)
    router(x)
    counts = router.step_counts.clone()
    router.update_state()
    assert torch.equal(router.bias, 0.01 * torch.sign(counts.mean() - counts))
    assert router.bias[0] < 0  # the overloaded expert is pushed down
    first = expert_counts(router(x).expert, N_EXPERTS)
    for _ in range(300):
        router(x)
        router.update_state()
    later = expert_counts(router(x).expert, N_EXPERTS)
    assert later.max() - later.min() < first.max() - first.min()


def test_expert_choice_gives_every_expert_exactly_capacity_tokens():
    torch.manual_seed(5)
    router = make_router("expert_choice", capacity_factor=1.0)
    x = torch.randn(30, D_MODEL)
    r = router(x)
    capacity = math.ceil(30 * TOP_K / N_EXPERTS)
    assert torch.equal(expert_counts(r.expert, N_EXPERTS), torch.full((N_EXPERTS,), capacity))
    probs = torch.softmax(router.gate(x), dim=-1)
    for e in range(N_EXPERTS):
        chosen = set(r.token[r.expert == e].tolist())
        assert chosen == set(probs[:, e].topk(capacity).indices.tolist())


def test_switch_drops_tokens_beyond_capacity_in_token_order():
    router = make_router("switch", capacity_factor=1.0)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[1, 0] = 1.0  # every token (x[:,0] > 0) prefers expert 1
    x = torch.rand(20, D_MODEL) + 0.1
    r = router(x)
    capacity = math.ceil(20 / N_EXPERTS)
    assert torch.equal(r.expert[:capacity], torch.ones(capacity, dtype=torch.long))
    assert (r.expert[capacity:] == N_EXPERTS).all()  # dropped
    layer = MoELayer(router, D_MODEL, 8, N_EXPERTS)
    y = layer(x)
    assert torch.equal(y[capacity:], torch.zeros_like(y[capacity:]))  # dropped tokens skip the layer
    assert y[:capacity].abs().sum() > 0


@pytest.mark.parametrize("name", MOE_ROUTERS)
def test_moe_layer_matches_a_per_token_reference(name):
    torch.manual_seed(6)
    router = make_router(name)
    layer = MoELayer(router, D_MODEL, 8, N_EXPERTS)
    for w in layer.experts.parameters():
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(24, D_MODEL)
    y = layer(x)
    r = layer.last_routing
    expected = torch.zeros_like(x)
    e = layer.experts
    for t, i, w in zip(r.token.tolist(), r.expert.tolist(), r.weight):
        if i < N_EXPERTS:
            h = torch.nn.functional.silu(x[t] @ e.w1[i]) * (x[t] @ e.w3[i])
            expected[t] += w * (h @ e.w2[i])
    assert torch.allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("name", MOE_ROUTERS + ["dense"])
def test_gradients_reach_router_and_experts(name):
    torch.manual_seed(7)
    model = MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": name}).for_horizon(100))
    idx = torch.randint(0, 300, (2, 16))
    out = model(idx, idx)
    (out.loss + out.router_loss).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name
    if name == "dense":
        assert not model.moe_layers and all(isinstance(b.ffn, SwiGLU) for b in model.blocks)


def test_dense_has_the_active_parameters_of_a_topk_moe():
    dense = MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": "dense"}))
    moe = MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": "topk"}))
    cfg = tiny_model()
    gates = cfg.n_layers * cfg.d_model * cfg.n_experts
    assert moe.parameter_counts()[1] - gates == dense.parameter_counts()[1] == dense.parameter_counts()[0]


@pytest.mark.parametrize("name", ["lossfree", "rdesi"])
def test_router_buffers_are_saved_and_restored(name):
    model = MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": name}).for_horizon(100))
    router = model.moe_layers[0].router
    for buffer in router.state_dict().values():
        buffer.add_(torch.rand_like(buffer.float()).to(buffer.dtype))
    state = model.state_dict()
    restored = MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": name}).for_horizon(100))
    restored.load_state_dict(state)
    for key, value in router.state_dict().items():
        assert torch.equal(restored.moe_layers[0].router.state_dict()[key], value), key
