"""RD-ESI's target-relative reputation, the balance loss's scope and padding, shared experts and the dense
references, each checked against a computation written out here with plain loops."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gtmoe import routers
from gtmoe.config import (
    ConfigError,
    ModelConfig,
    RouterConfig,
    RunConfig,
    load_run_config,
    memory_estimate_mb,
    parameter_count,
    save_run_config,
)
from gtmoe.contract import IGNORE_INDEX
from gtmoe.ffn import SwiGLU
from gtmoe.model import MoETransformer
from gtmoe.moe import MoELayer
from gtmoe.step import build_optimizer, train_step

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model

D_MODEL, N_EXPERTS, TOP_K, D_EXPERT = 16, 4, 2, 8


def options(name: str, **values):
    return RouterConfig.from_mapping({"name": name, **values}).for_horizon(100).resolve()


def make_router(name: str, **values):
    cfg = tiny_model(d_model=D_MODEL, n_experts=N_EXPERTS, top_k=TOP_K, d_expert=D_EXPERT)
    return routers.get(name).build(options(name, **values), cfg)


def padded_targets(generator: torch.Generator, batch: int, seq: int, pad_from: dict[int, int]) -> torch.Tensor:
    """Targets (batch, seq) from a small id range (so ids repeat), IGNORE_INDEX from pad_from[row] on."""
    targets = torch.randint(0, 6, (batch, seq), generator=generator)
    for row, start in pad_from.items():
        targets[row, start:] = IGNORE_INDEX
    return targets


# --------------------------------------------------------------------------- RD-ESI performance signals


def reference_reputation_step(reputation, micro_batches, alpha, rho, baseline=None, rate=None):
    """One optimizer step of R by loops over the micro-batches' (routing, targets, token_loss). With
    `baseline` (target id -> running mean loss, updated in place) the target-relative signal, else the
    batch-relative one. Padding (IGNORE_INDEX targets) is credited nowhere and enters no baseline."""
    perf_sum, perf_count, used = [0.0] * N_EXPERTS, [0] * N_EXPERTS, [False] * N_EXPERTS
    step_losses: dict[int, list[float]] = {}
    for routing, targets, token_loss in micro_batches:
        real = [t for t in range(len(targets)) if targets[t] != IGNORE_INDEX]
        batch_mean = sum(float(token_loss[t]) for t in real) / len(real)
        for t in real:
            step_losses.setdefault(int(targets[t]), []).append(float(token_loss[t]))
        for t, e in zip(routing.token.tolist(), routing.expert.tolist()):
            used[e] = True  # padding takes its experts too: it counts as load, not as performance
            if targets[t] == IGNORE_INDEX:
                continue
            base = batch_mean if baseline is None else baseline.get(int(targets[t]), batch_mean)
            perf_sum[e] += base - float(token_loss[t])
            perf_count[e] += 1
    new = []
    for e in range(N_EXPERTS):
        perf = perf_sum[e] / perf_count[e] if perf_count[e] else 0.0
        new.append((1 - alpha) * float(reputation[e]) + alpha * perf if used[e] else rho * float(reputation[e]))
    mean = sum(new) / N_EXPERTS
    if baseline is not None:  # after the whole step: no token was compared with its own step
        for target, losses in step_losses.items():
            m = sum(losses) / len(losses)
            baseline[target] = (1 - rate) * baseline[target] + rate * m if target in baseline else m
    return torch.tensor([r - mean for r in new])


def run_step(router, micro_batches):
    """The model's order of calls for one optimizer step: begin_batch, route, token losses, then update."""
    out = []
    for ids, targets, x, token_loss in micro_batches:
        router.begin_batch(ids, targets)
        routing = router(x)
        router.observe_token_loss(token_loss)
        out.append((routing, targets.reshape(-1).tolist(), token_loss))
    router.update_state()
    return out


def random_micro_batch(generator, pad_from):
    ids = torch.randint(0, TINY_VOCAB, (2, 6), generator=generator)
    targets = padded_targets(generator, 2, 6, pad_from)
    x = torch.randn(12, D_MODEL, generator=generator)
    token_loss = torch.rand(12, generator=generator) * 5 * (targets.reshape(-1) != IGNORE_INDEX)  # 0 at padding
    return ids, targets, x, token_loss


