"""What the experts learned (issue 23): co-activation, vocabulary specialisation, the share of an expert's tokens from
its top token ids, the token-expert MI over its attainable maximum and the utilisation percentiles, each checked
against a brute-force computation written here on small hand-made routings, for gtmoe.metrics' functions and for
the evaluation's device statistics (gtmoe.evaluate.LayerStats) through both of its co-activation paths."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from gtmoe import metrics
from gtmoe.contract import TOP_TOKENS, UTILISATION_METRICS, UTILISATION_PERCENTILES
from gtmoe.evaluate import LayerStats, token_expert_mutual_information
from gtmoe.routers.base import Routing

# A token is (token id, the experts that processed it, valid); padding is invalid and reaches nobody.
Token = tuple[int, tuple[int, ...], bool]

# Four experts, six token ids, top-2 with drops (a token left with one expert or none) and padding, in three
# routing groups; token id 0 always reaches experts 0 and 1, token id 4 is never seen.
HAND_MADE: list[list[Token]] = [
    [(0, (0, 1), True), (1, (0, 2), True), (0, (0, 1), True), (2, (1, 3), True), (3, (0,), True), (5, (), False)],
    [(2, (3, 1), True), (2, (2, 3), True), (0, (1, 0), True), (5, (2, 3), True), (1, (), True), (3, (0, 2), True)],
    [(5, (3, 2), True), (1, (2, 0), True), (0, (0, 1), True), (3, (0, 3), True), (5, (), False), (5, (), False)],
]
E, V, K = 4, 6, 2


# --------------------------------------------------------------------------- brute force


def brute_cocounts(groups: list[list[Token]], n_experts: int) -> np.ndarray:
    counts = np.zeros((n_experts, n_experts))
    for _, experts, valid in (token for group in groups for token in group):
        for i in experts if valid else ():
            for j in experts:
                counts[i, j] += 1
    return counts


def brute_joint(groups: list[list[Token]], n_experts: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(vocab, E) assignments of each token id to each expert, and each token id's valid occurrences."""
    joint, occurrences = np.zeros((vocab, n_experts)), np.zeros(vocab)
    for token_id, experts, valid in (token for group in groups for token in group):
        if valid:
            occurrences[token_id] += 1
            for expert in experts:
                joint[token_id, expert] += 1
    return joint, occurrences


def brute_coactivation(counts: np.ndarray) -> dict[str, float]:
    """OLMoE's normalisation by loops: of the tokens routed to i, the share also routed to j (j != i)."""
    n = len(counts)
    partners = []
    for i in range(n):
        if counts[i, i] > 0 and n > 1:
            partners.append(max(counts[i, j] / counts[i, i] for j in range(n) if j != i))
    return {"coactivation_max": max(partners), "coactivation_partner_mean": sum(partners) / len(partners)}


def brute_vocabulary(joint: np.ndarray, occurrences: np.ndarray) -> dict[str, float]:
    """Per token id the share of its occurrences routed to its most used expert, averaged with weights n_t / n."""
    n = occurrences.sum()
    weighted = sum((occurrences[t] / n) * (max(joint[t]) / occurrences[t]) for t in range(len(joint)) if occurrences[t])
    floor = joint.sum() / (n * joint.shape[1])
    return {"vocab_specialisation": weighted, "vocab_specialisation_above_floor": (weighted - floor) / (1 - floor)}


def brute_top_tokens(joint: np.ndarray, n: int) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """Each expert's n most routed token ids (ties: the lower id first), their counts, and their share."""
    ids, counts, shares = [], [], []
    for expert in range(joint.shape[1]):
        ranked = sorted(range(len(joint)), key=lambda t: (-joint[t, expert], t))[:n]
        ids.append(ranked)
        counts.append([int(joint[t, expert]) for t in ranked])
        total = joint[:, expert].sum()
        shares.append(sum(counts[-1]) / total if total else math.nan)
    return ids, counts, shares


def brute_entropy(values) -> float:
    total = sum(values)
    return -sum(v / total * math.log(v / total) for v in values if v > 0)


def brute_mi_share_of_max(joint: np.ndarray, occurrences: np.ndarray) -> float:
    """I(token; expert) by its entropies, over min(H(expert) - sum_t p(t) ln max(1, A_t / n_t), H(token))."""
    h_token, h_expert = brute_entropy(joint.sum(axis=1)), brute_entropy(joint.sum(axis=0))
    mi = h_token + h_expert - brute_entropy(joint.ravel())
    total = joint.sum()
    floor = sum(
        joint[t].sum() / total * math.log(max(1.0, joint[t].sum() / occurrences[t]))
        for t in range(len(joint))
        if joint[t].sum()
    )
    return mi / min(h_expert - floor, h_token)


