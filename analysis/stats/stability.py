"""How stable routing is (issue 23): over training (StableMoE), and across seeds. Nothing here knows a router:
only expert sets and the evaluation's per-layer arrays are read.

**Over training** (StableMoE, Dai et al. 2022, arXiv 2204.08396). The evaluation computes, from the routing
snapshots of the probe that training takes (gtmoe.stability), per MoE layer the share of probe tokens whose expert
set changes between consecutive snapshots (``fluctuation_curve``) and the share whose routing no longer differs
from its final one after each snapshot (``settled_curve``, StableMoE's Figure 2 read from the left).
``stability_curves`` puts them on one axis, training progress (snapshot step / final step), and averages layers.

**Across seeds**: is a router's routing a property of the data or of the seed? Two seeds of a variant route the same
probe tokens (gtmoe.probe: `eval.probe_blocks` validation blocks, the same for every run). Their expert labels are
arbitrary, so the agreement of seeds a and b in one MoE layer is taken up to a permutation of b's labels: with
``C[i, j]`` the number of valid probe tokens that a sends to expert i and b to expert j (the co-assignment matrix),
the permutation ``π`` maximising ``Σ_i C[i, π(i)]`` is found by the Hungarian method
(``scipy.optimize.linear_sum_assignment``), and

    agreement = 2 Σ_i C[i, π(i)] / (Σ_t |S_a(t)| + Σ_t |S_b(t)|),

the share of the two routings' assignments that coincide after matching (``S(t)``: token t's expert set). With k
experts per token in both it is the mean share of a token's k experts the two seeds share; it is 1 for the same
routing under any relabelling and symmetric in a and b. Matching inflates agreement between unrelated routings, so
each pair also has a **chance** value: the same computation after b's tokens are shuffled (a fixed permutation),
which keeps both routings' loads and breaks only the token correspondence.

Pairs of seeds share seeds, so their agreements are not independent: the summary gives the mean and the range over
pairs, no confidence interval.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from analysis.collect import variant_order

SHUFFLE_SEED = 20_231  # the fixed token permutation of the chance value
CURVE_COLUMNS = ["variant", "seed", "progress", "curve", "share", "n_layers"]
FLUCTUATION, SETTLED = "fluctuation", "settled"  # the two curves
PAIR_COLUMNS = ["variant", "layer", "seed_a", "seed_b", "agreement", "chance", "tokens"]
SUMMARY_COLUMNS = [
    "variant",
    "n_seeds",
    "n_pairs",
    "n_layers",
    "agreement_mean",
    "agreement_min",
    "agreement_max",
    "chance_mean",
    "tokens",
]


def stability_curves(arrays: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, seed, curve, snapshot) from the per-layer arrays (collect.load_layer_arrays) that
    hold routing snapshots: ``progress`` the snapshot's step over the run's final one (a fluctuation is placed
    at the end of its interval), ``share`` the mean over the run's MoE layers. Variants in study order; runs
    without snapshots add no row."""
    present = arrays[arrays["snapshot_steps"].map(lambda steps: steps is not None and len(steps) > 1)]
    rows = []
    for (variant, seed), run in present.groupby(["variant", "seed"], sort=False, observed=True):
        steps = np.asarray(run["snapshot_steps"].iloc[0], dtype=np.float64)
        same = [np.array_equal(np.asarray(s, dtype=np.float64), steps) for s in run["snapshot_steps"]]
        layers = run[same]
        progress = steps / steps[-1]
        for curve, column, at in (
            (FLUCTUATION, "fluctuation_curve", progress[1:]),
            (SETTLED, "settled_curve", progress),
        ):
            values = np.stack([np.asarray(v, dtype=np.float64) for v in layers[column]]).mean(axis=0)
            rows += [
                dict(
                    variant=str(variant),
                    seed=int(seed),
                    progress=float(x),
                    curve=curve,
                    share=float(y),
                    n_layers=len(layers),
                )
                for x, y in zip(at, values)
            ]
    curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    order = [v for v in variant_order(arrays) if v in set(curves["variant"])]
    curves["variant"] = pd.Categorical(curves["variant"], categories=order, ordered=True)
    return curves.sort_values(["variant", "seed", "curve", "progress"], kind="stable").reset_index(drop=True)


def matched_agreement(sets_a: np.ndarray, sets_b: np.ndarray) -> float:
    """The agreement of two routings of the same tokens, (N, E) bool expert sets each, up to a permutation of
    the second's expert labels (module docstring); NaN when neither assigns a token."""
    a, b = np.asarray(sets_a, dtype=np.float64), np.asarray(sets_b, dtype=np.float64)
    assignments = a.sum() + b.sum()
    if assignments == 0:
        return math.nan
    co_assigned = a.T @ b  # C[i, j]: tokens a sends to i and b to j
    rows, cols = linear_sum_assignment(co_assigned, maximize=True)
    return float(2.0 * co_assigned[rows, cols].sum() / assignments)


def pair_agreement(sets_a: np.ndarray, sets_b: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """(agreement, chance) of two routings over the `valid` tokens: chance shuffles b's valid tokens with
    SHUFFLE_SEED's permutation first."""
    valid = np.asarray(valid, dtype=bool)
    a, b = np.asarray(sets_a, dtype=bool)[valid], np.asarray(sets_b, dtype=bool)[valid]
    shuffled = b[np.random.default_rng(SHUFFLE_SEED).permutation(len(b))]
    return matched_agreement(a, b), matched_agreement(a, shuffled)


def agreement_pairs(probes: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, layer, pair of seeds) of the probe routings ``probes`` (collect.load_probe_routings:
    variant, seed, layer, sets, valid, probe): every pair of the variant's seeds whose probes are the same tokens
    (the same ``probe`` digest) and whose sets have the same shape. Variants in study order."""
    rows = []
    for variant in variant_order(probes):
        part = probes[probes["variant"].astype(str) == variant]
        for layer, runs in part.groupby("layer", sort=True):
            runs = runs.sort_values("seed")
            for (_, a), (_, b) in itertools.combinations(runs.iterrows(), 2):
                if a["probe"] != b["probe"] or a["sets"].shape != b["sets"].shape:
                    continue
                valid = np.asarray(a["valid"], dtype=bool) & np.asarray(b["valid"], dtype=bool)
                agreement, chance = pair_agreement(a["sets"], b["sets"], valid)
                rows.append(
                    dict(
                        variant=variant,
                        layer=int(layer),
                        seed_a=int(a["seed"]),
                        seed_b=int(b["seed"]),
                        agreement=agreement,
                        chance=chance,
                        tokens=int(valid.sum()),
                    )
                )
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def agreement_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per variant: its seeds and pairs, the mean agreement over pairs and layers with the range of the pairs'
    layer-mean agreements, and the mean chance value (no CI: pairs share seeds). Variants in the pairs' order."""
    rows = []
    for variant in dict.fromkeys(pairs["variant"].astype(str)):
        part = pairs[pairs["variant"].astype(str) == variant]
        by_pair = part.groupby(["seed_a", "seed_b"])["agreement"].mean()
        rows.append(
            dict(
                variant=variant,
                n_seeds=len(set(part["seed_a"]) | set(part["seed_b"])),
                n_pairs=len(by_pair),
                n_layers=int(part["layer"].nunique()),
                agreement_mean=float(part["agreement"].mean()),
                agreement_min=float(by_pair.min()),
                agreement_max=float(by_pair.max()),
                chance_mean=float(part["chance"].mean()),
                tokens=int(part["tokens"].max()),
            )
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