def test_target_relative_reputation_matches_a_loop_reference():
    torch.manual_seed(0)
    alpha, rho, rate = 0.3, 0.8, 0.25
    router = make_router("rdesi", performance="target_relative", alpha=alpha, rho=rho, baseline_rate=rate).train()
    generator = torch.Generator().manual_seed(1)
    baseline: dict[int, float] = {}
    reputation = torch.zeros(N_EXPERTS)
    # Step 1: nothing seen yet (every baseline is the batch mean); step 2: two micro-batches, seen and unseen
    # targets and padding (a row half padded); step 3: a later EMA update of the baseline.
    for pads in ([{1: 4}], [{0: 3}, {}], [{1: 0}, {0: 5}]):
        batches = [random_micro_batch(generator, pad) for pad in pads]
        if pads == [{0: 3}, {}]:
            batches[1][1][1, 0] = 99  # a target never seen before: its baseline is its batch's mean
        routed = run_step(router, batches)
        reputation = reference_reputation_step(reputation, routed, alpha, rho, baseline, rate)
        assert torch.allclose(router.reputation, reputation, atol=1e-5)
        seen = sorted(baseline)
        assert router.target_seen.nonzero().flatten().tolist() == seen
        assert torch.allclose(router.target_loss[seen], torch.tensor([baseline[t] for t in seen]), atol=1e-5)
    assert router.step_target_count.sum() == 0 and router.step_target_loss.sum() == 0  # reset with the step


def test_target_relative_credits_the_expert_not_the_tokens_difficulty():
    # Two targets, one easy (loss 1) and one hard (loss 5) on average; the expert taking the hard word's
    # tokens does a little better than that word's usual loss. batch_relative blames it for the word's
    # difficulty; target_relative credits it.
    signals = {}
    for performance in ("batch_relative", "target_relative"):
        router = make_router("rdesi", performance=performance, alpha=1.0, beta=0.0, gamma=0.0, c=0.0).train()
        with torch.no_grad():
            router.gate.weight.zero_()
            router.gate.weight[0, 0] = router.gate.weight[1, 0] = 1.0  # feature 0 > 0: experts 0, 1
            router.gate.weight[2, 0] = router.gate.weight[3, 0] = -1.0  # feature 0 < 0: experts 2, 3
        x = torch.zeros(8, D_MODEL)
        x[:4, 0], x[4:, 0] = 1.0, -1.0
        ids, targets = torch.zeros(1, 8, dtype=torch.long), torch.tensor([[0] * 4 + [1] * 4])
        for token_loss in (torch.tensor([1.0] * 4 + [5.0] * 4), torch.tensor([1.0] * 4 + [4.5] * 4)):
            router.begin_batch(ids, targets)
            router(x)
            router.observe_token_loss(token_loss)
            router.update_state()
        signals[performance] = router.reputation.clone()
    assert signals["batch_relative"][2] < 0 < signals["batch_relative"][0]  # credits the easy tokens' experts
    assert signals["target_relative"][2] > 0 > signals["target_relative"][0]  # credits the better experts


def test_batch_relative_gives_todays_numbers_and_leaves_padding_out():
    torch.manual_seed(2)
    o = dict(alpha=0.2, rho=0.5, lam=0.8)
    for alias in ("batch_relative", "loss"):
        router = make_router("rdesi", performance=alias, **o).train()
        x, token_loss = torch.randn(40, D_MODEL), torch.rand(40)
        r = router(x)  # on its own (no begin_batch): every token real, the signal as before the change
        router.observe_token_loss(token_loss)
        perf = token_loss.mean() - token_loss
        expected = torch.stack(
            [
                (1 - o["alpha"]) * 0.0 + o["alpha"] * perf[r.token[r.expert == i]].mean()
                if (r.expert == i).any()
                else torch.tensor(0.0)
                for i in range(N_EXPERTS)
            ]
        )
        router.update_state()
        assert torch.allclose(router.reputation, expected - expected.mean(), atol=1e-6)
    # Through begin_batch with padding: the loop reference, which leaves padding out.
    router = make_router("rdesi", **o).train()
    generator = torch.Generator().manual_seed(3)
    routed = run_step(router, [random_micro_batch(generator, {1: 2})])
    reference = reference_reputation_step(torch.zeros(N_EXPERTS), routed, o["alpha"], o["rho"])
    assert torch.allclose(router.reputation, reference, atol=1e-6)


def test_loss_is_an_alias_recorded_as_batch_relative(tmp_path):
    assert options("rdesi", performance="loss").performance == "batch_relative"
    assert options("rdesi").performance == "batch_relative"  # the default, until measured runs decide
    old = RunConfig(router=RouterConfig.from_mapping({"name": "rdesi", "performance": "loss"}))
    new = RunConfig(router=RouterConfig.from_mapping({"name": "rdesi", "performance": "batch_relative"}))
    assert old.weights() == new.weights()  # two spellings, one run
    save_run_config(old, tmp_path / "run.yaml")
    assert load_run_config(tmp_path / "run.yaml").to_dict()["router"]["performance"] == "batch_relative"