def brute_utilisation(groups: list[list[Token]], n_experts: int) -> list[float]:
    """E * f of every expert in every group with an assignment, f its share of the group's assignments."""
    values = []
    for group in groups:
        load = Counter(e for _, experts, valid in group if valid for e in experts)
        total = sum(load.values())
        if total:
            values += [n_experts * load[e] / total for e in range(n_experts)]
    return values


# --------------------------------------------------------------------------- routings as the routers give them


def token_choice_routing(group: list[Token], n_experts: int, k: int, rng: np.random.Generator) -> Routing:
    """A token-choice Routing (k slots per token, token-major, `choice` set): each token's experts in its slots,
    a dropped slot holding n_experts; padding's slots hold experts the router chose but nobody processes."""
    choice, expert = [], []
    for _, experts, valid in group:
        chosen = list(experts) + [int(e) for e in rng.permutation(n_experts) if e not in experts][: k - len(experts)]
        choice.append(chosen)
        expert.append(list(experts) + [n_experts] * (k - len(experts)) if valid else chosen)
    tokens = torch.arange(len(group)).repeat_interleave(k)
    return Routing(
        expert=torch.tensor(expert).reshape(-1),
        token=tokens,
        weight=torch.ones(len(group) * k),
        loss=torch.zeros(()),
        choice=torch.tensor(choice),
    )


def assignment_routing(group: list[Token], n_experts: int) -> Routing:
    """A Routing without `choice` (expert choice's form): one row per (expert, token) assignment, in expert
    order, a dropped one holding n_experts."""
    pairs = [(e, t) for t, (_, experts, _) in enumerate(group) for e in experts]
    pairs = sorted(pairs) + [(n_experts, 0)]  # and an assignment capacity dropped
    expert, token = zip(*pairs)
    return Routing(
        expert=torch.tensor(expert), token=torch.tensor(token), weight=torch.ones(len(pairs)), loss=torch.zeros(())
    )


def layer_summary(groups: list[list[Token]], n_experts: int, vocab: int, make) -> dict:
    stats = LayerStats(n_experts, vocab, torch.device("cpu"))
    for group in groups:
        ids = torch.tensor([token_id for token_id, _, _ in group])
        valid = torch.tensor([valid for _, _, valid in group])
        stats.add(make(group), ids, valid)
    return stats.summary(0)


def random_groups(rng: np.random.Generator, n_groups: int, n_tokens: int, n_experts: int, k: int, vocab: int):
    """Token-choice groups: a frequent token id reaches a fixed pair of experts more often than not; drops and
    padding throughout."""
    groups = []
    for _ in range(n_groups):
        group = []
        for _ in range(n_tokens):
            token_id = int(min(rng.zipf(1.5), vocab) - 1)
            experts = list(rng.permutation(n_experts)[:k])
            if token_id < 3 and rng.random() < 0.7:
                experts = [token_id % n_experts, (token_id + 1) % n_experts][:k]
            experts = [e for e in experts if rng.random() > 0.1]  # capacity drops
            group.append((token_id, tuple(experts), bool(rng.random() > 0.1)))
        groups.append([(t, e if valid else (), valid) for t, e, valid in group])
    return groups


# --------------------------------------------------------------------------- gtmoe.metrics


def test_the_raw_co_counts_are_symmetric_with_each_experts_tokens_on_the_diagonal():
    counts = brute_cocounts(HAND_MADE, E)
    joint, _ = brute_joint(HAND_MADE, E, V)
    assert np.array_equal(counts, counts.T)
    assert np.array_equal(np.diag(counts), joint.sum(axis=0))


def test_coactivation_shares_are_olmoes_row_normalisation_without_the_diagonal():
    counts = brute_cocounts(HAND_MADE, E)
    shares = metrics.coactivation_shares(counts)
    for i in range(E):
        assert math.isnan(shares[i, i])
        for j in set(range(E)) - {i}:
            assert shares[i, j] == pytest.approx(counts[i, j] / counts[i, i])
    # An expert without tokens has no row; the shares are not symmetric (each row has its own denominator).
    assert np.isnan(metrics.coactivation_shares(np.diag([3.0, 0.0]))[1]).all()
    assert not np.allclose(np.nan_to_num(shares), np.nan_to_num(shares).T)


def test_a_dropless_top_k_row_sums_to_k_minus_one():
    rng = np.random.default_rng(0)
    groups = [[(0, tuple(rng.permutation(6)[:3]), True) for _ in range(40)]]
    assert np.nansum(metrics.coactivation_shares(brute_cocounts(groups, 6)), axis=1) == pytest.approx([2.0] * 6)


