"""Statistics over seeds: per-variant summaries and seed-paired comparisons (``analysis.stats.sensitivity``:
the dose-response curves of the sweeps).

Conventions
-----------
* Confidence intervals are two-sided 95% Student t intervals, ``mean ± t_{0.975, n-1} · s/√n``
  with the sample standard deviation ``s`` (ddof = 1).
* With fewer than two values, std and CI are NaN (rendered "n/a"), never 0.
* Paired differences are ``b − a`` per seed, where ``a`` is the reference variant or the
  ablation base and ``b`` the other variant. For perplexity and imbalance metrics a positive
  difference therefore means ``b`` is worse than ``a``; for an ablation it means that
  removing the term hurt, i.e. the term helped.
* Holm's step-down adjustment runs per family: one family per (metric, split) of a table,
  i.e. the variant comparisons of one endpoint, separately for each test, over the rows
  where that test produced a p-value. A table's families are its own (the ablation table
  is not pooled with the reference comparisons).
* Endpoints and contrasts are declared before the data (config.yaml ``statistics``): the confirmatory tests
  are the declared contrasts and the ablations on the primary endpoints, in their own Holm families
  (``analysis.stats.confirmatory``). The comparisons against the reference and the ablation table made here
  are all labelled exploratory (column ``label``), whatever the metric; ``endpoint`` still says whether the
  metric is a primary one.
* A metric that is constant by construction is not tested: a load metric (``BY_CONSTRUCTION_METRICS``) without
  spread over a variant's seeds, where the variant's router declares that it balances load by construction
  (study record ``routers``), gets no p-value, effect size or MDD, and the note says so.
* The effect size is Hedges' g of the paired differences, i.e. g_z (``d_z = mean(d) / sd(d)`` with the
  small-sample correction), column ``hedges_gz``: not comparable with a g of two independent groups.
* The level ``alpha``, the ``power`` of the MDD and the primary endpoints are the study's (its record,
  ``statistics``): every function that uses them takes them as arguments, without a default.
* Every comparison carries its minimum detectable difference (MDD): the smallest |mean
  difference| a two-sided paired t-test at level ``alpha`` detects with probability
  ``power``, given n and the observed sd of the differences (noncentral t).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from analysis.collect import MODEL_LEVEL, variant_order
from gtmoe import metrics
from gtmoe.contract import (
    LOAD_METRICS,
    SPECIALISATION_METRICS,
    STABILITY_METRICS,
    TOP_TOKENS,
    UTILISATION_METRICS,
    UTILISATION_PERCENTILES,
)
from gtmoe.errors import ConfigError

CONFIDENCE = 0.95  # level of every confidence interval
PRIMARY, EXPLORATORY = "primary", "exploratory"
CONFIRMATORY = "confirmatory"  # a row of a declared family (analysis.stats.confirmatory); every other is EXPLORATORY
# Load metrics that a router balancing by construction can hold fixed (expert choice's Gini of 0): without spread
# over such a variant's seeds they are a property of the method, not a finding, and are not tested.
BY_CONSTRUCTION_METRICS = frozenset(
    {
        *LOAD_METRICS,
        "requested_gini",
        "requested_maxvio_global",
        *SPECIALISATION_METRICS,
        *UTILISATION_METRICS,
        *STABILITY_METRICS,
    }
)
CONSTANT_BY_CONSTRUCTION = "constant by construction"
# Beside perplexity and the load the experts processed: the perplexity under a router's non-causal evaluation
# routing (where it has one), the load asked for before capacity (token-choice routers), the experts a token
# used, whether the reported routing is causal, and the active parameters per token (top-1 has half top-2's
# expert FLOPs). A metric a variant lacks is n/a for it.
SUMMARY_METRICS = (
    "ppl",
    "word_ppl",
    "ppl_noncausal",
    *LOAD_METRICS,
    "requested_gini",
    "requested_maxvio_global",
    "assignment_drop_rate",
    "experts_per_token",
    "router_saturation",
    "causal_routing",
    "n_active_params",
    "tokens_per_s",
    *SPECIALISATION_METRICS,  # what the experts learned: exploratory unless declared in statistics.primary
    *UTILISATION_METRICS,
    *STABILITY_METRICS,  # routing stability over training (runs with routing snapshots)
)
TRAIN_METRICS = ("final_loss", "mean_tokens_per_s", "train_wall_s")
COMPARISON_METRICS = ("ppl", "gini", "load_entropy", "maxvio_global", "maxvio_batch", "dead_experts")
# Display names, and the direction of "better" where one exists (token-expert MI and
# router saturation describe routing, they are not better high or low).
METRIC_LABELS = {
    "ppl": "PPL",
    "word_ppl": "word PPL",
    "ppl_noncausal": "PPL, non-causal routing",
    "word_ppl_noncausal": "word PPL, non-causal routing",
    "nll": "NLL (nats/token)",
    "gini": "Gini",
    "load_entropy": "load entropy",
    "cv": "CV",
    "maxvio_global": "MaxVio global",
    "maxvio_batch": "MaxVio batch",
    "dead_experts": "dead experts",
    "drop_rate": "drop rate",
    "token_expert_mi": "token-expert MI / H(expert)",
    "router_saturation": "router saturation",
    "requested_gini": "requested Gini",
    "requested_maxvio_global": "requested MaxVio global",
    "assignment_drop_rate": "assignments dropped",
    "experts_per_token": "experts per token",
    "causal_routing": "causal routing",
    "n_active_params": "active params",
    "tokens_per_s": "tokens/s",
    "final_loss": "final train loss",
    "mean_tokens_per_s": "train tokens/s",
    "train_wall_s": "train wall (s)",
    "coactivation_max": "co-activation, largest share",
    "coactivation_partner_mean": "co-activation, strongest partner",
    "vocab_specialisation": "vocabulary specialisation",
    "vocab_specialisation_above_floor": "vocabulary specialisation above its floor",
    "top_token_share": f"share of the top-{TOP_TOKENS} token ids",
    "token_expert_mi_share_of_max": "token-expert MI / its maximum",
    **{f"utilisation_{name}": f"utilisation {name} (E·f)" for name in UTILISATION_PERCENTILES},
    "routing_fluctuation": "routing fluctuation between snapshots",
    "routing_fluctuation_last": "routing fluctuation, last interval",
    "last_fluctuation_median": "median last fluctuation (share of training)",
    "late_fluctuation_share": "tokens changing after 20% of training",
}
LOWER_IS_BETTER = frozenset(
    {
        "ppl",
        "word_ppl",
        "nll",
        "ppl_noncausal",
        "word_ppl_noncausal",
        "nll_noncausal",
        "gini",
        "requested_gini",
        "requested_maxvio_global",
        "assignment_drop_rate",
        "cv",
        "maxvio_global",
        "maxvio_batch",
        "dead_experts",
        "drop_rate",
        "final_loss",
        "train_wall_s",
    }
)
HIGHER_IS_BETTER = frozenset({"load_entropy", "tokens_per_s", "mean_tokens_per_s"})
SUMMARY_COLUMNS = ["variant", "split", "metric", "n", "mean", "std", "ci_low", "ci_high", "kind"]
VARIANT, REFERENCE_BASELINE = "variant", "reference baseline"  # values of the summary's ``kind``
BASELINE_METRICS = ("ppl", "word_ppl")
COMPARISON_COLUMNS = [
    "variant_a",
    "variant_b",
    "split",
    "metric",
    "n",
    "seeds",
    "mean_a",
    "mean_b",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_ttest",
    "p_ttest_holm",
    "p_wilcoxon",
    "p_wilcoxon_holm",
    "hedges_gz",
    "note",
    "family",
    "endpoint",
    "mdd",
    "label",
]


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
    return dict(
        n=n,
        mean=float(x.mean()) if n else math.nan,
        std=float(x.std(ddof=1)) if n >= 2 else math.nan,
        ci_low=low,
        ci_high=high,
    )


def summarize(
    tidy: pd.DataFrame,
    metrics: Iterable[str] = SUMMARY_METRICS,
    splits: Iterable[str] = ("test",),
    layer: str = MODEL_LEVEL,
) -> pd.DataFrame:
    """Per (variant, split, metric): n, mean, std, 95% t CI over seeds.

    ``n`` counts seeds with a finite value, so a metric undefined for a variant
    (load metrics of an unrouted variant) shows n = 0 and NaN statistics instead of vanishing.
    Rows follow the study's variant order, then ``splits``, then ``metrics``.
    """
    metrics, splits = list(metrics), list(splits)
    selected = tidy[(tidy["layer"] == layer) & tidy["split"].isin(splits) & tidy["metric"].isin(metrics)]
    groups = {
        key: g["value"].to_numpy()
        for key, g in selected.groupby([selected["variant"].astype(str), "split", "metric"], observed=True)
    }
    rows = [
        dict(
            variant=variant,
            split=split,
            metric=metric,
            **describe(groups.get((variant, split, metric), [])),
            kind=VARIANT,
        )
        for variant in variant_order(tidy)
        for split in splits
        for metric in metrics
    ]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def baseline_summary(
    baselines: pd.DataFrame, splits: Iterable[str] = ("test",), metrics: Iterable[str] = BASELINE_METRICS
) -> pd.DataFrame:
    """Summary rows (``kind`` = "reference baseline") of the n-gram models of ``collect.read_baselines``.

    A baseline is one deterministic model, not a sample over seeds: n = 1 and no std or CI.
    """
    metrics = list(metrics)
    rows = [
        dict(variant=row.model, split=row.split, metric=row.metric, **describe([row.value]), kind=REFERENCE_BASELINE)
        for split in splits
        for row in baselines[baselines["split"] == split].itertuples()
        if row.metric in metrics
    ]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# --------------------------------------------------------------------------- paired tests


def holm_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (statsmodels' `multipletests`); NaN entries are not in
    the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.isfinite(p)
    if valid.any():
        adjusted[valid] = multipletests(p[valid], method="holm")[1]
    return adjusted


def wilcoxon_min_n(alpha: float) -> int:
    """Fewest pairs at which the exact two-sided Wilcoxon signed-rank test can reach ``p ≤ alpha``:
    its smallest p is ``2 / 2^n`` (all n signs agree), so at alpha = 0.05 it needs 6 pairs."""
    return max(1, math.ceil(math.log2(2 / alpha)))


def paired_t_power(effect: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired t-test with n pairs at standardised effect ``mean(d) / sd(d)``.

    Under the alternative ``t = mean(d) / (sd(d) / √n)`` follows a noncentral t with n − 1 degrees
    of freedom and noncentrality ``effect · √n``; the test rejects when ``|t| > t(1 − alpha/2, n − 1)``.
    """
    df, noncentrality = n - 1, effect * math.sqrt(n)
    critical = stats.t.ppf(1 - alpha / 2, df)
    # P(t < −c) written as the upper tail at −noncentrality (the same by symmetry): scipy's
    # nct.cdf returns NaN deep in the lower tail at df = 1 (n = 2), where the term is ~0.
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality))


