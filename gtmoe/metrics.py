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
