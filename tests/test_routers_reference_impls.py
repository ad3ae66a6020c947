"""Our routers against the reference routers in Hugging Face `transformers` (optional: skipped without it).

Each test gives our router and theirs the same gate weight, the same bias and the same tokens, then compares
the experts chosen per token, the capacity drops and the combine weights (and, for Switch, the balance and
z losses). Written against transformers 5.25; a version without one of the classes skips that test.

- switch: `SwitchTransformersTop1Router` (top-1, capacity counted in token order over a sequence);
- sigmoid_topk: DeepSeek-V3's `DeepseekV3TopkRouter` (sigmoid, bias on the scores, renormalised weights);
- group_limited (group_score max), lossfree (softmax, no bias): DeepSeek-V2's `DeepseekV2TopkRouter`;
- topk: Mixtral's `MixtralTopKRouter` (softmax top-k, renormalised) and its `load_balancing_loss_func`.

Not compared: DeepSeek-V3's gate with n_group > 1 against our group_limited. Theirs ranks groups by the sum of
the top-2 sigmoid scores + bias and weights by renormalised sigmoid scores; ours ranks groups by softmax
affinities and weights by a softmax over the chosen, and our sigmoid router has no groups, so no router of
ours has those semantics to compare.
"""

from __future__ import annotations

import pytest
import torch

from gtmoe import routers
from gtmoe.config import RouterConfig

transformers = pytest.importorskip("transformers")

D_MODEL, N_TOKENS = 32, 64


def reference(module: str, name: str):
    """Class or function `name` of transformers.models.<module>; skips where this version lacks it."""
    found = getattr(pytest.importorskip(f"transformers.models.{module}"), name, None)
    if found is None:
        pytest.skip(f"transformers {transformers.__version__} has no {module}.{name}")
    return found


def make_router(name: str, n_experts: int, top_k: int, **options):
    cfg = RouterConfig.from_mapping({"name": name, **options}).for_horizon(100)
    router = routers.get(name)(cfg.resolve(), D_MODEL, n_experts, top_k)
    # Logits of order 1: distinct scores, so ties cannot make a comparison pass or fail by chance.
    with torch.no_grad():
        router.gate.weight.copy_(0.5 * torch.randn(n_experts, D_MODEL))
    return router