def minimum_detectable_difference(sd: float, n: int, alpha: float, power: float) -> float:
    """Smallest |mean difference| a two-sided paired t-test at ``alpha`` detects with ``power``.

    Solves ``paired_t_power(δ / sd, n, alpha) = power`` for δ ≥ 0 (the power rises monotonically
    with δ, from alpha at δ = 0). NaN for n < 2 or a non-positive / non-finite sd, where the
    t-test is undefined.
    """
    if not 0 < alpha < power < 1:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    if n < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    upper = 1.0
    while paired_t_power(upper, n, alpha) < power:  # bracket the root; at n = 2 it lies near 10
        upper *= 2
    effect = optimize.brentq(lambda e: paired_t_power(e, n, alpha) - power, 0.0, upper, xtol=1e-10)
    return float(effect * sd)


def hedges_gz(differences: Sequence[float]) -> tuple[float, str]:
    """Hedges' g of paired differences, g_z = ``d_z · J`` with ``d_z = mean/sd`` of the differences and
    ``J = 1 − 3 / (4(n − 1) − 1)`` (Lakens 2013, eq. 4 with df = n − 1); returns ``(g_z, reason)`` with NaN and a
    reason when undefined. Standardised by the sd of the differences, not of the values: a g_z is larger than
    the g of the same data read as two independent groups whenever the pairs are positively correlated.
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


# Float tolerance of paired differences, relative to the magnitude of the values compared (as numpy.isclose's
# rtol): differences within SPREAD_RTOL * max(|a|, |b|) of each other have no spread, and within it of zero are
# zero. One subtraction b - a rounds by half an ulp of max(|a|, |b|) (1.1e-16 relative) and the values carry a
# few ulps more from their own computation (300.2 - 300.1 and 300.3 - 300.2 differ by 4.5e-14, 1.5e-16 of 300);
# 1e-9 is millions of times that, and far below any seed-to-seed spread a metric shows (a PPL of 300 would have
# to agree to 3e-7 in every seed).
SPREAD_RTOL = 1e-9


def paired_differences(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, bool]:
    """``b − a`` per pair with float round-off removed, and whether the differences have no spread.

    Without spread (max − min within the tolerance) every difference is their mean, or 0 when that mean is
    within the tolerance of zero; otherwise each difference within the tolerance of zero is 0.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = b - a
    if diff.size == 0:
        return diff, True
    tolerance = SPREAD_RTOL * float(max(np.abs(a).max(), np.abs(b).max()))
    if float(diff.max() - diff.min()) <= tolerance:
        mean = float(diff.mean())
        return np.full(diff.shape, 0.0 if abs(mean) <= tolerance else mean), True
    return np.where(np.abs(diff) <= tolerance, 0.0, diff), False


