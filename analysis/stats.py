"""Statistics over seeds: per-variant summaries and seed-paired comparisons.

Conventions
-----------
* Confidence intervals are two-sided 95% Student t intervals, ``mean ± t_{0.975, n-1} · s/√n``
  with the sample standard deviation ``s`` (ddof = 1).
* With fewer than two values, std and CI are NaN (rendered "n/a"), never 0.
* Paired differences are ``b − a`` per seed, where ``a`` is the reference (``topk``) or
  ``rdesi`` and ``b`` the other variant. For perplexity and imbalance metrics a positive
  difference therefore means ``b`` is worse than ``a``; for an ablation it means that
  removing the term hurt, i.e. the term helped.
* Holm's step-down adjustment is applied within one table, separately for each test,
  over the rows where that test produced a p-value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from analysis.collect import MODEL_LEVEL, variant_order

CONFIDENCE = 0.95
MIN_WILCOXON_N = 5  # at n = 4 the smallest exact two-sided p is 0.125: the test could never reject
SUMMARY_METRICS = ("ppl", "word_ppl", "gini", "load_entropy", "cv", "maxvio_global",
                   "maxvio_batch", "dead_experts", "drop_rate", "token_expert_mi",
                   "router_saturation", "tokens_per_s")
TRAIN_METRICS = ("final_loss", "mean_tokens_per_s", "train_wall_s")
COMPARISON_METRICS = ("ppl", "gini", "load_entropy", "maxvio_global", "maxvio_batch",
                      "dead_experts")
ABLATION_BASE = "rdesi"
ABLATIONS = ("rdesi_no_reputation", "rdesi_no_load", "rdesi_no_bonus")
# Display names, and the direction of "better" where one exists (token-expert MI and
# router saturation describe routing, they are not better high or low).
METRIC_LABELS = {
    "ppl": "PPL", "word_ppl": "word PPL", "nll": "NLL (nats/token)", "gini": "Gini",
    "load_entropy": "load entropy", "cv": "CV", "maxvio_global": "MaxVio global",
    "maxvio_batch": "MaxVio batch", "dead_experts": "dead experts", "drop_rate": "drop rate",
    "token_expert_mi": "token-expert MI", "router_saturation": "router saturation",
    "tokens_per_s": "tokens/s", "final_loss": "final train loss",
    "mean_tokens_per_s": "train tokens/s", "train_wall_s": "train wall (s)",
}
LOWER_IS_BETTER = frozenset({"ppl", "word_ppl", "nll", "gini", "cv", "maxvio_global",
                             "maxvio_batch", "dead_experts", "drop_rate", "final_loss",
                             "train_wall_s"})
HIGHER_IS_BETTER = frozenset({"load_entropy", "tokens_per_s", "mean_tokens_per_s"})
SUMMARY_COLUMNS = ["variant", "split", "metric", "n", "mean", "std", "ci_low", "ci_high"]
COMPARISON_COLUMNS = ["variant_a", "variant_b", "split", "metric", "n", "seeds", "mean_a",
                      "mean_b", "mean_diff", "ci_low", "ci_high", "p_ttest", "p_ttest_holm",
                      "p_wilcoxon", "p_wilcoxon_holm", "hedges_g", "note"]


# --------------------------------------------------------------------------- descriptives

def metric_label(metric: str) -> str:
    """Human-readable name of a metric (the metric key itself when none is defined)."""
    return METRIC_LABELS.get(metric, metric)


def t_confidence_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Student t interval of the mean; ``(nan, nan)`` for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n < 2:
        return math.nan, math.nan
    # t.ppf * sem rather than t.interval: the latter returns NaN when the sd is exactly 0,
    # where the interval is legitimately the point [mean, mean].
    half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * stats.sem(x)
    mean = float(x.mean())
    return mean - half, mean + half


def describe(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """n, mean, std (ddof=1) and t CI of the finite values; NaN where undefined."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    low, high = t_confidence_interval(x, confidence)
    return dict(n=n,
                mean=float(x.mean()) if n else math.nan,
                std=float(x.std(ddof=1)) if n >= 2 else math.nan,
                ci_low=low, ci_high=high)