def test_target_relative_state_is_checkpointed_and_batch_relative_state_unchanged():
    model_cfg = tiny_model()
    target = MoETransformer(model_cfg, RouterConfig.from_mapping({"name": "rdesi", "performance": "target_relative"}))
    keys = target.state_dict().keys()
    assert "blocks.0.ffn.router.target_loss" in keys and "blocks.0.ffn.router.target_seen" in keys
    assert "blocks.0.ffn.router.step_target_loss" not in keys  # per-step accumulator
    batch = MoETransformer(model_cfg, RouterConfig.from_mapping({"name": "rdesi"}))
    assert not [key for key in batch.state_dict() if "target" in key]  # earlier checkpoints still load


def test_activation_norm_leaves_padding_out():
    router = make_router("rdesi", performance="activation_norm").train()
    layer = MoELayer(router, D_MODEL, D_EXPERT, N_EXPERTS)
    targets = torch.tensor([[1, 2, 3, IGNORE_INDEX, IGNORE_INDEX]])
    router.begin_batch(torch.zeros(1, 5, dtype=torch.long), targets)
    layer(torch.randn(5, D_MODEL), targets.reshape(-1) != IGNORE_INDEX)
    r = layer.last_routing
    real = [e for t, e in zip(r.token.tolist(), r.expert.tolist()) if t < 3]
    assert router.perf_count.tolist() == [float(real.count(e)) for e in range(N_EXPERTS)]


# --------------------------------------------------------------------------- the balance loss: scope, padding


def brute_force_balance_loss(probs, choice, targets, sequence_length):
    """E * sum_i f_i P_i per sequence of `sequence_length` (the whole group if None) over real tokens only,
    averaged over the sequences with a real token."""
    n_tokens = probs.shape[0]
    length = sequence_length or n_tokens
    losses = []
    for start in range(0, n_tokens, length):
        real = [t for t in range(start, start + length) if targets[t] != IGNORE_INDEX]
        if not real:
            continue
        loss = 0.0
        for i in range(N_EXPERTS):
            f = sum(int(e == i) for t in real for e in choice[t].tolist()) / (len(real) * choice.shape[1])
            p = sum(float(probs[t, i]) for t in real) / len(real)
            loss += N_EXPERTS * f * p
        losses.append(loss)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_balance_loss_per_scope_matches_brute_force_without_the_padding(scope):
    torch.manual_seed(4)
    router = make_router("topk", aux_loss_scope=scope, z_loss_coef=0.0).train()
    generator = torch.Generator().manual_seed(5)
    # Row 2 is half padding, row 3 all padding (a sequence with nothing to balance).
    targets = padded_targets(generator, 4, 5, {2: 2, 3: 0})
    router.begin_batch(torch.zeros(4, 5, dtype=torch.long), targets)
    x = torch.randn(20, D_MODEL)
    r = router(x)
    probs = F.softmax(router.gate(x).detach().float(), dim=-1)
    expected = brute_force_balance_loss(
        probs, r.choice, targets.reshape(-1).tolist(), 5 if scope == "sequence" else None
    )
    assert r.metrics["aux_loss"].item() == pytest.approx(expected, rel=1e-5)
    # The loss carries the gradient to the gate through P (and only through P).
    r.loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_batch_scope_without_padding_is_the_loss_as_before():
    torch.manual_seed(6)
    router = make_router("topk", z_loss_coef=0.0).train()
    x = torch.randn(24, D_MODEL)
    r = router(x)  # routed on its own: no padding known
    probs = F.softmax(router.gate(x).float(), dim=-1)
    f = torch.stack([(r.choice == i).sum() for i in range(N_EXPERTS)]).float() / r.choice.numel()
    assert r.metrics["aux_loss"].item() == pytest.approx((N_EXPERTS * (f * probs.mean(0)).sum()).item(), rel=1e-6)
    router.begin_batch(torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.long))  # no padding
    again = router(x)
    assert again.metrics["aux_loss"].item() == pytest.approx(r.metrics["aux_loss"].item(), rel=1e-6)
    # Sequence scope over one sequence is the batch loss.
    one = make_router("topk", z_loss_coef=0.0, aux_loss_scope="sequence").train()
    one.gate.load_state_dict(router.gate.state_dict())
    one.begin_batch(torch.zeros(1, 24, dtype=torch.long), None)
    assert one(x).metrics["aux_loss"].item() == pytest.approx(r.metrics["aux_loss"].item(), rel=1e-6)