def no_spread(values: Sequence[float]) -> bool:
    """Whether the finite values (at least one) all agree within the float tolerance ``SPREAD_RTOL``."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    return x.size > 0 and float(x.max() - x.min()) <= SPREAD_RTOL * float(np.abs(x).max())


def constant_by_construction(metric: str, values: dict[str, pd.Series], by_construction: Iterable[str]) -> str:
    """Why a comparison of `metric` between the variants of `values` (variant -> per-seed values) is not tested,
    or "": a variant in `by_construction` (its router balances load by construction) whose load metric has no
    spread over its seeds holds it fixed by the method, so a test would measure only the other variant's spread."""
    if metric not in BY_CONSTRUCTION_METRICS:
        return ""
    fixed = set(by_construction)
    constant = [v for v, series in values.items() if v in fixed and no_spread(series.to_numpy(dtype=float))]
    if not constant:
        return ""
    return (
        f"{CONSTANT_BY_CONSTRUCTION}: {', '.join(constant)} balance(s) load by construction and "
        f"{metric_label(metric)} does not vary over its seeds; not tested"
    )


def _difference_interval(diff: np.ndarray, constant: bool, confidence: float) -> tuple[float, float]:
    """t CI of the mean difference; the point itself for n ≥ 2 differences without spread (their sd, computed
    in floats, can be a few ulps instead of 0)."""
    if constant and diff.size >= 2:
        return float(diff[0]), float(diff[0])
    return t_confidence_interval(diff, confidence)