def summarize(tidy: pd.DataFrame, metrics: Iterable[str] = SUMMARY_METRICS,
              splits: Iterable[str] = ("test",), layer: str = MODEL_LEVEL) -> pd.DataFrame:
    """Per (variant, split, metric): n, mean, std, 95% t CI over seeds.

    ``n`` counts seeds with a finite value, so a metric undefined for a variant
    (load metrics of ``dense``) shows n = 0 and NaN statistics instead of vanishing.
    Rows follow the study's variant order, then ``splits``, then ``metrics``.
    """
    metrics, splits = list(metrics), list(splits)
    selected = tidy[(tidy["layer"] == layer) & tidy["split"].isin(splits) & tidy["metric"].isin(metrics)]
    groups = {key: g["value"].to_numpy() for key, g in
              selected.groupby([selected["variant"].astype(str), "split", "metric"], observed=True)}
    rows = [dict(variant=variant, split=split, metric=metric,
                 **describe(groups.get((variant, split, metric), [])))
            for variant in variant_order(tidy) for split in splits for metric in metrics]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# --------------------------------------------------------------------------- paired tests

def holm_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values; NaN entries are not in the family.

    With the m valid p-values sorted ascending, ``p_adj(i) = max_{j ≤ i} min(1, (m − j + 1) p(j))``
    (1-based); the running maximum keeps the adjusted values monotone.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    m = valid.size
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def hedges_g(differences: Sequence[float]) -> tuple[float, str]:
    """Hedges' g of paired differences, ``d_z · J`` with ``d_z = mean/sd`` and
    ``J = 1 − 3 / (4(n − 1) − 1)``; returns ``(g, reason)`` with NaN and a reason when undefined.
    """
    d = np.asarray(differences, dtype=float)
    n = d.size
    if n < 2:
        return math.nan, f"n={n}: effect size undefined (need n ≥ 2)"
    if n == 2:
        # J = 1 − 3/3 = 0 would report g = 0 whatever the data: not an effect size.
        return math.nan, "n=2: Hedges' correction J is 0, effect size undefined"
    sd = d.std(ddof=1)
    if sd == 0:
        return math.nan, "differences have zero variance: effect size undefined"
    correction = 1 - 3 / (4 * (n - 1) - 1)
    return float(d.mean() / sd * correction), ""


def paired_test(a: pd.Series, b: pd.Series, confidence: float = CONFIDENCE) -> dict:
    """Compare two per-seed series (index = seed) on their common seeds with finite values.

    Returns n, seeds, means, mean difference ``b − a`` with its t CI, paired t-test p,
    Wilcoxon signed-rank p (n ≥ 5), Hedges' g and a ``note`` explaining every NaN.
    """
    joined = pd.concat({"a": a, "b": b}, axis=1, join="inner").dropna()
    joined = joined[np.isfinite(joined).all(axis=1)].sort_index()
    n = len(joined)
    diff = (joined["b"] - joined["a"]).to_numpy()
    notes = []
    result = dict(n=n, seeds=",".join(str(s) for s in joined.index),
                  mean_a=float(joined["a"].mean()) if n else math.nan,
                  mean_b=float(joined["b"].mean()) if n else math.nan,
                  mean_diff=float(diff.mean()) if n else math.nan,
                  p_ttest=math.nan, p_wilcoxon=math.nan, hedges_g=math.nan)
    result["ci_low"], result["ci_high"] = t_confidence_interval(diff, confidence)

    if n == 0:
        notes.append("no seed with finite values in both variants")
    elif n == 1:
        notes.append("n=1: no CI, tests or effect size (need n ≥ 2)")
    elif np.all(diff == 0):
        notes.append("all differences are zero: tests and effect size undefined")
    else:
        constant = diff.std(ddof=1) == 0
        if constant:
            # A constant non-zero shift gives t = ±inf and p = 0: an artefact, not evidence.
            notes.append("differences are constant: t-test and effect size undefined")
        else:
            result["p_ttest"] = float(stats.ttest_rel(joined["b"], joined["a"]).pvalue)
            result["hedges_g"], reason = hedges_g(diff)
            if reason:
                notes.append(reason)
        if n < MIN_WILCOXON_N:
            notes.append(f"n<{MIN_WILCOXON_N}: no Wilcoxon")
        else:
            # zero_method="wilcox" (Wilcoxon's original): zero differences are dropped
            # before ranking; tied magnitudes share average ranks.
            result["p_wilcoxon"] = float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)
            zeros = int(np.sum(diff == 0))
            if zeros:
                notes.append(f"Wilcoxon dropped {zeros} zero difference(s)")
    result["note"] = "; ".join(notes)
    return result


