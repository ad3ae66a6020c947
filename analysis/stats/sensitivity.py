"""Sensitivity of the routers to their options (issue 14): dose-response statistics of the sweeps.

A sweep (config ``sweeps``, expanded by ``gtmoe.sweeps``) runs a base variant at several values
of its router options; each point is an ordinary variant. The study record holds the sweep
*design*, one row per (sweep, option, value) point::

    {"sweep": "terms", "base": "base_variant", "router": "router_name", "option": "beta",
     "value": 0.3, "variant": "base_variant-beta0.3", "term": "reputation", "fixed": ""}

``term`` is the selection term the option scales (its flip rate is the tidy metric
``flip_rate_<term>``; null when the option scales none) and ``fixed`` labels the values of the
other options in a full-grid sweep ("" for one-at-a-time sweeps): one curve per ``fixed``.

For every point and metric the dose-response table has the mean over seeds with its Student t
CI, the reference variant's mean and CI (the band the curve is read against) and the
seed-paired difference point − reference. ``best_values`` picks, per curve, the value with
the lowest Gini among those whose perplexity is no worse than the reference's. The tables are
written by ``analysis.tables.write_sensitivity``, the figures by ``analysis.figures.sensitivity``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.collect import MODEL_LEVEL, variant_order
from analysis.stats import CONFIDENCE, describe, paired_difference, per_seed
from gtmoe.errors import ConfigError

FLIP_RATE = "flip_rate"  # metric name of the swept option's own term, flip_rate_<term> in the tidy table
METRICS = ("gini", "maxvio_global", "ppl", FLIP_RATE)  # table order and figure columns
REQUIRED_KEYS = ("sweep", "base", "router", "option", "value", "variant")
DESIGN_COLUMNS = [*REQUIRED_KEYS, "term", "fixed"]
CURVE = ["sweep", "option", "fixed"]  # one dose-response curve
POINT = [*CURVE, "value", "variant"]
DOSE_COLUMNS = [
    "sweep",
    "base",
    "router",
    "option",
    "fixed",
    "value",
    "variant",
    "term",
    "split",
    "metric",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "reference",
    "ref_n",
    "ref_mean",
    "ref_ci_low",
    "ref_ci_high",
    "n_paired",
    "paired_seeds",
    "delta",
    "delta_ci_low",
    "delta_ci_high",
]
BEST_COLUMNS = [
    "sweep",
    "option",
    "fixed",
    "value",
    "variant",
    "reference",
    "n",
    "gini_mean",
    "gini_ci_low",
    "gini_ci_high",
    "maxvio_global_mean",
    "ppl_mean",
    "n_paired",
    "delta_ppl",
    "delta_ppl_ci_low",
    "delta_ppl_ci_high",
    "rule",
    "within_bounds",
    "n_values_tried",
    "n_values_eligible",
    "note",
]


# --------------------------------------------------------------------------- design


# The split every choice made from a sweep is made on: the test split is for confirmation only, so a value
# chosen here and then confirmed on test was never chosen by the numbers that confirm it.
SELECTION_SPLIT = "validation"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_design(design: Sequence[dict]) -> pd.DataFrame:
    """The sweep design (a list of records) as a DataFrame of ``DESIGN_COLUMNS``.

    Raises ConfigError naming the first problem: not a list, a record that is not an object, a
    missing key, a non-numeric value, or two points of one curve at the same value.
    """
    if not isinstance(design, list):
        raise ConfigError(f"sweep design must be a list of records, got {type(design).__name__}")
    rows = []
    for i, record in enumerate(design):
        where = f"sweep design record {i}"
        if not isinstance(record, dict):
            raise ConfigError(f"{where} must be an object, got {record!r}")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ConfigError(f"{where} lacks {', '.join(map(repr, missing))} (has {sorted(record)})")
        for key in ("sweep", "base", "router", "option", "variant"):
            if not isinstance(record[key], str) or not record[key]:
                raise ConfigError(f"{where}: {key} must be a non-empty string, got {record[key]!r}")
        where = f"{where} ({record['sweep']}, {record['option']})"
        if not _is_number(record["value"]):
            # Doses are plotted on a numeric (symlog) axis: a string or boolean option has none.
            raise ConfigError(f"{where}: value must be a finite number, got {record['value']!r}")
        term, fixed = record.get("term"), record.get("fixed")
        if term is not None and (not isinstance(term, str) or not term):
            raise ConfigError(f"{where}: term must be a selection term name or null, got {term!r}")
        if fixed is not None and not isinstance(fixed, str):
            raise ConfigError(f"{where}: fixed must be a string label, got {fixed!r}")
        rows.append(
            {
                **{key: record[key] for key in REQUIRED_KEYS},
                "value": float(record["value"]),
                "term": term,
                "fixed": fixed or "",
            }
        )
    frame = pd.DataFrame(rows, columns=DESIGN_COLUMNS)
    clash = frame[frame.duplicated([*CURVE, "value"], keep=False)]
    if not clash.empty:
        first = clash.iloc[0]
        raise ConfigError(
            f"sweep design has several points at {first['option']}={first['value']:g} of sweep "
            f"{first['sweep']!r}"
            + (f" ({first['fixed']})" if first["fixed"] else "")
            + f": variants {sorted(clash['variant'][clash['value'] == first['value']])}"
        )
    return frame


def design_order(design: pd.DataFrame) -> pd.DataFrame:
    """Sweeps, their options and each option's curves in design order, each curve by increasing value."""
    # ngroup(sort=False) numbers the groups by first appearance: the design's order at every level.
    ranks = {f"_{i}": design.groupby(CURVE[: i + 1], sort=False).ngroup() for i in range(len(CURVE))}
    return (
        design.assign(**ranks)
        .sort_values([*ranks, "value"], kind="stable")
        .drop(columns=list(ranks))
        .reset_index(drop=True)
    )