def _common_seeds(a: pd.Series, b: pd.Series) -> pd.DataFrame:
    """Columns a and b on the seeds where both are finite, by seed."""
    joined = pd.concat({"a": a, "b": b}, axis=1, join="inner").dropna()
    return joined[np.isfinite(joined).all(axis=1)].sort_index()


def paired_difference(a: pd.Series, b: pd.Series, confidence: float = CONFIDENCE) -> dict:
    """n, seeds, the mean difference ``b − a`` and its t CI over the seeds both have finite values for."""
    joined = _common_seeds(a, b)
    diff, constant = paired_differences(joined["a"].to_numpy(), joined["b"].to_numpy())
    low, high = _difference_interval(diff, constant, confidence)
    return dict(
        n=len(joined),
        seeds=",".join(str(s) for s in joined.index),
        mean_diff=(float(diff[0]) if constant else float(diff.mean())) if len(diff) else math.nan,
        ci_low=low,
        ci_high=high,
    )


def paired_test(
    a: pd.Series, b: pd.Series, *, alpha: float, power: float, confidence: float = CONFIDENCE, untested: str = ""
) -> dict:
    """Compare two per-seed series (index = seed) on their common seeds with finite values.

    Returns n, seeds, means, mean difference ``b − a`` with its t CI, paired t-test p,
    Wilcoxon signed-rank p (only where it can reach ``alpha``: n ≥ 6 at 0.05), Hedges' g_z,
    the minimum detectable difference ``mdd`` at ``alpha`` and ``power``, and a ``note``
    explaining every NaN. With `untested` (the reason, e.g. ``constant_by_construction``) the means, difference
    and CI are reported, no test, effect size or MDD.
    """
    joined = _common_seeds(a, b)
    n = len(joined)
    # Float noise removed: a spread within float tolerance of zero is none (SPREAD_RTOL).
    diff, constant = paired_differences(joined["a"].to_numpy(), joined["b"].to_numpy())
    notes = []
    result = dict(
        n=n,
        seeds=",".join(str(s) for s in joined.index),
        mean_a=float(joined["a"].mean()) if n else math.nan,
        mean_b=float(joined["b"].mean()) if n else math.nan,
        mean_diff=(float(diff[0]) if constant else float(diff.mean())) if n else math.nan,
        p_ttest=math.nan,
        p_wilcoxon=math.nan,
        hedges_gz=math.nan,
        mdd=minimum_detectable_difference(
            (0.0 if constant else float(diff.std(ddof=1))) if n >= 2 and not untested else math.nan, n, alpha, power
        ),
    )
    result["ci_low"], result["ci_high"] = _difference_interval(diff, constant, confidence)
    min_wilcoxon = wilcoxon_min_n(alpha)

    if untested:
        notes.append(untested)
    elif n == 0:
        notes.append("no seed with finite values in both variants")
    elif n == 1:
        notes.append("n=1: no CI, tests or effect size (need n ≥ 2)")
    elif np.all(diff == 0):
        notes.append("all differences are zero: tests and effect size undefined")
    else:
        if constant:
            # A constant non-zero shift gives t = ±inf and p = 0: an artefact, not evidence.
            notes.append("differences are constant: t-test and effect size undefined")
        else:
            result["p_ttest"] = float(stats.ttest_rel(joined["b"], joined["a"]).pvalue)
            result["hedges_gz"], reason = hedges_gz(diff)
            if reason:
                notes.append(reason)
        # zero_method="wilcox" (Wilcoxon's original) drops zero differences before ranking (tied
        # magnitudes share average ranks), so the non-zero ones decide whether it can reject.
        zeros = int(np.sum(diff == 0))
        if n < min_wilcoxon:
            notes.append(f"n<{min_wilcoxon}: no Wilcoxon (cannot reach p ≤ {alpha:g})")
        elif n - zeros < min_wilcoxon:
            notes.append(
                f"{n - zeros} non-zero differences (<{min_wilcoxon}): no Wilcoxon (cannot reach p ≤ {alpha:g})"
            )
        else:
            result["p_wilcoxon"] = float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)
            if zeros:
                notes.append(f"Wilcoxon dropped {zeros} zero difference(s)")
    result["note"] = "; ".join(notes)
    return result