def test_sequence_scope_needs_whole_sequences():
    router = make_router("topk", aux_loss_scope="sequence").train()
    with pytest.raises(ValueError, match="aux_loss_scope 'sequence'"):
        router(torch.randn(8, D_MODEL))  # no begin_batch: no sequence length
    router.begin_batch(torch.zeros(2, 5, dtype=torch.long), None)
    with pytest.raises(ValueError, match="not whole sequences of 5"):
        router(torch.randn(8, D_MODEL))
    router.eval()
    router(torch.randn(8, D_MODEL))  # no auxiliary loss in evaluation: nothing to scope


# --------------------------------------------------------------------------- shared experts


def swiglu(x, w1, w3, w2):
    """One SwiGLU expert by its weight matrices (rows = hidden units of w1, w3; columns of w2)."""
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


@pytest.mark.parametrize("name", ["topk", "switch", "rdesi"])
def test_shared_experts_add_their_swiglus_to_the_routed_output(name):
    torch.manual_seed(7)
    n_shared = 3
    layer = MoELayer(make_router(name), D_MODEL, D_EXPERT, N_EXPERTS, n_shared_experts=n_shared)
    for w in list(layer.experts.parameters()) + list(layer.shared_experts.parameters()):
        torch.nn.init.normal_(w, std=0.3)
    x = torch.randn(10, D_MODEL)
    y = layer(x)
    r, e, s = layer.last_routing, layer.experts, layer.shared_experts
    expected = torch.zeros_like(x)
    for t, i, w in zip(r.token.tolist(), r.expert.tolist(), r.weight):
        if i < N_EXPERTS:
            expected[t] += w * ((F.silu(x[t] @ e.w1[i]) * (x[t] @ e.w3[i])) @ e.w2[i])
    for j in range(n_shared):  # each shared expert on its own, weight 1
        rows = slice(j * D_EXPERT, (j + 1) * D_EXPERT)
        expected += swiglu(x, s.w1.weight[rows], s.w3.weight[rows], s.w2.weight[:, rows])
    assert torch.allclose(y, expected, atol=1e-5)