# --------------------------------------------------------------------------- statistics


def dose_response(
    tidy: pd.DataFrame,
    design: pd.DataFrame | Sequence[dict],
    split: str,
    reference: str,
    confidence: float = CONFIDENCE,
    metrics: Sequence[str] = METRICS,
) -> pd.DataFrame:
    """One row per (sweep, option, fixed, value, variant, metric): n seeds, mean, std, t CI, the
    reference's n, mean and t CI on that metric, and the seed-paired difference point − reference
    (mean and t CI over the seeds both have, ``n_paired``).

    Metrics are ``METRICS`` and those of ``metrics`` (what a selection rule names); ``flip_rate`` is the tidy
    metric ``flip_rate_<term>`` of the point's term, left out for an option that scales no term. The flip rate
    has no reference (a router without the term has none), so its reference and difference columns are NaN.
    """
    design = design if isinstance(design, pd.DataFrame) else read_design(design)
    variants = variant_order(tidy)
    if reference not in variants:
        raise ConfigError(f"reference variant {reference!r} not among the table's variants {variants}")
    unknown = sorted(set(design["variant"]) - set(variants))
    if unknown:
        raise ConfigError(f"sweep design names variants absent from the table: {unknown}")
    tidy = tidy[(tidy["layer"] == MODEL_LEVEL) & (tidy["split"] == split)]  # once, not per lookup
    metrics = list(dict.fromkeys([*METRICS, *metrics]))
    reference_values = {m: per_seed(tidy, reference, m, split) for m in metrics if m != FLIP_RATE}
    reference_stats = {m: describe(v, confidence) for m, v in reference_values.items()}
    no_reference = dict(
        ref_n=0,
        ref_mean=math.nan,
        ref_ci_low=math.nan,
        ref_ci_high=math.nan,
        n_paired=0,
        paired_seeds="",
        delta=math.nan,
        delta_ci_low=math.nan,
        delta_ci_high=math.nan,
    )
    rows = []
    for point in design_order(design).to_dict("records"):
        for metric in metrics:
            if metric == FLIP_RATE and pd.isna(point["term"]):  # None, or NaN once in a frame
                continue
            source = f"{FLIP_RATE}_{point['term']}" if metric == FLIP_RATE else metric
            values = per_seed(tidy, point["variant"], source, split)
            row = dict(
                point, split=split, metric=metric, **describe(values, confidence), reference=reference, **no_reference
            )
            if metric in reference_values:
                ref = reference_stats[metric]
                paired = paired_difference(reference_values[metric], values, confidence)  # point − reference
                row.update(
                    ref_n=ref["n"],
                    ref_mean=ref["mean"],
                    ref_ci_low=ref["ci_low"],
                    ref_ci_high=ref["ci_high"],
                    n_paired=paired["n"],
                    paired_seeds=paired["seeds"],
                    delta=paired["mean_diff"],
                    delta_ci_low=paired["ci_low"],
                    delta_ci_high=paired["ci_high"],
                )
            rows.append(row)
    return pd.DataFrame(rows, columns=DOSE_COLUMNS)