def per_seed(tidy: pd.DataFrame, variant: str, metric: str, split: str, layer: str = MODEL_LEVEL) -> pd.Series:
    """Values of one variant/metric/split indexed by seed."""
    rows = tidy[
        (tidy["variant"].astype(str) == variant)
        & (tidy["metric"] == metric)
        & (tidy["split"] == split)
        & (tidy["layer"] == layer)
    ]
    if rows["seed"].duplicated().any():
        raise ValueError(f"several values per seed for {variant}/{metric}/{split}/{layer}")
    return rows.set_index("seed")["value"]


def paired_comparisons(
    tidy: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    metrics: Iterable[str],
    split: str,
    *,
    primary: Iterable[str],
    alpha: float,
    power: float,
    confidence: float = CONFIDENCE,
    by_construction: Iterable[str] = (),
) -> pd.DataFrame:
    """Seed-paired comparison of every ``(a, b)`` pair on every metric (difference = b − a).

    Holm's adjustment runs within each family ``"{metric}/{split}"`` (the comparisons of one
    endpoint), once for the t-test p-values and once for the Wilcoxon p-values. ``endpoint``
    is "primary" for metrics in ``primary``, else "exploratory"; ``mdd`` is the minimum
    detectable difference at ``alpha`` and ``power``. Every row is labelled exploratory (``label``): the
    confirmatory tests are ``analysis.stats.confirmatory``'s. A load metric constant by construction of a
    variant in `by_construction` is not tested (``constant_by_construction``).
    """
    primary = set(primary)
    by_construction = set(by_construction)
    rows = []
    for a, b in pairs:
        for metric in metrics:
            values = {a: per_seed(tidy, a, metric, split), b: per_seed(tidy, b, metric, split)}
            test = paired_test(
                values[a],
                values[b],
                alpha=alpha,
                power=power,
                confidence=confidence,
                untested=constant_by_construction(metric, values, by_construction),
            )
            rows.append(
                dict(
                    variant_a=a,
                    variant_b=b,
                    split=split,
                    metric=metric,
                    **test,
                    family=f"{metric}/{split}",
                    endpoint=PRIMARY if metric in primary else EXPLORATORY,
                    label=EXPLORATORY,
                )
            )
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    for test in ("ttest", "wilcoxon"):
        table[f"p_{test}_holm"] = holm_by_family(table[f"p_{test}"], table["family"])
    return table


