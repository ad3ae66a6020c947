"""The confirmatory tests: the declared contrasts and the ablations on the primary endpoints, each family under
Holm, with an equivalence test (TOST) and one verdict per row.

Design (declared in config.yaml ``statistics`` before any run, read from the study record):

* Families. ``contrasts``: every declared contrast ``[a, b]`` × every primary endpoint, on the statistics split.
  ``ablations``: every ablation × every primary endpoint, each against the ablation base (``[ablation, base]``).
  Holm's step-down adjustment runs over each family as a whole, across contrasts *and* endpoints, so the
  family-wise error rate of each family's claims is at most ``alpha``. Every other comparison of the study
  (each variant against the reference, the other metrics) is exploratory.
* Difference. ``Δ = a − b`` per seed, on the seeds both variants completed with a finite value; its mean, the
  95% Student t CI, the two-sided paired t-test (``scipy.stats.ttest_rel``), Hedges' g_z and the MDD come from
  ``analysis.stats.paired_test``.
* Equivalence. TOST (Schuirmann 1987) against the endpoint's margin ±m: two one-sided one-sample t-tests of the
  differences, H0 ``mean(Δ) ≤ −m`` and H0 ``mean(Δ) ≥ +m``, p_TOST the larger of the two p-values
  (``statsmodels.stats.weightstats.ttost_paired``).
  A relative margin ``{relative: x}`` is ``m = x · mean(b)`` over the paired seeds (b is the comparator: the
  contrast's second variant, the ablation base); an absolute one is ``x`` in the metric's units. The TOST
  p-values are Holm-adjusted over the same family, so claims of equivalence are controlled like claims of
  difference.
* Verdict, exactly one per row: ``different`` (Holm-adjusted t-test p < alpha), else ``equivalent within ±m``
  (Holm-adjusted TOST p < alpha), else ``inconclusive``. A row whose metric is constant by construction
  (``analysis.stats.constant_by_construction``) is not tested and says so instead.
* MDD. ``mdd`` at ``alpha`` as in the other tables, and ``mdd_family`` at ``alpha / m`` (m: the family's tests),
  the level Holm's first step demands: the difference a confirmatory test can detect lies between the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.stats import (
    CONFIDENCE,
    CONSTANT_BY_CONSTRUCTION,
    _common_seeds,
    constant_by_construction,
    holm_by_family,
    minimum_detectable_difference,
    paired_differences,
    paired_test,
    per_seed,
)

CONTRASTS, ABLATIONS = "contrasts", "ablations"  # the two families
DIFFERENT, INCONCLUSIVE = "different", "inconclusive"
EQUIVALENT = "equivalent within ±"  # + the margin, in the metric's units
NOT_TESTED = "not tested"
RELATIVE, ABSOLUTE = "relative", "absolute"
CONFIRMATORY_COLUMNS = [
    "family",
    "variant_a",
    "variant_b",
    "contrast",
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
    "margin_kind",
    "margin_value",
    "margin",
    "p_tost",
    "p_tost_holm",
    "verdict",
    "mdd",
    "mdd_family",
    "hedges_gz",
    "note",
]


def tost_paired(differences: Sequence[float], margin: float) -> float:
    """TOST p-value of paired differences against the equivalence interval ``(−margin, +margin)``.

    The larger p of the one-sided t-tests of H0 ``mean ≤ −margin`` (alternative: greater) and H0
    ``mean ≥ +margin`` (alternative: less); equivalence at level alpha when it is below alpha. NaN for fewer
    than two differences, differences without spread (t is undefined or infinite) or a margin that is not a
    finite number > 0.
    """
    d = np.asarray(differences, dtype=float)
    if d.size < 2 or not (math.isfinite(margin) and margin > 0) or float(d.max() - d.min()) == 0:
        return math.nan
    from statsmodels.stats.weightstats import ttost_paired

    return float(ttost_paired(d, np.zeros_like(d), -margin, margin)[0])


def equivalence_margin(spec: Mapping[str, float] | None, mean_b: float) -> tuple[str, float, float]:
    """``(kind, value, m)`` of a margin spec ``{relative: x}`` or ``{absolute: x}``: m = x · |mean(b)| for a
    relative margin (NaN without a finite mean of b), x for an absolute one; ``("", nan, nan)`` without a spec
    (a study record written before margins were declared: gtmoe.study requires one per primary endpoint)."""
    if not spec:
        return "", math.nan, math.nan
    (kind, value), *_ = spec.items()
    value = float(value)
    if kind == RELATIVE:
        return kind, value, value * abs(mean_b) if math.isfinite(mean_b) else math.nan
    if kind == ABSOLUTE:
        return kind, value, value
    raise ValueError(f"margin {dict(spec)!r}: expected {{{RELATIVE}: x}} or {{{ABSOLUTE}: x}}")


def verdict(p_holm: float, p_tost_holm: float, margin: float, alpha: float) -> str:
    """``different`` if the Holm-adjusted t-test rejects, else ``equivalent within ±m`` if the Holm-adjusted
    TOST does, else ``inconclusive`` (also where a p-value is missing)."""
    if math.isfinite(p_holm) and p_holm < alpha:
        return DIFFERENT
    if math.isfinite(p_tost_holm) and p_tost_holm < alpha:
        return f"{EQUIVALENT}{margin:.4g}"
    return INCONCLUSIVE


def families(
    contrasts: Iterable[Sequence[str]], ablation_base: str | None, ablations: Iterable[str]
) -> list[tuple[str, str, str]]:
    """``(family, a, b)`` of every confirmatory contrast: the declared ``[a, b]`` (family ``contrasts``), then
    ``(ablation, base)`` for each ablation (family ``ablations``); none without a base. Every one is reported,
    with or without data (the record's contrasts name variants of the study: gtmoe.study checks them)."""
    rows = [(CONTRASTS, str(a), str(b)) for a, b in contrasts]
    if ablation_base is not None:
        rows += [(ABLATIONS, str(v), str(ablation_base)) for v in ablations]
    return rows


def confirmatory_comparisons(
    tidy: pd.DataFrame,
    contrasts: Iterable[Sequence[str]],
    ablation_base: str | None,
    ablations: Iterable[str],
    split: str,
    *,
    primary: Iterable[str],
    margins: Mapping[str, Mapping[str, float]],
    alpha: float,
    power: float,
    by_construction: Iterable[str] = (),
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """The confirmatory table (``CONFIRMATORY_COLUMNS``): one row per (family, contrast, primary endpoint), in
    declaration order; Δ = a − b. `margins` maps each primary endpoint to its margin spec; `by_construction`
    lists the variants whose router balances load by construction (study record ``routers``)."""
    primary = list(primary)
    by_construction = set(by_construction)
    rows = []
    for family, a, b in families(contrasts, ablation_base, ablations):
        for metric in primary:
            values = {a: per_seed(tidy, a, metric, split), b: per_seed(tidy, b, metric, split)}
            untested = constant_by_construction(metric, values, by_construction)
            # paired_test's difference is its second argument minus its first: a − b.
            test = paired_test(values[b], values[a], alpha=alpha, power=power, confidence=confidence, untested=untested)
            joined = _common_seeds(values[b], values[a])
            diff, _ = paired_differences(joined["a"].to_numpy(), joined["b"].to_numpy())
            mean_a, mean_b = test["mean_b"], test["mean_a"]
            kind, value, margin = equivalence_margin(margins.get(metric), mean_b)
            p_tost = math.nan if untested or not math.isfinite(test["p_ttest"]) else tost_paired(diff, margin)
            notes = [test["note"]] if test["note"] else []
            if not untested and not kind:
                notes.append(f"no equivalence margin declared for {metric} (statistics.margins): no TOST")
            elif not untested and not math.isfinite(margin):
                notes.append(f"no margin: the {kind} margin needs a finite mean of {b}")
            rows.append(
                dict(
                    family=family,
                    variant_a=a,
                    variant_b=b,
                    contrast=f"{a} − {b}",
                    split=split,
                    metric=metric,
                    n=test["n"],
                    seeds=test["seeds"],
                    mean_a=mean_a,
                    mean_b=mean_b,
                    mean_diff=test["mean_diff"],
                    ci_low=test["ci_low"],
                    ci_high=test["ci_high"],
                    p_ttest=test["p_ttest"],
                    margin_kind=kind,
                    margin_value=value,
                    margin=margin,
                    p_tost=p_tost,
                    mdd=test["mdd"],
                    sd=float(diff.std(ddof=1)) if diff.size >= 2 and not untested else math.nan,
                    hedges_gz=test["hedges_gz"],
                    note="; ".join(notes),
                    untested=bool(untested),
                )
            )
    table = pd.DataFrame(rows, columns=[*CONFIRMATORY_COLUMNS, "sd", "untested"])
    if table.empty:
        return table[CONFIRMATORY_COLUMNS]
    family = table["family"].astype(str) + "/" + table["split"].astype(str)
    table["p_ttest_holm"] = holm_by_family(table["p_ttest"], family)
    table["p_tost_holm"] = holm_by_family(table["p_tost"], family)
    tests = table["p_ttest"].notna().groupby(family).transform("sum")
    table["mdd_family"] = [
        minimum_detectable_difference(sd, n, alpha / m, power) if m > 0 else math.nan
        for sd, n, m in zip(table["sd"], table["n"], tests)
    ]
    table["verdict"] = [
        f"{NOT_TESTED}: {CONSTANT_BY_CONSTRUCTION}"
        if r.untested
        else verdict(r.p_ttest_holm, r.p_tost_holm, r.margin, alpha)
        for r in table.itertuples()
    ]
    return table[CONFIRMATORY_COLUMNS].reset_index(drop=True)