def test_coactivation_summary_matches_the_loop():
    counts = brute_cocounts(HAND_MADE, E)
    assert metrics.coactivation_summary(counts) == pytest.approx(brute_coactivation(counts))
    top1 = [[(0, (e,), True) for e in (0, 1, 1, 2)]]
    assert metrics.coactivation_summary(brute_cocounts(top1, 3)) == {
        "coactivation_max": 0.0,
        "coactivation_partner_mean": 0.0,
    }
    assert all(math.isnan(v) for v in metrics.coactivation_summary(np.zeros((3, 3))).values())


def test_vocabulary_specialisation_matches_the_loop_and_its_bounds():
    joint, occurrences = brute_joint(HAND_MADE, E, V)
    assert metrics.vocabulary_specialisation(joint, occurrences) == pytest.approx(brute_vocabulary(joint, occurrences))
    # Each token id always reaching the same k experts is full specialisation; routing that ignores the token id,
    # with each id spread evenly over the experts, sits at the floor k / E.
    fixed = [[(t, (t % E, (t + 1) % E), True) for t in range(V)] * 3]
    joint, occurrences = brute_joint(fixed, E, V)
    assert metrics.vocabulary_specialisation(joint, occurrences) == pytest.approx(
        {"vocab_specialisation": 1.0, "vocab_specialisation_above_floor": 1.0}
    )
    even = [[(t, (e, (e + 1) % E), True) for t in range(V) for e in (0, 2)]]
    joint, occurrences = brute_joint(even, E, V)
    assert metrics.vocabulary_specialisation(joint, occurrences) == pytest.approx(
        {"vocab_specialisation": K / E, "vocab_specialisation_above_floor": 0.0}
    )


def test_top_token_share_matches_the_loop():
    joint, _ = brute_joint(HAND_MADE, E, V)
    for n in (1, 2, V):
        expected = brute_top_tokens(joint, n)[2]
        assert metrics.top_token_share(joint, n) == pytest.approx(expected, nan_ok=True)
    assert metrics.top_token_share(joint, V) == pytest.approx([1.0] * E)


def test_mi_share_of_max_matches_the_loop_and_reaches_one_when_the_id_fixes_the_experts():
    joint, occurrences = brute_joint(HAND_MADE, E, V)
    expected = brute_mi_share_of_max(joint, occurrences)
    assert metrics.token_expert_mi_share_of_max(joint, occurrences) == pytest.approx(expected)
    # The cap of a dropless top-k router is H(expert) - ln k: a token id that fixes its k experts reaches it,
    # where MI / H(expert) stays at 1 - ln k / H(expert).
    fixed = [[(t, (t % E, (t + 1) % E), True) for t in range(4) for _ in range(5)]]
    joint, occurrences = brute_joint(fixed, E, V)
    h_expert = brute_entropy(joint.sum(axis=0))
    assert metrics.token_expert_mi_share_of_max(joint, occurrences) == pytest.approx(1.0)
    assert metrics.token_expert_mutual_information(joint) == pytest.approx(1 - math.log(K) / h_expert)
    # Every token on every expert: nothing to learn, the share is undefined.
    everyone = [[(t, tuple(range(E)), True) for t in range(V)]]
    assert math.isnan(metrics.token_expert_mi_share_of_max(*brute_joint(everyone, E, V)))


def test_utilisation_percentiles_are_numpys_over_groups_and_experts():
    group_counts = np.array([[Counter(e for _, x, v in g if v for e in x)[e] for e in range(E)] for g in HAND_MADE])
    group_counts = np.vstack([group_counts, np.zeros(E)])  # a group without assignments counts nowhere
    expected = np.percentile(brute_utilisation(HAND_MADE, E), list(UTILISATION_PERCENTILES.values()))
    got = metrics.utilisation_percentiles(group_counts, UTILISATION_PERCENTILES)
    assert list(got) == list(UTILISATION_PERCENTILES) and list(got.values()) == pytest.approx(expected)
    assert all(math.isnan(v) for v in metrics.utilisation_percentiles(np.zeros((2, E)), {"p5": 5}).values())


# --------------------------------------------------------------------------- the evaluation's device statistics


def expected_summary(groups: list[list[Token]], n_experts: int, vocab: int) -> dict:
    """Every new per-layer value of LayerStats.summary, by brute force."""
    counts = brute_cocounts(groups, n_experts)
    joint, occurrences = brute_joint(groups, n_experts, vocab)
    ids, top_counts, shares = brute_top_tokens(joint, TOP_TOKENS)
    percentiles = np.percentile(brute_utilisation(groups, n_experts), list(UTILISATION_PERCENTILES.values()))
    return {
        "coactivation": counts.astype(int).tolist(),
        **brute_coactivation(counts),
        **brute_vocabulary(joint, occurrences),
        "top_tokens": ids,
        "top_token_counts": top_counts,
        "top_token_share": float(np.nanmean(shares)),
        "token_expert_mi_share_of_max": brute_mi_share_of_max(joint, occurrences),
        "token_expert_mi": metrics.token_expert_mutual_information(joint),
        **dict(zip(UTILISATION_METRICS, percentiles)),
    }


