"""Agreement across seeds (analysis.stats.agreement) against brute force: every permutation of the labels tried."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from analysis.stats import stability as agreement


def _random_sets(rng: np.random.Generator, n_tokens: int, n_experts: int, k: int | None) -> np.ndarray:
    """(n_tokens, n_experts) expert sets: k distinct experts per token, or (k None) any number, empty ones too."""
    if k is None:
        return rng.random((n_tokens, n_experts)) < 0.3
    sets = np.zeros((n_tokens, n_experts), dtype=bool)
    for token in range(n_tokens):
        sets[token, rng.choice(n_experts, size=k, replace=False)] = True
    return sets


def _brute_force(a: np.ndarray, b: np.ndarray) -> float:
    """The largest share of coinciding assignments over every relabelling of b, token by token."""
    best = 0
    for perm in itertools.permutations(range(a.shape[1])):
        relabelled = np.zeros_like(b)
        relabelled[:, list(perm)] = b  # b's expert j becomes perm[j]
        shared = sum(int(np.sum(a[t] & relabelled[t])) for t in range(a.shape[0]))
        best = max(best, shared)
    return 2 * best / (a.sum() + b.sum())


@pytest.mark.parametrize("k", [1, 2, None])
def test_matched_agreement_is_the_best_relabelling(k):
    rng = np.random.default_rng(k or 7)
    for _ in range(5):
        a, b = (_random_sets(rng, 40, 5, k) for _ in range(2))
        assert agreement.matched_agreement(a, b) == pytest.approx(_brute_force(a, b))


def test_top_k_agreement_is_the_mean_share_of_shared_experts():
    """With k experts per token in both routings, the agreement is the mean over tokens of |S_a ∩ π(S_b)| / k."""
    rng = np.random.default_rng(3)
    a = _random_sets(rng, 60, 4, 2)
    b = a[:, [2, 0, 3, 1]].copy()  # the same routing, relabelled
    b[:15] = _random_sets(rng, 15, 4, 2)  # then a quarter rerouted
    value = agreement.matched_agreement(a, b)
    shares = []
    for perm in itertools.permutations(range(4)):
        relabelled = np.zeros_like(b)
        relabelled[:, list(perm)] = b
        shares.append(np.mean([np.sum(a[t] & relabelled[t]) / 2 for t in range(60)]))
    assert value == pytest.approx(max(shares))


def test_agreement_is_invariant_to_labels_and_symmetric():
    rng = np.random.default_rng(11)
    a, b = _random_sets(rng, 80, 6, 2), _random_sets(rng, 80, 6, 2)
    value = agreement.matched_agreement(a, b)
    for _ in range(4):
        assert agreement.matched_agreement(a, b[:, rng.permutation(6)]) == pytest.approx(value)
        assert agreement.matched_agreement(a[:, rng.permutation(6)], b) == pytest.approx(value)
    assert agreement.matched_agreement(b, a) == pytest.approx(value)
    assert agreement.matched_agreement(a, a[:, rng.permutation(6)]) == pytest.approx(1.0)
    assert np.isnan(agreement.matched_agreement(np.zeros((3, 4), bool), np.zeros((3, 4), bool)))


def test_chance_shuffles_tokens_and_invalid_tokens_do_not_count():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 4, size=200)  # a routing that follows the token: each of 4 "words" has its expert pair
    pairs = np.array([[0, 1], [2, 3], [1, 2], [0, 3]])
    a = np.zeros((200, 4), bool)
    a[np.arange(200)[:, None], pairs[ids]] = True
    b = a[:, [3, 2, 1, 0]]
    valid = np.ones(200, bool)
    valid[:20] = False
    value, chance = agreement.pair_agreement(a, b, valid)
    assert value == pytest.approx(1.0)
    assert chance < 0.9
    noisy = b.copy()
    noisy[:20] = ~noisy[:20]  # only invalid tokens change
    assert agreement.pair_agreement(a, noisy, valid) == pytest.approx((value, chance))
    kept = valid.copy()
    shuffled = b[valid][np.random.default_rng(agreement.SHUFFLE_SEED).permutation(valid.sum())]
    assert chance == pytest.approx(agreement.matched_agreement(a[kept], shuffled))


def _probes(n_seeds: int, digest=lambda seed: "p") -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for variant in ("b", "a"):
        for seed in range(n_seeds):
            for layer in (0, 1):
                rows.append(
                    dict(
                        variant=variant,
                        seed=seed,
                        layer=layer,
                        sets=_random_sets(rng, 30, 4, 2),
                        valid=np.ones(30, bool),
                        probe=digest(seed),
                    )
                )
    frame = pd.DataFrame(rows)
    frame["variant"] = pd.Categorical(frame["variant"], categories=["b", "a"], ordered=True)
    return frame


def test_pairs_and_summary_count_every_pair_once():
    probes = _probes(4)
    pairs = agreement.agreement_pairs(probes)
    assert list(dict.fromkeys(pairs["variant"])) == ["b", "a"]
    assert len(pairs) == 2 * 2 * 6  # variants x layers x C(4, 2)
    first = pairs.iloc[0]
    rows = probes[(probes["variant"] == "b") & (probes["layer"] == first["layer"])].set_index("seed")
    expected = agreement.pair_agreement(
        rows.loc[first["seed_a"], "sets"], rows.loc[first["seed_b"], "sets"], np.ones(30, bool)
    )
    assert (first["agreement"], first["chance"]) == pytest.approx(expected)
    summary = agreement.agreement_summary(pairs).set_index("variant")
    assert summary.loc["b", ["n_seeds", "n_pairs", "n_layers"]].tolist() == [4, 6, 2]
    b = pairs[pairs["variant"] == "b"]
    assert summary.loc["b", "agreement_mean"] == pytest.approx(b["agreement"].mean())
    by_pair = b.groupby(["seed_a", "seed_b"])["agreement"].mean()
    assert summary.loc["b", "agreement_min"] == pytest.approx(by_pair.min())
    assert summary.loc["b", "agreement_max"] == pytest.approx(by_pair.max())


def test_pairs_of_different_probes_are_not_compared():
    pairs = agreement.agreement_pairs(_probes(3, digest=lambda seed: "p" if seed < 2 else "q"))
    assert set(zip(pairs["seed_a"], pairs["seed_b"])) == {(0, 1)}


def test_the_analysis_never_imports_torch():
    """ARCHITECTURE.md's rule: every analysis step, figures and findings included, runs without torch (gtmoe.probe's
    unpacking is numpy; its torch imports sit in the functions that route a model)."""
    import subprocess
    import sys

    code = "import sys, analysis.__main__; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert done.stdout.strip() == "False"


def test_packed_sets_round_trip_and_a_truncated_string_is_refused():
    from gtmoe.probe import pack_expert_sets, unpack_expert_sets

    sets = np.random.default_rng(1).random((37, 5)) < 0.4
    packed = pack_expert_sets(sets)
    assert np.array_equal(unpack_expert_sets(packed, 37, 5), sets)
    for bad in (packed[:-2], packed + "00"):
        with pytest.raises(ValueError, match="bytes of expert sets"):
            unpack_expert_sets(bad, 37, 5)
    with pytest.raises(ValueError):
        unpack_expert_sets(packed, 10**12, 8)  # a hostile token count allocates nothing