def _points(dose: pd.DataFrame, rule_metrics: Sequence[str]) -> pd.DataFrame:
    """One row per point with the columns the selection needs, in the dose table's order."""
    by_metric = {m: dose[dose["metric"] == m].set_index(POINT) for m in ("ppl", "gini", "maxvio_global")}
    ppl, gini, maxvio = by_metric["ppl"], by_metric["gini"], by_metric["maxvio_global"]
    points = pd.DataFrame(
        {
            "reference": ppl["reference"],
            "n": gini["n"],
            "n_paired": ppl["n_paired"],
            "gini_mean": gini["mean"],
            "gini_ci_low": gini["ci_low"],
            "gini_ci_high": gini["ci_high"],
            "maxvio_global_mean": maxvio["mean"],
            "ppl_mean": ppl["mean"],
            "delta_ppl": ppl["delta"],
            "delta_ppl_ci_low": ppl["delta_ci_low"],
            "delta_ppl_ci_high": ppl["delta_ci_high"],
        },
        index=ppl.index,
    )
    for metric in rule_metrics:  # the rule's metrics, whatever the table shows
        points[f"_rule_{metric}"] = dose[dose["metric"] == metric].set_index(POINT)["mean"].reindex(points.index)
    return points.reset_index()


def rule_text(minimize: str, subject_to: Mapping[str, float]) -> str:
    """The selection rule in words, as the tables and the findings state it."""
    bounds = " and ".join(f"{metric} ≤ {bound:g}" for metric, bound in subject_to.items())
    return f"lowest mean {minimize}" + (f" with mean {bounds}" if bounds else "")


def best_values(
    dose: pd.DataFrame, minimize: str = "ppl", subject_to: Mapping[str, float] | None = None
) -> pd.DataFrame:
    """Per curve (sweep, option, fixed): the value the declared rule (config ``tuning.select``) picks from the
    means over seeds in ``dose`` (the validation split): among the values whose mean of every bounded metric is
    at most its bound (*eligible*), the one with the lowest mean of ``minimize``; ties go to the smaller value.

    With no eligible value the row is the value with the lowest mean of the first bounded metric, with
    ``within_bounds`` False and a note. A curve whose points lack the metrics keeps a row with value NaN and a
    note. ``dose`` must hold every metric the rule names.
    """
    subject_to = dict(subject_to or {})
    rule_metrics = [minimize, *subject_to]
    missing = sorted(set(rule_metrics) - set(dose["metric"]))
    if missing and len(dose):
        raise ConfigError(f"the selection rule needs the metrics {missing}, absent from the dose-response table")
    rule = rule_text(minimize, subject_to)
    rows = []
    for (sweep, option, fixed), curve in _points(dose, rule_metrics).groupby(CURVE, sort=False):
        reference = curve["reference"].iloc[0]
        scored = curve[np.isfinite(curve[f"_rule_{minimize}"])]
        eligible = scored
        for metric, bound in subject_to.items():
            eligible = eligible[eligible[f"_rule_{metric}"] <= bound]  # NaN is not within a bound
        counts = dict(n_values_tried=len(curve), n_values_eligible=len(eligible))
        notes: list[str] = []
        within = True
        if not eligible.empty:
            chosen = eligible.sort_values([f"_rule_{minimize}", "value"], kind="stable").iloc[0]
        elif subject_to and not scored.empty and np.isfinite(scored[f"_rule_{next(iter(subject_to))}"]).any():
            first = next(iter(subject_to))
            chosen = scored.sort_values([f"_rule_{first}", "value"], kind="stable").iloc[0]
            within = False
            notes.append(
                f"no value within {' and '.join(f'{m} ≤ {b:g}' for m, b in subject_to.items())}: the lowest {first}"
            )
        else:
            notes.append(f"no value has a mean {minimize}" + (" and the bounded metrics" if subject_to else ""))
            rows.append(
                dict(
                    sweep=sweep,
                    option=option,
                    fixed=fixed,
                    value=math.nan,
                    variant="",
                    reference=reference,
                    n=0,
                    n_paired=0,
                    rule=rule,
                    within_bounds=False,
                    **counts,
                    note="; ".join(notes),
                )
            )
            continue
        unpaired = int(curve["delta_ppl"].isna().sum())
        if unpaired:
            notes.append(f"{unpaired} value(s) without seeds paired with {reference}")
        best = {k: v for k, v in chosen.to_dict().items() if not k.startswith("_rule_")}
        rows.append({**best, "rule": rule, "within_bounds": within, **counts, "note": "; ".join(notes)})
    return pd.DataFrame(rows, columns=BEST_COLUMNS)
