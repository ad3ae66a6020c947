"""Load-balance, specialisation and language-model metrics (SPEC §5). Pure functions of counts.

`counts` is a vector of tokens (assignments) per expert; `f = counts / counts.sum()`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def _counts(counts: ArrayLike) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"expected a non-empty vector of per-expert counts, got shape {c.shape}")
    if np.any(c < 0):
        raise ValueError("per-expert counts must be >= 0")
    return c


def gini(counts: ArrayLike) -> float:
    """sum_i sum_j |c_i - c_j| / (2 E sum_i c_i): 0 = perfect balance, (E-1)/E = all on one expert."""
    c = _counts(counts)
    total = c.sum()
    if total == 0:
        return float("nan")
    # Sorted form of the mean absolute difference: O(E log E) instead of O(E^2).
    c = np.sort(c)
    n = c.size
    ranks = np.arange(1, n + 1)
    return float(np.sum((2 * ranks - n - 1) * c) / (n * total))


def load_entropy(counts: ArrayLike) -> float:
    """Normalised entropy -sum f_i ln f_i / ln E: 1 = perfect balance, 0 = all on one expert."""
    c = _counts(counts)
    if c.size == 1:
        return 1.0
    total = c.sum()
    if total == 0:
        return float("nan")
    f = c[c > 0] / total
    return float(-np.sum(f * np.log(f)) / math.log(c.size))


def coefficient_of_variation(counts: ArrayLike) -> float:
    """std(c) / mean(c), population std."""
    c = _counts(counts)
    mean = c.mean()
    return float(c.std() / mean) if mean > 0 else float("nan")


def max_violation(counts: ArrayLike) -> float:
    """MaxVio = max_i c_i / mean(c) - 1 (Wang et al. 2024): 0 at perfect balance."""
    c = _counts(counts)
    mean = c.mean()
    return float(c.max() / mean - 1.0) if mean > 0 else float("nan")


def dead_experts(counts: ArrayLike, threshold: float = 0.1) -> int:
    """Experts that received less than threshold / E of the assignments."""
    c = _counts(counts)
    total = c.sum()
    if total == 0:
        return int(c.size)
    return int(np.sum(c / total < threshold / c.size))


def load_metrics(counts: ArrayLike) -> dict[str, float]:
    """Every scalar load metric of one count vector."""
    return {
        "gini": gini(counts),
        "load_entropy": load_entropy(counts),
        "cv": coefficient_of_variation(counts),
        "maxvio": max_violation(counts),
        "dead_experts": dead_experts(counts),
    }


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def token_expert_mutual_information(joint_counts: ArrayLike, normalise: bool = True) -> float:
    """I(token id; expert) from a (vocab, E) count matrix, in nats; normalised by H(expert) if asked.

    I = H(expert) - H(expert | token). 0: routing ignores token identity; with
    normalisation, 1: the token id determines the expert.
    """
    joint = np.asarray(joint_counts, dtype=np.float64)
    total = joint.sum()
    if total == 0:
        return float("nan")
    p = joint / total
    h_expert = _entropy(p.sum(axis=0))
    mi = _entropy(p.sum(axis=1)) + h_expert - _entropy(p.ravel())
    mi = max(mi, 0.0)  # clip float round-off below zero
    if not normalise:
        return mi
    return mi / h_expert if h_expert > 0 else 0.0


def token_expert_mi_share_of_max(joint_counts: ArrayLike, occurrences: ArrayLike) -> float:
    """I(token id; expert) over the largest value it can take given how many experts each token reaches.

    `joint_counts` (vocab, E): assignments of each token id to each expert; `occurrences` (vocab,): how often
    each token id was evaluated. A token id t reaching k_t = A_t / n_t experts per occurrence (A_t its
    assignments, n_t its occurrences) spreads at least k_t assignments over distinct experts each time, so
    p(expert | t) <= 1 / k_t and H(expert | token) >= L = sum_t p(t) ln max(1, k_t); hence
    I <= min(H(expert) - L, H(token)), attained when every token id always reaches the same k_t experts. For a
    top-k router without drops L = ln k. NaN where the maximum is 0 (every token reaches every expert).
    """
    joint = np.asarray(joint_counts, dtype=np.float64)
    occurrences = np.asarray(occurrences, dtype=np.float64)
    total = joint.sum()
    if total == 0:
        return float("nan")
    p = joint / total
    h_expert, rows = _entropy(p.sum(axis=0)), p.sum(axis=1)
    h_token = _entropy(rows)
    mi = max(h_token + h_expert - _entropy(p.ravel()), 0.0)
    return share_of_attainable_max(mi, h_expert, h_token, conditional_entropy_floor(rows, total, occurrences))


def conditional_entropy_floor(row_probabilities: np.ndarray, total: float, occurrences: np.ndarray) -> float:
    """L = sum_t p(t) ln max(1, k_t) with k_t = A_t / n_t (token_expert_mi_share_of_max), from p(t) = A_t / A."""
    seen = row_probabilities > 0
    per_occurrence = row_probabilities[seen] * total / occurrences[seen]
    return float(np.sum(row_probabilities[seen] * np.log(np.maximum(per_occurrence, 1.0))))


def share_of_attainable_max(mi: float, h_expert: float, h_token: float, floor: float) -> float:
    """MI (nats) over its attainable maximum min(H(expert) - floor, H(token)), `floor` the conditional_entropy_floor
    (token_expert_mi_share_of_max); NaN where that maximum is 0."""
    ceiling = min(h_expert - floor, h_token)
    if ceiling <= 1e-12 * max(1.0, h_expert):  # nothing to learn: the expert set cannot depend on the token
        return float("nan")
    return min(1.0, mi / ceiling)  # mi <= ceiling; only float round-off exceeds it


def coactivation_shares(cocounts: ArrayLike) -> np.ndarray:
    """OLMoE co-activation (Muennighoff et al. 2024, section on co-activation): share[i, j] = C[i, j] / C[i, i],
    the share of the tokens routed to expert i that were also routed to expert j.

    `cocounts` (E, E): C[i, j] the tokens routed to both i and j, C[i, i] the tokens routed to i. The diagonal
    (1 by definition) and the rows of experts without tokens are NaN.
    """
    counts = np.asarray(cocounts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"expected a square (E, E) matrix of co-activation counts, got shape {counts.shape}")
    own = np.diag(counts).copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = counts / own[:, None]
    shares[own == 0] = np.nan
    np.fill_diagonal(shares, np.nan)
    return shares


def coactivation_summary(cocounts: ArrayLike) -> dict[str, float]:
    """The largest off-diagonal co-activation share, and the mean over experts (with tokens) of their strongest
    partner's share, max_j share[i, j]. (The plain mean is fixed by k: a top-k router's rows sum to k - 1.)"""
    shares = coactivation_shares(cocounts)
    partner = [row[np.isfinite(row)].max() for row in shares if np.isfinite(row).any()]
    return {
        "coactivation_max": float(max(partner)) if partner else float("nan"),
        "coactivation_partner_mean": float(np.mean(partner)) if partner else float("nan"),
    }


def vocabulary_specialisation(joint_counts: ArrayLike, occurrences: ArrayLike) -> dict[str, float]:
    """OLMoE's vocabulary specialisation as one number per layer, and its distance from the floor k imposes.

    `joint_counts` (vocab, E): assignments of each token id to each expert; `occurrences` (vocab,): each token
    id's evaluated occurrences. For token id t, the share of its occurrences routed to its most used expert is
    max_e N[t, e] / n_t (OLMoE's N_x^(k), E_i) / N_x at its top expert); weighted by frequency n_t / n over the
    token ids, ``vocab_specialisation = sum_t max_e N[t, e] / n``: 1 when every token id always reaches the same
    expert. A token reaching k experts puts k assignments on E experts, so max_e N[t, e] >= k n_t / E and the score is
    at least the floor A / (n E) (A all assignments: k / E for a top-k router without drops);
    ``vocab_specialisation_above_floor`` = (score - floor) / (1 - floor) is 0 at the floor and 1 at full
    specialisation, comparable across k (NaN when the floor is 1: every token reaches every expert).
    """
    joint = np.asarray(joint_counts, dtype=np.float64)
    n = float(np.sum(occurrences))
    if n == 0 or joint.shape[1] == 0:
        return {"vocab_specialisation": float("nan"), "vocab_specialisation_above_floor": float("nan")}
    score = float(joint.max(axis=1).sum() / n)
    floor = float(joint.sum() / (n * joint.shape[1]))
    return {
        "vocab_specialisation": score,
        "vocab_specialisation_above_floor": (score - floor) / (1 - floor) if floor < 1 else float("nan"),
    }


def top_token_share(joint_counts: ArrayLike, n: int) -> np.ndarray:
    """Per expert: the share of its tokens (assignments) that come from its `n` most routed token ids; NaN for an
    expert without tokens."""
    joint = np.asarray(joint_counts, dtype=np.float64)
    top = -np.sort(-joint, axis=0)[:n].sum(axis=0)
    totals = joint.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, top / totals, np.nan)


def utilisation_percentiles(group_counts: ArrayLike, percentiles: dict[str, float]) -> dict[str, float]:
    """Percentiles of the experts' utilisation E * f over every (routing group, expert) pair: f the expert's share
    of the group's assignments, so 1 is a fair share and 0 an unused expert (NeMo's expert utilisation, load over
    ideal load). `group_counts` (groups, E); groups without assignments are left out; `percentiles`: name ->
    percentile in [0, 100] (numpy's linear interpolation). NaN without a group."""
    counts = np.asarray(group_counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"expected a (groups, E) matrix of per-group counts, got shape {counts.shape}")
    totals = counts.sum(axis=1)
    used = counts[totals > 0]
    if used.size == 0:
        return {name: float("nan") for name in percentiles}
    utilisation = counts.shape[1] * used / totals[totals > 0, None]
    values = np.percentile(utilisation, list(percentiles.values()))
    return {name: float(value) for name, value in zip(percentiles, values)}


def router_saturation(choice_early: ArrayLike, choice_final: ArrayLike) -> float:
    """OLMoE router saturation: mean over tokens of |TopK_early ∩ TopK_final| / k.

    Both arguments are (T, k) expert ids for the same tokens.
    """
    early = np.asarray(choice_early)
    final = np.asarray(choice_final)
    if early.shape != final.shape or early.ndim != 2:
        raise ValueError(f"expected two (tokens, k) arrays of equal shape, got {early.shape} and {final.shape}")
    # (T, k, k) equality table; ids are unique within a row, so row sums count the intersection.
    overlap = (early[:, :, None] == final[:, None, :]).any(axis=2).sum(axis=1)
    return float(overlap.mean() / early.shape[1])


def perplexity(total_nll: float, count: int) -> float:
    """exp(total NLL / count): token perplexity with count = tokens, word-level with count = words."""
    return float(math.exp(total_nll / count)) if count > 0 else float("nan")