def per_seed(tidy: pd.DataFrame, variant: str, metric: str, split: str,
             layer: str = MODEL_LEVEL) -> pd.Series:
    """Values of one variant/metric/split indexed by seed."""
    rows = tidy[(tidy["variant"].astype(str) == variant) & (tidy["metric"] == metric)
                & (tidy["split"] == split) & (tidy["layer"] == layer)]
    if rows["seed"].duplicated().any():
        raise ValueError(f"several values per seed for {variant}/{metric}/{split}/{layer}")
    return rows.set_index("seed")["value"]


def paired_comparisons(tidy: pd.DataFrame, pairs: Sequence[tuple[str, str]],
                       metrics: Iterable[str] = COMPARISON_METRICS, split: str = "test",
                       confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Seed-paired comparison of every ``(a, b)`` pair on every metric (difference = b − a).

    Holm's adjustment runs over all rows of the returned table, once for the t-test
    p-values and once for the Wilcoxon p-values.
    """
    rows = []
    for a, b in pairs:
        for metric in metrics:
            test = paired_test(per_seed(tidy, a, metric, split), per_seed(tidy, b, metric, split),
                               confidence)
            rows.append(dict(variant_a=a, variant_b=b, split=split, metric=metric, **test))
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    table["p_ttest_holm"] = holm_adjust(table["p_ttest"])
    table["p_wilcoxon_holm"] = holm_adjust(table["p_wilcoxon"])
    return table


def reference_pairs(variants: Sequence[str], reference: str) -> list[tuple[str, str]]:
    """``(reference, v)`` for every other variant, in study order."""
    if reference not in variants:
        raise ValueError(f"reference variant {reference!r} not among {list(variants)}")
    return [(reference, v) for v in variants if v != reference]


def ablation_pairs(variants: Sequence[str], base: str = ABLATION_BASE,
                   ablations: Sequence[str] = ABLATIONS) -> list[tuple[str, str]]:
    """``(base, ablation)`` for each ablation present in ``variants`` (none without the base)."""
    if base not in variants:
        return []
    return [(base, v) for v in ablations if v in variants]


# --------------------------------------------------------------------------- load balance

def gini(loads: np.ndarray) -> np.ndarray:
    """Gini coefficient over the last axis: ``Σ_i Σ_j |c_i − c_j| / (2 E Σ_i c_i)``.

    Computed as ``Σ_i (2i − E − 1) c_(i) / (E Σ c)`` over ascending order statistics
    (1-based ``i``), which equals the pairwise form in O(E log E).
    """
    c = np.sort(np.asarray(loads, dtype=float), axis=-1)
    e = c.shape[-1]
    weights = 2 * np.arange(1, e + 1) - e - 1
    return (c * weights).sum(axis=-1) / (e * c.sum(axis=-1))


def maxvio(loads: np.ndarray) -> np.ndarray:
    """MaxVio over the last axis: ``max_i c_i / mean(c) − 1``."""
    c = np.asarray(loads, dtype=float)
    return c.max(axis=-1) / c.mean(axis=-1) - 1


def router_balance_curves(router_log: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed, step): Gini and MaxVio of that step's batch, mean over MoE layers.

    ``load`` in the router log is the fraction of the step's assignments per expert, so
    the per-step MaxVio is the training-time counterpart of ``maxvio_batch``.
    """
    keys = ["variant", "seed", "step", "layer"]
    if router_log.empty:
        return pd.DataFrame(columns=["variant", "seed", "step", "gini", "maxvio_batch"])
    loads = router_log.set_index([*keys, "expert"])["load"].unstack("expert").sort_index(axis=1)
    per_layer = pd.DataFrame({"gini": gini(loads.to_numpy()), "maxvio_batch": maxvio(loads.to_numpy())},
                             index=loads.index)
    return per_layer.groupby(level=["variant", "seed", "step"], sort=True).mean().reset_index()
