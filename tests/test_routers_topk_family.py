"""The top-k family against its papers' formulas, each recomputed here with plain loops:
top-k (unchanged), loss-free balancing (Wang et al. 2024; bias on the gate scores or, as before, on the
logits), DeepSeek-V3's sigmoid top-k with its sequence-wise balance loss, and expert capacity (drop,
re-route) for every token-choice router of the family."""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gtmoe import routers
from gtmoe.config import ConfigError, RouterConfig, TrainConfig
from gtmoe.model import MoETransformer
from gtmoe.routers.base import balance_loss
from gtmoe.routers.capacity import expert_capacity
from gtmoe.routers.lossfree import PAPER_BIAS_UPDATE_RATE
from gtmoe.step import build_optimizer, train_step

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model
from helpers import default_dtype

D_MODEL, N_EXPERTS, TOP_K = 16, 6, 2


def make_router(name: str, n_experts: int = N_EXPERTS, top_k: int = TOP_K, max_steps: int = 100, **options):
    cfg = RouterConfig.from_mapping({"name": name, **options}).for_horizon(max_steps)
    return routers.get(name)(cfg.resolve(), D_MODEL, n_experts, top_k)


def tokens(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(seed))


def gate_logits(router, x: torch.Tensor) -> list[list[float]]:
    """g = x W_g^T, as Python floats."""
    return (x @ router.gate.weight.detach().t()).tolist()


def softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def top_k_of(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values, largest first."""
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def chosen_sets(routing) -> list[set[int]]:
    return [set(row) for row in routing.choice.tolist()]


def weights_by_expert(routing, k: int) -> list[dict[int, float]]:
    """Per token: expert -> weight, from the token-major assignments."""
    expert, weight = routing.expert.tolist(), routing.weight.detach().tolist()
    return [{expert[t * k + j]: weight[t * k + j] for j in range(k)} for t in range(len(expert) // k)]


# --- top-k: the refactor into hooks changed nothing -------------------------------------------------------


def test_topk_routing_weights_and_losses_are_unchanged():
    router = make_router("topk").train()
    x = tokens()
    routing = router(x)
    logits = x @ router.gate.weight.t()  # the reference: top-k of g, softmax of g over the chosen
    choice = logits.topk(TOP_K, dim=-1).indices
    assert torch.equal(routing.choice, choice)
    assert torch.equal(routing.expert, choice.reshape(-1))
    assert torch.equal(routing.token, torch.arange(len(x)).repeat_interleave(TOP_K))
    assert torch.allclose(routing.weight, torch.softmax(logits.gather(-1, choice), dim=-1).reshape(-1), atol=1e-6)
    aux = balance_loss(torch.softmax(logits, dim=-1), choice, N_EXPERTS)
    z = torch.logsumexp(logits, dim=-1).square().mean()
    assert torch.allclose(routing.loss, 0.01 * aux + 0.001 * z, atol=1e-6)
    assert set(routing.metrics) == {"aux_loss", "z_loss"}  # no capacity metrics when dropless


# --- loss-free balancing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_lossfree_selects_on_scores_plus_bias_and_weights_by_the_scores(score_function):
    router = make_router("lossfree", score_function=score_function)
    bias = torch.tensor([0.3, -0.2, 0.0, 0.15, -0.05, 0.1])
    router.bias.copy_(bias)
    x = tokens()
    routing = router(x)
    weights = weights_by_expert(routing, TOP_K)
    for t, row in enumerate(gate_logits(router, x)):
        s = softmax_row(row) if score_function == "softmax" else [sigmoid(v) for v in row]
        chosen = top_k_of([s[i] + float(bias[i]) for i in range(N_EXPERTS)], TOP_K)
        assert chosen_sets(routing)[t] == set(chosen)
        for i in chosen:  # s_i as it is: no bias, no renormalisation (Wang et al. Eq. 3)
            assert weights[t][i] == pytest.approx(s[i], abs=1e-6)


def test_lossfree_bias_is_in_score_units_not_logit_units():
    router = make_router("lossfree", top_k=1, n_experts=4)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[:, 0] = torch.tensor([2.0, 0.0, -1.0, -3.0])  # g = x_0 * that row
    x = torch.zeros(1, D_MODEL)
    x[0, 0] = 1.0
    router.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # On the scores, 0.11 + 1 beats 0.84; on the logits, 0 + 1 would not beat 2.
    assert router(x).choice.item() == 1
    legacy = make_router("lossfree", top_k=1, n_experts=4, bias_on="logits")
    legacy.load_state_dict(router.state_dict())
    assert legacy(x).choice.item() == 0


def test_lossfree_update_moves_each_bias_by_u_against_its_load():
    router = make_router("lossfree", bias_update_rate=0.002).train()
    start = torch.tensor([0.1, 0.0, -0.1, 0.0, 0.05, 0.0])
    router.bias.copy_(start)
    counts = [9.0, 3.0, 5.0, 5.0, 1.0, 7.0]  # mean 5
    router.step_counts.copy_(torch.tensor(counts))
    router.update_state()
    mean = sum(counts) / len(counts)
    expected = [float(start[i]) + 0.002 * ((mean > c) - (mean < c)) for i, c in enumerate(counts)]
    assert router.bias.tolist() == pytest.approx(expected, abs=1e-7)
    assert router.step_counts.sum().item() == 0  # the step's statistics are consumed


def test_lossfree_default_rate_is_the_papers_and_does_not_depend_on_the_run_length():
    for max_steps in (100, 10_000):
        cfg = RouterConfig.from_mapping({"name": "lossfree"}).for_horizon(max_steps)
        assert cfg.to_dict()["bias_update_rate"] == PAPER_BIAS_UPDATE_RATE == 1e-3
        assert cfg.to_dict()["bias_on"] == "scores" and cfg.to_dict()["score_function"] == "softmax"
    unresolved = RouterConfig.from_mapping({"name": "lossfree"}).resolve()  # no horizon needed
    assert routers.get("lossfree")(unresolved, D_MODEL, N_EXPERTS, TOP_K).bias_update_rate == 1e-3


def test_lossfree_logits_form_reproduces_the_earlier_router():
    short = RouterConfig.from_mapping({"name": "lossfree", "bias_on": "logits"}).for_horizon(200)
    assert short.to_dict()["bias_update_rate"] == pytest.approx(10.0 / 200)  # bias_travel / max_steps
    travel = RouterConfig.from_mapping({"name": "lossfree", "bias_on": "logits", "bias_travel": 4.0})
    assert travel.for_horizon(200).to_dict()["bias_update_rate"] == pytest.approx(4.0 / 200)
    with pytest.raises(ValueError, match="bias_update_rate is unset"):
        routers.get("lossfree")(travel.resolve(), D_MODEL, N_EXPERTS, TOP_K)

    router = make_router("lossfree", bias_on="logits", max_steps=200).train()
    bias = torch.tensor([0.5, -0.4, 0.0, 0.2, -0.1, 0.3])
    router.bias.copy_(bias)
    x = tokens()
    routing = router(x)
    logits = x @ router.gate.weight.t()  # the earlier router: top-k of g + b, softmax of g over the chosen
    choice = (logits + bias).topk(TOP_K, dim=-1).indices
    assert torch.equal(routing.choice, choice)
    assert torch.allclose(routing.weight, torch.softmax(logits.gather(-1, choice), dim=-1).reshape(-1), atol=1e-6)
    router.update_state()
    counts = torch.bincount(choice.reshape(-1), minlength=N_EXPERTS).float()
    assert torch.allclose(router.bias, bias + 10.0 / 200 * torch.sign(counts.mean() - counts))


@pytest.mark.parametrize("name,options", [("lossfree", {}), ("lossfree", {"bias_on": "logits"}), ("sigmoid_topk", {})])
def test_flip_rate_of_the_bias_is_measured_where_the_bias_is_added(name, options):
    router = make_router(name, **options)
    bias = torch.tensor([0.4, -0.3, 0.05, 0.0, -0.2, 0.25])
    router.bias.copy_(bias)
    x = tokens(60, seed=3)
    valid = torch.arange(60) % 5 != 0
    rate = router(x, valid).metrics["flip_rate_bias"].item()
    flipped = 0
    for t, row in enumerate(gate_logits(router, x)):
        if name == "sigmoid_topk":
            s = [sigmoid(v) for v in row]
        else:
            s = softmax_row(row) if options.get("bias_on", "scores") == "scores" else row
        with_bias = set(top_k_of([s[i] + float(bias[i]) for i in range(N_EXPERTS)], TOP_K))
        flipped += bool(valid[t]) and with_bias != set(top_k_of(s, TOP_K))
    assert 0 < rate < 1
    assert rate == pytest.approx(flipped / int(valid.sum()), abs=1e-6)


# --- sigmoid top-k (DeepSeek-V3) --------------------------------------------------------------------------


def test_sigmoid_topk_selects_on_affinity_plus_bias_and_normalises_the_weights():
    router = make_router("sigmoid_topk", n_experts=8, top_k=3, weight_scale=2.5)
    bias = torch.tensor([0.2, -0.1, 0.0, 0.3, -0.2, 0.1, 0.0, -0.3])
    router.bias.copy_(bias)
    x = tokens()
    routing = router(x)
    weights = weights_by_expert(routing, 3)
    for t, row in enumerate(gate_logits(router, x)):
        s = [sigmoid(v) for v in row]
        chosen = top_k_of([s[i] + float(bias[i]) for i in range(8)], 3)
        assert chosen_sets(routing)[t] == set(chosen)
        total = sum(s[i] for i in chosen)
        for i in chosen:
            assert weights[t][i] == pytest.approx(2.5 * s[i] / total, abs=1e-6)
    assert routing.loss.item() == 0  # defaults: no GShard loss, no z-loss, no sequence-wise loss
    assert router.bias_update_rate == 1e-3


def reference_sequence_loss(router, x, batch: int, seq: int, valid: list[bool], k: int) -> float:
    """DeepSeek-V3 Eqs. 17-20 without alpha, one sequence at a time, averaged over the sequences."""
    rows = gate_logits(router, x)
    n_experts = len(rows[0])
    total, counted = 0.0, 0
    for b in range(batch):
        positions = [b * seq + t for t in range(seq) if valid[b * seq + t]]
        if not positions:  # all padding: no loss of its own
            continue
        counted += 1
        f = [0.0] * n_experts
        p = [0.0] * n_experts
        for pos in positions:
            s = [sigmoid(v) for v in rows[pos]]
            for i in top_k_of(s, k):  # TopK of the affinities themselves (Eq. 18: no bias)
                f[i] += n_experts / (k * len(positions))
            for i in range(n_experts):
                p[i] += s[i] / sum(s) / len(positions)
        total += sum(f[i] * p[i] for i in range(n_experts))
    return total / counted


def test_sigmoid_topk_sequence_wise_balance_loss_matches_the_paper():
    batch, seq, k = 4, 7, 2
    router = make_router("sigmoid_topk", seq_aux_loss_coef=0.05).train()
    router.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.0, 0.2, -0.2]))  # must not enter f_i
    x = tokens(batch * seq, seed=5)
    # A padded tail in sequence 1; sequence 3 is all padding.
    valid = [not ((b == 1 and t >= 4) or b == 3) for b in range(batch) for t in range(seq)]
    router.observe_batch(torch.zeros(batch, seq, dtype=torch.long), None)
    routing = router(x, torch.tensor(valid))
    expected = reference_sequence_loss(router, x, batch, seq, valid, k)
    assert routing.metrics["seq_aux_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert routing.loss.item() == pytest.approx(0.05 * expected, rel=1e-5)
    # Per sequence, not over the whole group: one sequence of 21 gives another number.
    router.observe_batch(torch.zeros(1, batch * seq, dtype=torch.long), None)
    whole = router(x, torch.tensor(valid)).metrics["seq_aux_loss"].item()
    assert whole == pytest.approx(reference_sequence_loss(router, x, 1, batch * seq, valid, k), rel=1e-5)
    assert whole != pytest.approx(expected, rel=1e-3)
    routing.loss.backward()  # P_i carries the gradient to the gate
    assert router.gate.weight.grad.abs().sum() > 0
    assert "seq_aux_loss" not in router.eval()(x).metrics  # a training loss only


# --- capacity ---------------------------------------------------------------------------------------------


def sequential_drop(choice: list[list[int]], valid: list[bool], capacity: int, n_experts: int) -> list[list[int]]:
    """Token by token, slot by slot: an assignment keeps its expert while the expert has room."""
    room = [capacity] * n_experts
    routed = []
    for t, row in enumerate(choice):
        out = []
        for e in row:
            if valid[t] and room[e] > 0:
                room[e] -= 1
                out.append(e)
            else:
                out.append(n_experts)
        routed.append(out)
    return routed


def rounds_reroute(selection, choice, valid, capacity: int, n_experts: int) -> list[list[int]]:
    """Capacity-limited routing with overflow re-routing, written as loops: first every token's own choices
    (sequential_drop), then round r offers each token's r-th best unchosen expert to its first unplaced slot,
    tokens in order; the expert takes it while it has room."""
    routed = sequential_drop(choice, valid, capacity, n_experts)
    room = [capacity - sum(row.count(e) for row in routed) for e in range(n_experts)]
    k = len(choice[0])
    unchosen = [[e for e in top_k_of(selection[t], n_experts) if e not in choice[t]] for t in range(len(choice))]
    for r in range(n_experts - k):
        for t in range(len(choice)):
            slots = [j for j in range(k) if routed[t][j] == n_experts]
            if not valid[t] or not slots:
                continue
            e = unchosen[t][r]
            if room[e] > 0:
                room[e] -= 1
                routed[t][slots[0]] = e
    return routed


@pytest.mark.parametrize("policy", ["drop", "reroute"])
@pytest.mark.parametrize("name", ["topk", "lossfree", "sigmoid_topk", "rdesi"])
def test_capacity_matches_a_brute_force_reference(name, policy):
    n_tokens, factor = 48, 0.8
    router = make_router(name, capacity_factor=factor, capacity_policy=policy)
    with torch.no_grad():  # a skewed gate, so that several experts overflow
        router.gate.weight[0] += 1.5
        router.gate.weight[1] += 0.8
    x = tokens(n_tokens, seed=7)
    x[:, : D_MODEL // 2] = x[:, : D_MODEL // 2].abs()
    valid = [t % 7 != 3 for t in range(n_tokens)]  # padding scattered through the group
    routing = router(x, torch.tensor(valid))

    capacity = expert_capacity(factor, n_tokens, TOP_K, N_EXPERTS)
    assert capacity == math.ceil(0.8 * 48 * 2 / 6)
    logits = x @ router.gate.weight.detach().t()
    selection = router.scores(logits) + (0 if router.selection_bias() is None else router.selection_bias())
    choice = routing.choice.tolist()
    assert choice == router.select(selection).tolist()  # the router's own preference, before capacity
    if policy == "drop":
        expected = sequential_drop(choice, valid, capacity, N_EXPERTS)
    else:
        expected = rounds_reroute(selection.tolist(), choice, valid, capacity, N_EXPERTS)
    assert routing.expert.view(n_tokens, TOP_K).tolist() == expected
    assert torch.equal(routing.token, torch.arange(n_tokens).repeat_interleave(TOP_K))  # token-major

    flat = [e for row in expected for e in row]
    assert max(flat.count(e) for e in range(N_EXPERTS)) <= capacity
    assert all(len({e for e in row if e < N_EXPERTS}) == sum(e < N_EXPERTS for e in row) for row in expected)
    live = [(t, j) for t in range(n_tokens) for j in range(TOP_K) if valid[t]]
    dropped = sum(expected[t][j] == N_EXPERTS for t, j in live) / len(live)
    rerouted = sum(N_EXPERTS != expected[t][j] != choice[t][j] for t, j in live) / len(live)
    assert dropped > 0 and (rerouted > 0) == (policy == "reroute")
    assert routing.metrics["dropped_share"].item() == pytest.approx(dropped)
    assert routing.metrics["rerouted_share"].item() == pytest.approx(rerouted)


def test_rerouted_slots_are_weighted_as_their_new_expert():
    router = make_router("topk", capacity_factor=0.5, capacity_policy="reroute")
    with torch.no_grad():
        router.gate.weight[0] += 2.0
    x = tokens(30, seed=2).abs()
    routing = router(x)
    logits = (x @ router.gate.weight.detach().t()).tolist()
    routed = routing.expert.view(30, TOP_K).tolist()
    for t, row in enumerate(routed):
        # dropped slots keep their chosen expert's share (weight 0 in the layer); re-routed ones take the new one's
        experts = [e if e < N_EXPERTS else routing.choice[t, j].item() for j, e in enumerate(row)]
        expected = softmax_row([logits[t][e] for e in experts])
        assert routing.weight[t * TOP_K : (t + 1) * TOP_K].tolist() == pytest.approx(expected, abs=1e-6)


def test_padding_takes_no_capacity():
    router = make_router("topk", capacity_factor=1.0)
    x = tokens(24, seed=4)
    valid = torch.arange(24) < 12
    padded = router(x, valid)
    assert (padded.expert.view(24, TOP_K)[12:] == N_EXPERTS).all()  # padding dropped, not queued
    # The first 12 tokens see the same capacity (of the whole group) and no queue from the padding.
    capacity = expert_capacity(1.0, 24, TOP_K, N_EXPERTS)
    expected = sequential_drop(padded.choice.tolist(), valid.tolist(), capacity, N_EXPERTS)
    assert padded.expert.view(24, TOP_K).tolist() == expected


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,key",
    [
        ({"name": "topk", "capacity_policy": "overflow"}, "router.capacity_policy"),
        ({"name": "topk", "capacity_factor": 0.0}, "router.capacity_factor"),
        ({"name": "rdesi", "capacity_factor": -1.0}, "router.capacity_factor"),
        ({"name": "lossfree", "bias_update_rate": -1e-3}, "router.bias_update_rate"),
        ({"name": "lossfree", "score_function": "tanh"}, "router.score_function"),
        ({"name": "lossfree", "bias_on": "weights"}, "router.bias_on"),
        ({"name": "lossfree", "score_function": "sigmoid", "bias_on": "logits"}, "router.score_function"),
        ({"name": "lossfree", "bias_travel": 10.0}, "router.bias_travel"),
        ({"name": "lossfree", "bias_on": "logits", "bias_travel": 0.0}, "router.bias_travel"),
        ({"name": "lossfree", "aux_loss_coef": -0.1}, "router.aux_loss_coef"),
        ({"name": "sigmoid_topk", "seq_aux_loss_coef": -1e-4}, "router.seq_aux_loss_coef"),
        ({"name": "sigmoid_topk", "weight_scale": 0.0}, "router.weight_scale"),
        ({"name": "sigmoid_topk", "bias_update_rate": -1.0}, "router.bias_update_rate"),
        ({"name": "sigmoid_topk", "z_loss_coef": -1.0}, "router.z_loss_coef"),
        ({"name": "sigmoid_topk", "score_function": "softmax"}, "router.score_function"),  # fixed: not an option
        ({"name": "sigmoid_topk", "capacity_policy": "spill"}, "router.capacity_policy"),
    ],
)
def test_invalid_options_give_one_error_naming_the_key(options, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RouterConfig.from_mapping(options)


def test_the_family_declares_its_knobs_and_terms():
    described = routers.describe("sigmoid_topk")
    assert described["balance_knob"] == "bias_update_rate" and described["terms"] == {"bias": "loss-free bias b"}
    assert routers.describe("lossfree")["balance_knob"] == "bias_update_rate"
    for name in ("topk", "lossfree", "sigmoid_topk", "rdesi"):
        options = RouterConfig.from_mapping({"name": name}).resolve()
        assert options.capacity_factor is None and options.capacity_policy == "drop"  # dropless by default


# --- the training loop ------------------------------------------------------------------------------------

TRAINING_VARIANTS = [
    {"name": "lossfree"},
    {"name": "lossfree", "score_function": "sigmoid", "capacity_factor": 1.0},
    {"name": "sigmoid_topk", "seq_aux_loss_coef": 1e-3, "capacity_factor": 1.0, "capacity_policy": "reroute"},
    {"name": "topk", "capacity_factor": 1.0, "capacity_policy": "reroute"},
    {"name": "rdesi", "capacity_factor": 1.25},
]


def fake_train_steps(router: dict, dtype: torch.dtype) -> None:
    """Two of the trainer's optimizer steps on fake tensors, which carry shapes but no data: any host read
    (.item(), a boolean mask, nonzero, a data-dependent shape) raises."""
    with FakeTensorMode():
        with default_dtype(dtype):  # fake parameters cannot be cast later
            model = MoETransformer(tiny_model(), RouterConfig.from_mapping(router).for_horizon(100)).train()
        tcfg = TrainConfig(grad_accum=1, grad_clip=1.0)
        optimizer = build_optimizer(model, tcfg)
        idx = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
        for _ in range(2):
            train_step(model, model, optimizer, [(idx, idx)], tcfg, idx.device)


@pytest.mark.parametrize("router", TRAINING_VARIANTS, ids=lambda r: "-".join(map(str, r.values())))
def test_training_steps_are_finite_and_read_nothing_on_the_host(router):
    # bf16 (the other grouped-GEMM branch) once, for the variant that takes every new path.
    for dtype in (torch.float32, torch.bfloat16) if router["name"] == "sigmoid_topk" else (torch.float32,):
        fake_train_steps(router, dtype)

    torch.manual_seed(0)
    model = MoETransformer(tiny_model(), RouterConfig.from_mapping(router).for_horizon(10)).train()
    tcfg = TrainConfig(grad_accum=1, grad_clip=1.0)
    optimizer = build_optimizer(model, tcfg)
    idx = torch.randint(0, TINY_VOCAB, (4, TINY_SEQ), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        result = train_step(model, model, optimizer, [(idx[:, :-1], idx[:, 1:])], tcfg, idx.device)
        assert bool(result.finite)
    if "capacity_factor" in router:
        assert {"dropped_share", "rerouted_share"} <= set(result.router_metrics)
    if router["name"] in ("lossfree", "sigmoid_topk"):
        assert all(layer.router.bias.abs().sum() > 0 for layer in model.moe_layers)  # the bias moved