def by_expert(choice: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) chosen experts and their weights, each row sorted by expert (topk's order is not compared)."""
    experts, order = choice.sort(dim=-1)
    return experts, weight.gather(-1, order)


def switch_reference(n_experts: int, capacity: int, training: bool, jitter: float = 0.0):
    config_cls = reference("switch_transformers.configuration_switch_transformers", "SwitchTransformersConfig")
    router_cls = reference("switch_transformers.modeling_switch_transformers", "SwitchTransformersTop1Router")
    config = config_cls(
        d_model=D_MODEL,
        num_experts=n_experts,
        expert_capacity=capacity,
        router_bias=False,
        router_jitter_noise=jitter,
        router_dtype="float32",
    )
    return router_cls(config).train(training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_switch_matches_switch_transformers_top1_router(training):
    torch.manual_seed(0)
    n_experts = 4
    # Capacity factors below the paper's so that capacity binds in both modes (C = 8 in training, 16 in eval).
    ours = make_router("switch", n_experts, 1, capacity_factor=0.5, eval_capacity_factor=1.0).train(training)
    capacity = ours.capacity(N_TOKENS)
    theirs = switch_reference(n_experts, capacity, training)
    with torch.no_grad():
        theirs.classifier.weight.copy_(ours.gate.weight)
    x = torch.randn(N_TOKENS, D_MODEL)

    routing = ours(x)
    # One sequence (batch 1): their capacity counts down the sequence, ours down the group: the same order.
    dispatch, chosen_prob, logits = theirs(x.clone().unsqueeze(0))
    dispatch, chosen_prob, logits = dispatch[0], chosen_prob[0, :, 0], logits[0]
    kept = dispatch.sum(dim=-1) > 0

    assert 0 < int((~kept).sum()) < N_TOKENS  # the capacity drops some tokens, not all
    assert torch.equal(routing.choice.squeeze(-1), logits.argmax(dim=-1))
    assert torch.equal(routing.expert, torch.where(kept, dispatch.argmax(dim=-1), n_experts))
    torch.testing.assert_close(routing.weight, chosen_prob)

    if training:  # the losses exist in training only
        balance = reference("switch_transformers.modeling_switch_transformers", "load_balancing_loss_func")
        z_loss = reference("switch_transformers.modeling_switch_transformers", "router_z_loss_func")
        # Their model takes the balance loss over the argmax before the capacity cut, as ours does.
        expected = balance(logits.softmax(dim=-1).unsqueeze(0), logits.argmax(dim=-1).unsqueeze(0))
        torch.testing.assert_close(routing.metrics["aux_loss"], expected)
        torch.testing.assert_close(routing.metrics["z_loss"], z_loss(logits.unsqueeze(0)))


def test_switch_jitter_matches_switch_transformers_for_the_same_random_draws():
    torch.manual_seed(0)
    n_experts, eps = 4, 0.3  # a large eps, so the jitter moves choices
    ours = make_router("switch", n_experts, 1, capacity_factor=0.5, jitter_eps=eps).train()
    theirs = switch_reference(n_experts, ours.capacity(N_TOKENS), training=True, jitter=eps)
    with torch.no_grad():
        theirs.classifier.weight.copy_(ours.gate.weight)
    x = torch.randn(N_TOKENS, D_MODEL)

    # Both draw U(1 - eps, 1 + eps) of x's shape in fp32 from the global generator: the same factors.
    torch.manual_seed(1)
    routing = ours(x)
    torch.manual_seed(1)
    dispatch, chosen_prob, _ = theirs(x.clone().unsqueeze(0))  # clone: theirs scales its input in place
    kept = dispatch[0].sum(dim=-1) > 0

    unjittered = ours.gate(x).argmax(dim=-1)
    assert not torch.equal(routing.choice.squeeze(-1), unjittered)  # the jitter did change some choices
    assert torch.equal(routing.expert, torch.where(kept, dispatch[0].argmax(dim=-1), n_experts))
    torch.testing.assert_close(routing.weight, chosen_prob[0, :, 0])


def test_sigmoid_topk_matches_deepseek_v3_gate():
    torch.manual_seed(0)
    n_experts, top_k, scale = 8, 2, 2.5
    ours = make_router("sigmoid_topk", n_experts, top_k, weight_scale=scale).eval()
    bias = 0.2 * torch.randn(n_experts)
    ours.bias.copy_(bias)
    config = reference("deepseek_v3.configuration_deepseek_v3", "DeepseekV3Config")(
        hidden_size=D_MODEL,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=scale,
    )
    theirs = reference("deepseek_v3.modeling_deepseek_v3", "DeepseekV3TopkRouter")(config)
    with torch.no_grad():
        theirs.weight.copy_(ours.gate.weight)
        theirs.e_score_correction_bias.copy_(bias)
    x = torch.randn(N_TOKENS, D_MODEL)

    routing = ours(x)
    logits, weight, choice = theirs(x)
    ours_experts, ours_weight = by_expert(routing.choice, routing.weight.view(N_TOKENS, top_k))
    their_experts, their_weight = by_expert(choice, weight)

    without_bias = logits.sigmoid().topk(top_k, dim=-1).indices.sort(dim=-1).values
    assert (without_bias != their_experts).any()  # the bias moves some selections
    assert torch.equal(ours_experts, their_experts)
    torch.testing.assert_close(ours_weight, their_weight)


def deepseek_v2_reference(n_experts: int, top_k: int, **gate):
    config = reference("deepseek_v2.configuration_deepseek_v2", "DeepseekV2Config")(
        hidden_size=D_MODEL,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        routed_scaling_factor=1.0,
        **gate,
    )
    return reference("deepseek_v2.modeling_deepseek_v2", "DeepseekV2TopkRouter")(config)


def test_group_limited_max_selects_as_deepseek_v2_group_limited_greedy():
    torch.manual_seed(0)
    # 4 groups of 2, the best 2 kept, k = 3: the top 3 experts often span 3 groups, so the limit binds.
    n_experts, top_k, n_groups, top_groups = 8, 3, 4, 2
    options = {"n_groups": n_groups, "top_groups": top_groups, "group_score": "max"}
    ours = make_router("group_limited", n_experts, top_k, **options).eval()
    theirs = deepseek_v2_reference(
        n_experts, top_k, topk_method="group_limited_greedy", n_group=n_groups, topk_group=top_groups
    )
    with torch.no_grad():
        theirs.weight.copy_(ours.gate.weight)
    x = torch.randn(N_TOKENS, D_MODEL)

    routing = ours(x)
    logits, weight, choice = theirs(x)
    ours_experts, ours_weight = by_expert(routing.choice, routing.weight.view(N_TOKENS, top_k))
    their_experts, their_weight = by_expert(choice, weight)

    unlimited = logits.topk(top_k, dim=-1).indices.sort(dim=-1).values
    assert (unlimited != their_experts).any()  # the group limit changes some selections
    assert torch.equal(ours_experts, their_experts)
    # A convention difference: DeepSeek-V2 weights by the softmax over all experts (its Eq. 11, no
    # renormalisation); our top-k family renormalises over the chosen, which is theirs divided by its sum.
    torch.testing.assert_close(ours_weight, their_weight / their_weight.sum(dim=-1, keepdim=True))


def test_lossfree_softmax_without_bias_matches_deepseek_v2_greedy_gate():
    torch.manual_seed(0)
    n_experts, top_k = 8, 2
    ours = make_router("lossfree", n_experts, top_k, score_function="softmax", bias_on="scores").eval()
    theirs = deepseek_v2_reference(n_experts, top_k, topk_method="greedy")
    with torch.no_grad():
        theirs.weight.copy_(ours.gate.weight)
    x = torch.randn(N_TOKENS, D_MODEL)

    routing = ours(x)
    _, weight, choice = theirs(x)
    ours_experts, ours_weight = by_expert(routing.choice, routing.weight.view(N_TOKENS, top_k))
    their_experts, their_weight = by_expert(choice, weight)

    assert torch.equal(ours_experts, their_experts)
    torch.testing.assert_close(ours_weight, their_weight)  # s_i as it is, not renormalised (Wang et al. Eq. 3)


def test_topk_matches_mixtral_router_and_its_balance_loss():
    torch.manual_seed(0)
    n_experts, top_k = 8, 2
    ours = make_router("topk", n_experts, top_k).train()
    config = reference("mixtral.configuration_mixtral", "MixtralConfig")(
        hidden_size=D_MODEL, num_local_experts=n_experts, num_experts_per_tok=top_k
    )
    theirs = reference("mixtral.modeling_mixtral", "MixtralTopKRouter")(config)
    with torch.no_grad():
        theirs.weight.copy_(ours.gate.weight)
    x = torch.randn(N_TOKENS, D_MODEL)

    routing = ours(x)
    logits, weight, choice = theirs(x)
    ours_experts, ours_weight = by_expert(routing.choice, routing.weight.view(N_TOKENS, top_k))
    their_experts, their_weight = by_expert(choice, weight)

    assert torch.equal(ours_experts, their_experts)
    torch.testing.assert_close(ours_weight, their_weight)
    # A convention difference: our f_i is the share of the T k assignments (sums to 1, as Switch's top-1
    # f); Mixtral's is assignments per token (sums to k), so its loss is k times ours.
    balance = reference("mixtral.modeling_mixtral", "load_balancing_loss_func")
    expected = balance((logits,), num_experts=n_experts, top_k=top_k)
    torch.testing.assert_close(top_k * routing.metrics["aux_loss"], expected)
