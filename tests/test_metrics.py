"""Metrics against brute-force formulas and scipy, edge cases included."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from gtmoe import metrics

E = 8


def gini_brute(c):
    c = np.asarray(c, dtype=float)
    return sum(abs(a - b) for a, b in itertools.product(c, c)) / (2 * len(c) * c.sum())


@pytest.mark.parametrize("counts", [[5, 1, 0, 7, 7, 2, 9, 3], [1, 1], [100, 0, 0], np.arange(1, 17)])
def test_gini_matches_the_double_sum(counts):
    assert metrics.gini(counts) == pytest.approx(gini_brute(counts), abs=1e-12)


def test_all_tokens_on_one_expert_is_maximal_imbalance():
    counts = [0] * (E - 1) + [1000]
    assert metrics.gini(counts) == pytest.approx((E - 1) / E)
    assert metrics.load_entropy(counts) == 0.0
    assert metrics.max_violation(counts) == pytest.approx(E - 1)
    assert metrics.dead_experts(counts) == E - 1


def test_uniform_load_is_perfect_balance():
    counts = [250] * E
    assert metrics.gini(counts) == 0.0
    assert metrics.load_entropy(counts) == pytest.approx(1.0)
    assert metrics.coefficient_of_variation(counts) == 0.0
    assert metrics.max_violation(counts) == 0.0
    assert metrics.dead_experts(counts) == 0


def test_entropy_and_cv_against_scipy_and_numpy():
    counts = np.array([12, 3, 0, 40, 8, 8, 1, 20])
    assert metrics.load_entropy(counts) == pytest.approx(stats.entropy(counts) / math.log(E))
    assert metrics.coefficient_of_variation(counts) == pytest.approx(stats.variation(counts))
    assert metrics.max_violation(counts) == pytest.approx(40 / counts.mean() - 1)


def test_dead_experts_threshold_is_a_tenth_of_uniform():
    counts = np.array([1000, 1000, 1000, 1000, 1000, 1000, 90, 80])  # threshold 0.1/8 of 6170 = 77.1: none dead
    f = counts / counts.sum()
    assert metrics.dead_experts(counts) == int(np.sum(f < 0.1 / E)) == 0
    assert metrics.dead_experts([1000] * 6 + [90, 70]) == 1


def test_mutual_information_against_a_brute_force_sum():
    rng = np.random.default_rng(0)
    joint = rng.integers(0, 20, size=(30, 4))
    p = joint / joint.sum()
    px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / (px @ py)[nz])))
    assert metrics.token_expert_mutual_information(joint, normalise=False) == pytest.approx(mi)
    assert metrics.token_expert_mutual_information(joint) == pytest.approx(mi / stats.entropy(py.ravel()))


def test_mutual_information_extremes():
    independent = np.outer([1, 2, 3, 4], [5, 5, 5, 5])
    assert metrics.token_expert_mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    determined = np.eye(4) * 10  # token i always goes to expert i
    assert metrics.token_expert_mutual_information(determined) == pytest.approx(1.0)


def test_router_saturation_counts_the_overlap_of_topk_sets():
    early = np.array([[0, 1], [2, 3], [0, 3]])
    final = np.array([[1, 0], [0, 1], [3, 2]])
    # token 0: {0,1} vs {1,0} -> 2/2; token 1: {2,3} vs {0,1} -> 0; token 2: {0,3} vs {3,2} -> 1/2
    assert metrics.router_saturation(early, final) == pytest.approx((1 + 0 + 0.5) / 3)
    with pytest.raises(ValueError):
        metrics.router_saturation(early, final[:2])


def test_perplexity():
    assert metrics.perplexity(2 * math.log(5), 2) == pytest.approx(5.0)
    assert math.isnan(metrics.perplexity(1.0, 0))


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError):
        metrics.gini([])
    with pytest.raises(ValueError):
        metrics.gini([1, -1])