def hand_counts(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(total, active) parameters of the model by formula: embeddings (tied), per block attention and two
    RMSNorms, the FFN; the final norm."""
    d, e, k, de, ns = cfg.d_model, cfg.n_experts, cfg.top_k, cfg.d_expert, cfg.n_shared_experts
    swiglu_params = 3 * d * de  # one expert
    base = cfg.vocab_size * d + cfg.n_layers * (4 * d * d + 2 * d) + d
    total = active = base
    for layer in range(cfg.n_layers):
        if (layer + 1) % cfg.moe_every != 0 or name == "dense":
            ffn = (k + ns) * swiglu_params
            total, active = total + ffn, active + ffn
        elif name == "dense_total":
            ffn = (e + ns) * swiglu_params
            total, active = total + ffn, active + ffn
        else:
            routed = {"topk": k, "switch": 1}[name]
            total += (e + ns) * swiglu_params + d * e
            active += (routed + ns) * swiglu_params + d * e
    return total, active


@pytest.mark.parametrize("name", ["topk", "switch", "dense", "dense_total"])
@pytest.mark.parametrize("n_shared, moe_every", [(0, 1), (2, 1), (1, 2)])
def test_parameter_counts_match_hand_counts(name, n_shared, moe_every):
    cfg = tiny_model(n_shared_experts=n_shared, moe_every=moe_every, n_layers=4)
    router = RouterConfig.from_mapping({"name": name}).for_horizon(100)
    model = MoETransformer(cfg, router)
    assert model.parameter_counts() == hand_counts(cfg, name)
    assert parameter_count(RunConfig(model=cfg, router=router)) == hand_counts(cfg, name)[0]


def test_dense_references_match_active_and_total_parameters():
    cfg = tiny_model(n_shared_experts=1)
    moe_total, moe_active = MoETransformer(cfg, RouterConfig.from_mapping({"name": "topk"})).parameter_counts()
    gates = cfg.n_layers * cfg.d_model * cfg.n_experts
    dense = MoETransformer(cfg, RouterConfig.from_mapping({"name": "dense"})).parameter_counts()
    dense_total = MoETransformer(cfg, RouterConfig.from_mapping({"name": "dense_total"})).parameter_counts()
    assert dense == (moe_active - gates, moe_active - gates)
    assert dense_total == (moe_total - gates, moe_total - gates)  # the gates are the only difference
    assert routers.describe("dense_total") == {
        "label": "dense (total params)",
        "routed": False,
        "balanced_by_construction": False,
        "terms": {},
        "states": {},
        "balance_knob": None,
    }


@pytest.mark.parametrize("n_shared", [0, 1])
def test_parameter_count_is_the_built_models_for_every_router(n_shared):
    for name in routers.known():
        cfg = RunConfig(model=tiny_model(n_shared_experts=n_shared), router=RouterConfig.from_mapping({"name": name}))
        cfg = cfg.at_horizon()
        built = MoETransformer(cfg.model, cfg.router)
        assert parameter_count(cfg) == sum(p.numel() for p in built.parameters()), name
        assert memory_estimate_mb(cfg, TINY_SEQ) > 0 and memory_estimate_mb(cfg, TINY_SEQ, "evaluate") > 0


def test_memory_estimate_counts_the_dense_total_ffn_and_shared_experts():
    def estimate(name, **model):
        return memory_estimate_mb(
            RunConfig(model=ModelConfig(**model), router=RouterConfig.from_mapping({"name": name})), 128
        )

    assert estimate("dense_total") > estimate("dense")
    assert estimate("topk", n_shared_experts=2) > estimate("topk")
    assert estimate("dense", n_shared_experts=2) > estimate("dense")


def test_parameter_count_refuses_a_huge_model_without_allocating_it():
    huge = RunConfig(model=ModelConfig(n_experts=4096, d_expert=1 << 14, d_model=1024, n_shared_experts=64))
    with pytest.raises(ConfigError, match="parameters.*more than"):
        huge.check_size()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: ModelConfig(n_shared_experts=-1).validate(), r"'model.n_shared_experts' = -1: must be in \[0, 4096\]"),
        (lambda: ModelConfig(n_shared_experts=5000).validate(), r"'model.n_shared_experts' = 5000"),
        (lambda: options("rdesi", performance="vibes"), r"'router.performance' = 'vibes'.*target_relative"),
        (lambda: options("rdesi", baseline_rate=0.0), r"'router.baseline_rate' = 0.0: must be in \(0, 1\]"),
        (lambda: options("rdesi", baseline_rate=-1.0), r"'router.baseline_rate' = -1.0"),
        (lambda: options("topk", aux_loss_scope="token"), r"'router.aux_loss_scope' = 'token': must be one of"),
        (lambda: options("rdesi", aux_loss_scope=1), r"'router.aux_loss_scope' = 1: must be of type str"),
    ],
)
def test_bad_values_name_the_key(build, pattern):
    with pytest.raises(ConfigError, match=pattern) as error:
        build()
    assert "\n" not in str(error.value)  # one line


def test_target_relative_needs_the_vocabulary_and_the_targets():
    with pytest.raises(ValueError, match="needs the vocabulary size"):
        routers.get("rdesi")(options("rdesi", performance="target_relative"), D_MODEL, N_EXPERTS, TOP_K)
    router = make_router("rdesi", performance="target_relative").train()
    router(torch.randn(6, D_MODEL))
    with pytest.raises(RuntimeError, match="needs the targets"):
        router.observe_token_loss(torch.rand(6))


# --------------------------------------------------------------------------- training smoke


@pytest.mark.parametrize(
    "name, router_options, model_options",
    [
        ("rdesi", {"performance": "target_relative"}, {}),
        ("topk", {"aux_loss_scope": "sequence"}, {"n_shared_experts": 1}),
        ("rdesi", {"aux_loss_scope": "sequence"}, {"n_shared_experts": 2, "n_experts": 8, "top_k": 4, "d_expert": 8}),
        ("dense_total", {}, {"n_shared_experts": 1}),
    ],
)
def test_a_few_training_steps_stay_finite(name, router_options, model_options):
    torch.manual_seed(8)
    model = MoETransformer(
        tiny_model(**model_options), RouterConfig.from_mapping({"name": name, **router_options}).for_horizon(100)
    ).train()
    tcfg = dataclasses.replace(RunConfig().train, grad_accum=2)
    optimizer = build_optimizer(model, tcfg)
    for _ in range(3):
        batches = []
        for _ in range(2):
            idx = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
            targets = idx.roll(-1, dims=1)
            targets[1, -3:] = IGNORE_INDEX  # a padded tail
            batches.append((idx, targets))
        result = train_step(model, model, optimizer, batches, tcfg, torch.device("cpu"))
        assert bool(result.finite) and torch.isfinite(result.loss)
    for layer in model.moe_layers:
        if router_options.get("performance") == "target_relative":
            assert layer.router.target_seen.any() and torch.isfinite(layer.router.target_loss).all()
        if router_options.get("aux_loss_scope") == "sequence":
            assert "aux_loss" in layer.last_routing.metrics
    if name == "dense_total":
        assert not model.moe_layers and isinstance(model.blocks[0].ffn, SwiGLU)