def assert_summary(got: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert got[key] == (value if isinstance(value, list) else pytest.approx(value)), key


@pytest.mark.parametrize(
    "n_experts, k", [(4, 2), (8, 2), (3, 2), (5, 1)], ids=["membership", "pairs", "membership-small-E", "pairs-top1"]
)
def test_layer_stats_match_the_brute_force_for_a_token_choice_routing(n_experts, k):
    """2 k^2 <= E + 1 takes the k x k slot pairs, otherwise the membership product: both exact."""
    rng = np.random.default_rng(n_experts * 10 + k)
    groups = random_groups(rng, n_groups=5, n_tokens=24, n_experts=n_experts, k=k, vocab=9)
    got = layer_summary(groups, n_experts, 9, lambda group: token_choice_routing(group, n_experts, k, rng))
    assert_summary(got, expected_summary(groups, n_experts, 9))
    assert np.diag(got["coactivation"]).tolist() == got["load"]


def test_layer_stats_match_the_brute_force_on_the_hand_made_routing_with_and_without_choice():
    rng = np.random.default_rng(1)
    expected = expected_summary(HAND_MADE, E, V)
    assert_summary(layer_summary(HAND_MADE, E, V, lambda group: token_choice_routing(group, E, K, rng)), expected)
    assert_summary(layer_summary(HAND_MADE, E, V, lambda group: assignment_routing(group, E)), expected)


def test_top_tokens_are_capped_at_the_vocabulary_and_break_ties_to_the_lower_id():
    got = layer_summary(HAND_MADE, E, V, lambda group: assignment_routing(group, E))
    assert len(got["top_tokens"]) == E and all(len(ids) == min(TOP_TOKENS, V) for ids in got["top_tokens"])
    # expert 1: token id 0 four times, 2 twice; then ids 1, 3, 4, 5 with none, in id order
    assert got["top_tokens"][1] == [0, 2, 1, 3, 4, 5] and got["top_token_counts"][1] == [4, 2, 0, 0, 0, 0]


def test_the_mi_is_unchanged_by_the_new_statistics():
    joint, _ = brute_joint(HAND_MADE, E, V)
    got = layer_summary(HAND_MADE, E, V, lambda group: assignment_routing(group, E))
    assert got["token_expert_mi"] == token_expert_mutual_information(torch.tensor(joint, dtype=torch.long))


def test_a_layer_without_assignments_has_undefined_specialisation():
    empty = [[(1, (), False), (2, (), False)]]
    got = layer_summary(empty, E, V, lambda group: assignment_routing(group, E))
    for key in ("coactivation_max", "vocab_specialisation", "token_expert_mi_share_of_max", *UTILISATION_METRICS):
        assert got[key] is None or math.isnan(got[key]), key


def test_expert_choice_counts_each_token_once_per_expert():
    """An assignment routing may list a (token, expert) pair twice: membership is 0 or 1."""
    group = [(0, (0, 1), True), (1, (1,), True)]
    routing = assignment_routing(group, 3)
    doubled = Routing(
        expert=torch.cat([routing.expert, torch.tensor([0])]),
        token=torch.cat([routing.token, torch.tensor([0])]),
        weight=torch.ones(routing.expert.numel() + 1),
        loss=torch.zeros(()),
    )
    stats = LayerStats(3, V, torch.device("cpu"))
    stats.add(doubled, torch.tensor([0, 1]), torch.tensor([True, True]))
    cocounts = stats.cocounts.view(4, 4)[:3, :3]
    assert cocounts.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]


def test_many_experts_keep_the_scalars_and_leave_the_matrix_out(monkeypatch):
    import gtmoe.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "MAX_COACTIVATION_EXPERTS", 3)
    got = layer_summary(HAND_MADE, E, V, lambda group: assignment_routing(group, E))
    assert got["coactivation"] is None
    assert got["coactivation_max"] == pytest.approx(
        brute_coactivation(brute_cocounts(HAND_MADE, E))["coactivation_max"]
    )


def test_the_brute_force_helpers_agree_with_each_other():
    """The brute force itself: the joint counts and the co-counts describe the same routing."""
    joint, occurrences = brute_joint(HAND_MADE, E, V)
    assert joint.sum() == np.trace(brute_cocounts(HAND_MADE, E))
    assert occurrences.sum() == sum(valid for group in HAND_MADE for _, _, valid in group)
    per_id = defaultdict(set)
    for token_id, experts, valid in (t for g in HAND_MADE for t in g):
        per_id[token_id] |= set(experts) if valid else set()
    assert per_id[0] == {0, 1}