def holm_by_family(pvalues: pd.Series, family: pd.Series) -> np.ndarray:
    """Holm-adjusted p-values, each family adjusted on its own."""
    adjusted = pd.Series(np.nan, index=pvalues.index, dtype=float)
    for _, members in pvalues.groupby(family, sort=False):
        adjusted[members.index] = holm_adjust(members.to_numpy(dtype=float))
    return adjusted.to_numpy()


def reference_pairs(variants: Sequence[str], reference: str) -> list[tuple[str, str]]:
    """``(reference, v)`` for every other variant, in study order."""
    if reference not in variants:
        raise ConfigError(f"reference variant {reference!r} not among {list(variants)}")
    return [(reference, v) for v in variants if v != reference]


def ablation_pairs(variants: Sequence[str], base: str | None, ablations: Sequence[str]) -> list[tuple[str, str]]:
    """``(base, ablation)`` for each ablation present in ``variants`` (none without a base)."""
    if base is None or base not in variants:
        return []
    return [(base, v) for v in ablations if v in variants]


# --------------------------------------------------------------------------- load balance


def router_balance_curves(router_log: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed, step): Gini and MaxVio of that step's batch, mean over MoE layers.

    ``load`` in the router log is the fraction of the step's assignments per expert, so
    the per-step MaxVio is the training-time counterpart of ``maxvio_batch``.
    """
    keys = ["variant", "seed", "step", "layer"]
    if router_log.empty:
        return pd.DataFrame(columns=["variant", "seed", "step", "gini", "maxvio_batch"])
    loads = router_log.set_index([*keys, "expert"])["load"].unstack("expert").sort_index(axis=1)
    # The engine's own metric functions (gtmoe.metrics), one routing snapshot per row.
    per_layer = pd.DataFrame(
        {
            "gini": np.apply_along_axis(metrics.gini, 1, loads.to_numpy()),
            "maxvio_batch": np.apply_along_axis(metrics.max_violation, 1, loads.to_numpy()),
        },
        index=loads.index,
    )
    return per_layer.groupby(level=["variant", "seed", "step"], sort=True).mean().reset_index()
