"""Findings in words: the study's answer, generated from the statistics tables and rendered from the
Jinja2 template ``templates/findings.html.j2`` (autoescaped: no value reaches the page unescaped).

Every number on the page comes from an input file, never from this module:

* ``confirmatory.parquet`` (the `stats` step, ``stats.confirmatory.confirmatory_comparisons``): the answer,
  first on the page: every declared contrast and ablation on every primary endpoint with Δ, its 95% CI, the
  Holm-adjusted p, the TOST verdict and the MDD. Words of equivalence appear only with a verdict "equivalent";
* ``comparisons.parquet`` / ``ablations.parquet`` (the `stats` step, ``stats.paired_comparisons``),
  exploratory: for each primary endpoint (``endpoint == "primary"``), which variants differ from the
  reference after Holm's adjustment within the endpoint's family, with Δ, its 95% CI and the minimum
  detectable difference (MDD) of every comparison;
* ``summary.parquet`` (``stats.summarize``): each variant's mean test perplexity with its t CI;
* ``run_status.parquet`` (``collect.collect_runs``): runs that are missing or failed;
* ``ngram.json`` (``python -m gtmoe baselines``): the bigram's perplexity, the floor a
  trained model has to beat;
* the training logs: the slope of the training loss over the last 10% of steps
  (``scipy.stats.linregress``), descriptive only (under a decaying learning rate it flattens with the schedule);
* the training-horizon check (config ``findings.horizon``, ``horizon_gain``): the perplexity the same router
  trained longer still gains, paired by seed, the study's test of whether it trained long enough;
* ``sensitivity.parquet`` / ``sensitivity_best.parquet`` (the `sensitivity` step), when the study
  record has sweeps: each dose-response curve's ends, its best value and how far its term reached.

The study's settings (reference, split, alpha, power, the horizon check) come from the study
record. Which variants' perplexity was routed non-causally (the caveat) the evaluation JSONs say
(``causal_routing``, in the summary; ``noncausal_variants``), and so does the perplexity of a router's
non-causal evaluation routing reported beside its causal one (``ppl_noncausal``). A variant that fails a check
(missing or failed runs, non-finite perplexity, perplexity not below the bigram's) is shown in red at the top of
the page, and so is a training horizon the longer run says is too short.

The page's wording is built here as *rich text*, a list of ``(text, style)`` pieces (style "" plain,
"b" bold, or a key of ``STYLES``); the template lays out the page and escapes every piece.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis import RUN_OK, writing
from analysis.collect import variant_order
from analysis.stats import (
    CONFIDENCE,
    CONSTANT_BY_CONSTRUCTION,
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    PRIMARY,
    VARIANT,
    metric_label,
    paired_difference,
    per_seed,
    t_confidence_interval,
)
from analysis.stats.confirmatory import ABLATIONS, CONTRASTS, DIFFERENT, EQUIVALENT, INCONCLUSIVE
from analysis.stats.sensitivity import FLIP_RATE, SELECTION_SPLIT
from analysis.tables import CSS, format_interval, format_number, format_p

FINAL_FRACTION = 0.1  # the slope is fitted over the last 10% of the training steps
MIN_SLOPE_POINTS = 3  # ...and over at least this many logged steps
PER_STEPS = 1000  # slopes are quoted in nats per 1000 steps
BIGRAM = "bigram"
TEMPLATE = "findings.html.j2"

# Inline styles: the page is embedded in report.html as a standalone document.
STYLES = {
    "fail": "color:#b3261e;font-weight:600",
    "pass": "color:#1e7b34;font-weight:600",
    "caution": "color:#a15c00;font-weight:600",
    "muted": "color:#6b7380",
}
Rich = list[tuple[str, str]]  # (text, style): style "" plain, "b" bold, or a key of STYLES


@dataclass(frozen=True)
class FindingsInputs:
    comparisons: pd.DataFrame  # paired comparisons against the reference variant
    ablations: pd.DataFrame  # paired comparisons of the ablation base against its ablations
    summary: pd.DataFrame  # per-variant summary (stats.summarize)
    status: pd.DataFrame  # run status table (collect.collect_runs)
    train_logs: pd.DataFrame  # training logs of the ok runs (collect.load_train_logs)
    baselines: pd.DataFrame  # n-gram baselines (collect.read_baselines); may be empty
    reference: str
    split: str
    alpha: float
    power: float
    # Variant -> its router's label, for the variants whose reported perplexity was routed non-causally: at
    # evaluation the experts chose among the whole routing group's tokens (the caveat; `noncausal_variants`).
    group_routed: Mapping[str, str] = field(default_factory=dict)
    sensitivity: pd.DataFrame | None = None  # dose-response table (sensitivity.parquet); None: no sweeps
    # The confirmatory table (confirmatory.parquet); None: a study whose stats step predates it.
    confirmatory: pd.DataFrame | None = None
    sensitivity_best: pd.DataFrame | None = None  # best value per curve (sensitivity_best.parquet)
    stage: str = "confirmation"  # a tuning study leads with its choices and frontiers
    frontier_comparison: pd.DataFrame | None = None  # a tuning study's (frontier_comparison.parquet)
    tuning_budget: pd.DataFrame | None = None  # a tuning study's (tuning_budget.parquet)
    tuning_rule: str = ""  # the declared selection rule in words
    horizon: Mapping[str, Any] | None = None  # the training-horizon check's result (horizon_gain); None: none declared
    # Agreement across seeds per variant (stats.stability.agreement_summary, seed_agreement.parquet); None: none
    agreement: pd.DataFrame | None = None
    router_logs: pd.DataFrame | None = None  # router logs of the ok runs (collect.load_router_logs); None: none


# --------------------------------------------------------------------------- computations


def noncausal_variants(summary: pd.DataFrame, split: str, balanced_by_construction: Iterable[str]) -> list[str]:
    """Variants whose reported perplexity on `split` was routed non-causally, in the summary's order.

    The evaluation JSONs say so (``causal_routing`` 0, its mean over seeds below 1). A variant none of whose
    runs says (evaluated before the key existed) falls back on its router's declaration: one that balances
    load by construction chose among the whole group's tokens.
    """
    rows = summary[(summary["split"] == split) & (summary["metric"] == "causal_routing") & (summary["kind"] == VARIANT)]
    measured = {str(r.variant): r.mean for r in rows.itertuples() if r.n > 0 and math.isfinite(r.mean)}
    fallback = set(balanced_by_construction)
    variants = dict.fromkeys(summary.loc[summary["kind"] == VARIANT, "variant"].astype(str))
    return [v for v in variants if (measured[v] < 1 if v in measured else v in fallback)]


def noncausal_perplexities(summary: pd.DataFrame, split: str, group_routed: Iterable[str]) -> list[dict]:
    """The variants evaluated causally that also report a non-causal perplexity (``ppl_noncausal``): the
    variant and both mean perplexities on `split`, formatted."""
    part = summary[(summary["split"] == split) & (summary["kind"] == VARIANT) & (summary["n"] > 0)]
    means = {(str(r.variant), r.metric): r.mean for r in part.itertuples() if r.metric in ("ppl", "ppl_noncausal")}
    skip = set(group_routed)
    variants = dict.fromkeys(str(v) for v, metric in means if metric == "ppl_noncausal" and v not in skip)
    return [
        dict(
            variant=v,
            causal=format_number(means.get((v, "ppl"), math.nan)),
            noncausal=format_number(means[v, "ppl_noncausal"]),
        )
        for v in variants
    ]


def final_loss_slope(log: pd.DataFrame, fraction: float = FINAL_FRACTION, min_points: int = MIN_SLOPE_POINTS) -> dict:
    """Least-squares slope of ``loss`` against ``step`` over the last ``fraction`` of the steps.

    The window is the logged steps ``≥ (1 − fraction) · last step``, widened to the last
    ``min_points`` logged steps when it holds fewer. Returns the slope in nats per
    ``PER_STEPS`` steps (NaN with fewer than two finite points) and the window used.
    """
    log = log[np.isfinite(log["loss"])].sort_values("step")
    if len(log) < 2:
        return dict(slope=math.nan, points=len(log), first_step=math.nan, last_step=math.nan)
    last = float(log["step"].iloc[-1])
    window = log[log["step"] >= (1 - fraction) * last]
    if len(window) < min_points:
        window = log.tail(min_points)
    fit = scipy_stats.linregress(window["step"].to_numpy(float), window["loss"].to_numpy(float))
    return dict(
        slope=float(fit.slope) * PER_STEPS, points=len(window), first_step=float(window["step"].iloc[0]), last_step=last
    )


def loss_slopes(train_logs: pd.DataFrame) -> pd.DataFrame:
    """Per (variant, seed): the final training-loss slope (``final_loss_slope``)."""
    columns = ["variant", "seed", "slope", "points", "first_step", "last_step"]
    if train_logs.empty:
        return pd.DataFrame(columns=columns)
    rows = [
        dict(variant=str(variant), seed=int(seed), **final_loss_slope(log))
        for (variant, seed), log in train_logs.groupby([train_logs["variant"].astype(str), "seed"], sort=False)
    ]
    return pd.DataFrame(rows, columns=columns)


def bigram_ppl(baselines: pd.DataFrame, split: str) -> float:
    """Token perplexity of the interpolated bigram on ``split`` (NaN when absent)."""
    rows = baselines[(baselines["model"] == BIGRAM) & (baselines["split"] == split) & (baselines["metric"] == "ppl")]
    return float(rows["value"].iloc[0]) if len(rows) else math.nan


def adequacy(inputs: FindingsInputs) -> pd.DataFrame:
    """Training-adequacy verdict per variant, in study order.

    Columns: runs ok / expected, the mean test PPL with its t CI, the bigram's PPL, whether
    the mean is below it, the mean final loss slope over seeds with its t CI, and
    ``problems``: the failed checks in words (empty when the variant passed every check).
    """
    status = inputs.status.assign(variant=inputs.status["variant"].astype(str))
    summary = inputs.summary
    summary = summary[(summary["split"] == inputs.split) & (summary["metric"] == "ppl") & (summary["kind"] == VARIANT)]
    summary = summary.set_index(summary["variant"].astype(str))
    slopes = loss_slopes(inputs.train_logs)
    bigram = bigram_ppl(inputs.baselines, inputs.split)
    rows = []
    for variant, runs in status.groupby("variant", sort=False):
        problems = []
        bad = runs[runs["status"] != RUN_OK]
        for run in bad.itertuples():
            detail = f" ({run.detail})" if run.detail else ""
            problems.append(f"seed {run.seed} {run.status}{detail}")
        ppl = summary.loc[variant] if variant in summary.index else None
        n = int(ppl["n"]) if ppl is not None and np.isfinite(ppl["n"]) else 0
        mean = float(ppl["mean"]) if n else math.nan
        low, high = (float(ppl["ci_low"]), float(ppl["ci_high"])) if n else (math.nan, math.nan)
        if not math.isfinite(mean):
            problems.append(f"no finite {inputs.split} perplexity")
            beats = None
        elif not math.isfinite(bigram):
            problems.append(f"no bigram baseline on {inputs.split} to compare with")
            beats = None
        else:
            beats = bool(mean < bigram)
            if not beats:
                problems.append(
                    f"mean {inputs.split} PPL {format_number(mean)} is not below the bigram's {format_number(bigram)}"
                )
        seed_slopes = slopes.loc[slopes["variant"] == variant, "slope"].to_numpy(float)
        seed_slopes = seed_slopes[np.isfinite(seed_slopes)]
        slope = float(seed_slopes.mean()) if seed_slopes.size else math.nan
        slope_low, slope_high = t_confidence_interval(seed_slopes)
        if not seed_slopes.size:
            problems.append("no training log")
        rows.append(
            dict(
                variant=variant,
                runs_ok=int((runs["status"] == RUN_OK).sum()),
                runs=len(runs),
                n=n,
                ppl=mean,
                ppl_ci_low=low,
                ppl_ci_high=high,
                bigram_ppl=bigram,
                beats_bigram=beats,
                slope=slope,
                slope_ci_low=slope_low,
                slope_ci_high=slope_high,
                slope_seeds=int(seed_slopes.size),
                problems=problems,
            )
        )
    return pd.DataFrame(rows)


def classify(comparisons: pd.DataFrame, alpha: float) -> dict[str, dict[str, pd.DataFrame]]:
    """Primary rows grouped by family (endpoint), each split into significant / not / untestable.

    Significant: Holm-adjusted paired t-test p < ``alpha``. Untestable: no p-value (the
    note column says why).
    """
    primary = comparisons[comparisons["endpoint"] == PRIMARY]
    result = {}
    for family, rows in primary.groupby("family", sort=False):
        p = rows["p_ttest_holm"].astype(float)
        result[family] = dict(significant=rows[p < alpha], not_significant=rows[p >= alpha], untestable=rows[p.isna()])
    return result


def _direction(metric: str, delta: float) -> str:
    if metric in LOWER_IS_BETTER:
        return "better" if delta < 0 else "worse"
    if metric in HIGHER_IS_BETTER:
        return "better" if delta > 0 else "worse"
    return "higher" if delta > 0 else "lower"


# --------------------------------------------------------------------------- the confirmatory answer

CONFIRMATORY_TITLES = {
    CONTRASTS: "Declared contrasts × primary endpoints",
    ABLATIONS: "Ablations × primary endpoints (Δ = ablation − base)",
}


def _verdict_style(verdict: str) -> str:
    if verdict == DIFFERENT:
        return "b"
    if verdict.startswith(EQUIVALENT):
        return "pass"
    return "muted" if verdict != INCONCLUSIVE else "caution"


def _verdict_sentence(rows: pd.DataFrame) -> Rich:
    """How many rows got each verdict, in words; equivalence only as the TOST verdict says it."""
    different = int((rows["verdict"] == DIFFERENT).sum())
    equivalent = int(rows["verdict"].str.startswith(EQUIVALENT).sum())
    inconclusive = int((rows["verdict"] == INCONCLUSIVE).sum())
    untested = len(rows) - different - equivalent - inconclusive
    parts = [
        f"{different} different",
        f"{equivalent} equivalent within their margins (TOST)",
        f"{inconclusive} inconclusive (neither a difference nor an equivalence shown)",
    ]
    if untested:
        parts.append(f"{untested} not tested ({CONSTANT_BY_CONSTRUCTION})")
    tests = int(rows["p_ttest"].notna().sum())
    return [(f"Holm family of {tests} test{'s' if tests != 1 else ''}: " + ", ".join(parts) + ".", "")]


def confirmatory_families(table: pd.DataFrame | None, power: float) -> list[dict]:
    """Per family of the confirmatory table: a heading, a sentence counting the verdicts and a table (head and
    rich-text cells: contrast, endpoint, Δ, CI, Holm p, margin, Holm TOST p, verdict, MDD, n)."""
    if table is None:
        return []
    level = int(CONFIDENCE * 100)
    head = [
        "contrast (a − b)",
        "endpoint",
        "Δ = a − b",
        f"{level}% CI",
        "p (Holm)",
        "margin ±m",
        "p TOST (Holm)",
        "verdict",
        f"MDD ({power:.0%} power)",
        "n",
    ]
    families = []
    for family, rows in table.groupby("family", sort=False):
        cells = [
            [
                [(r.contrast, "b")],
                [(metric_label(r.metric), "")],
                [(format_number(r.mean_diff) + _relative(r.mean_diff, r.mean_b, signed=True), "")],
                [(format_interval(r.ci_low, r.ci_high), "")],
                [(format_p(r.p_ttest_holm), "")],
                [(format_number(r.margin), "")],
                [(format_p(r.p_tost_holm), "")],
                [(r.verdict, _verdict_style(r.verdict))],
                [(format_number(r.mdd) + _relative(r.mdd, r.mean_b), "")],
                [(str(int(r.n)), "")],
            ]
            for r in rows.itertuples()
        ]
        families.append(
            dict(
                heading=CONFIRMATORY_TITLES.get(family, family), summary=_verdict_sentence(rows), head=head, rows=cells
            )
        )
    return families


# --------------------------------------------------------------------------- the page's wording


def plain(rich: Rich) -> str:
    """The text of rich text, without its styles."""
    return "".join(text for text, _ in rich)


def _note(row) -> str:
    return row.note if isinstance(row.note, str) and row.note else "no p-value"


def _relative(value: float, base: float, signed: bool = False) -> str:
    """`` (x% of the reference's mean)`` in short, or nothing where the base is 0 or undefined."""
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return ""
    return f" ({100 * value / abs(base):{'+' if signed else ''}.1f}%)"


def _comparison_line(row, caveat: bool, alpha: float) -> Rich:
    """``variant: Δ = …, 95% CI […], Holm p = …, n = …, MDD = …`` for one comparison row."""
    mark = "†" if caveat else ""
    significant = math.isfinite(row.p_ttest_holm) and row.p_ttest_holm < alpha
    direction = f" ({_direction(row.metric, row.mean_diff)})" if significant else ""
    mdd = format_number(row.mdd) + _relative(row.mdd, row.mean_a)
    return [
        (row.variant_b, "b"),
        (
            f"{mark}: Δ = {format_number(row.mean_diff)}{_relative(row.mean_diff, row.mean_a, signed=True)}"
            f"{direction}, {int(CONFIDENCE * 100)}% CI {format_interval(row.ci_low, row.ci_high)}, "
            f"Holm p = {format_p(row.p_ttest_holm)}, n = {int(row.n)}, MDD = {mdd}",
            "",
        ),
    ]


def _mdd_sentence(rows: pd.DataFrame, label: str, alpha: float, power: float) -> Rich:
    mdd = rows["mdd"].astype(float)
    mdd = mdd[np.isfinite(mdd)]
    if mdd.empty:
        why = "fewer than two paired seeds or no spread"
        return [(f"The minimum detectable difference could not be computed ({why}).", "caution")]
    seeds = sorted({int(n) for n in rows["n"] if n >= 2})
    span = (
        format_number(mdd.min())
        if math.isclose(mdd.min(), mdd.max())
        else f"{format_number(mdd.min())} to {format_number(mdd.max())}, depending on the comparison"
    )
    text = (
        f"With n = {', '.join(map(str, seeds))} paired seeds, the study could not detect differences in {label} "
        f"smaller than the minimum detectable difference (MDD), {span} (paired t-test, α = {alpha:g}, "
        f"power {power:g}, from each comparison's observed sd)."
    )
    return [(text, "")]


def endpoint_families(
    comparisons: pd.DataFrame, alpha: float, power: float, against: str, caveat_variants: set[str]
) -> list[dict]:
    """Per primary endpoint: a heading and list items (rich text, each with its sub-list): who differs,
    who does not, who cannot be tested, and the MDD."""
    families = []
    for groups in classify(comparisons, alpha).values():
        rows = pd.concat([groups["significant"], groups["not_significant"], groups["untestable"]])
        metric, split = str(rows["metric"].iloc[0]), str(rows["split"].iloc[0])
        label = metric_label(metric)
        m = int(rows["p_ttest"].notna().sum())

        def lines(part: pd.DataFrame) -> list[Rich]:
            return [
                _comparison_line(r, r.metric == "ppl" and r.variant_b in caveat_variants, alpha)
                for r in part.itertuples()
            ]

        items = []
        if len(groups["significant"]):
            items.append(dict(text=[(f"Differ significantly from {against}:", "")], lines=lines(groups["significant"])))
        else:
            items.append(dict(text=[(f"No variant differs significantly from {against}.", "")], lines=[]))
        if len(groups["not_significant"]):
            intro = (
                "No significant difference: absence of evidence only; equivalence needs a TOST verdict (the "
                "confirmatory contrasts above):"
            )
            items.append(dict(text=[(intro, "")], lines=lines(groups["not_significant"])))
        if len(groups["untestable"]):
            untestable = [[(r.variant_b, "b"), (f": {_note(r)}", "")] for r in groups["untestable"].itertuples()]
            items.append(dict(text=[("Not testable:", "")], lines=untestable))
        items.append(dict(text=_mdd_sentence(rows, label, alpha, power), lines=[]))
        heading = f"{label} ({split}) — Holm family of {m} comparison{'s' if m != 1 else ''}"
        families.append(dict(heading=heading, items=items))
    return families


def _exploratory_sentence(comparisons: pd.DataFrame, alpha: float) -> str:
    exploratory = comparisons[comparisons["endpoint"] != PRIMARY]
    if exploratory.empty:
        return ""
    hits = exploratory[exploratory["p_ttest_holm"].astype(float) < alpha]
    metrics = ", ".join(dict.fromkeys(metric_label(m) for m in exploratory["metric"]))
    listed = "; ".join(
        f"{r.variant_b} on {metric_label(r.metric)} (Δ = {format_number(r.mean_diff)})" for r in hits.itertuples()
    )
    return (
        f"Exploratory endpoints ({metrics}) are in the tables but not interpreted here: {len(hits)} of "
        f"{len(exploratory)} comparisons reach Holm p < {alpha:g} within their family"
        f"{': ' + listed if listed else ''}. They generate hypotheses, they do not test them."
    )


# --------------------------------------------------------------------------- what the experts learned

EARLY, LATE = 0.1, 0.9  # the first and the last tenth of training, for the busiest expert's load over training


def busiest_load_over_training(router_logs: pd.DataFrame) -> pd.DataFrame:
    """Per variant with router-log rows (study order): the busiest expert's load as a multiple of a fair share,
    E · max_i f_i of the logged training batch (f renormalised over the step's experts, as the load-over-training
    figure draws it), averaged over the logged steps of the first tenth of training (``early``) and of the last
    (``late``), then over layers and seeds; ``n_seeds`` the seeds averaged."""
    columns = ["variant", "early", "late", "n_seeds"]
    loads = router_logs.loc[np.isfinite(router_logs["load"].to_numpy(dtype=float))] if len(router_logs) else None
    if loads is None or loads.empty:
        return pd.DataFrame(columns=columns)
    run_step = ["variant", "seed", "layer", "step"]
    batch = loads.groupby(run_step, observed=True)["load"]
    busiest = (batch.max() / batch.sum() * batch.size()).rename("busiest").reset_index()
    last = busiest.groupby(["variant", "seed"], observed=True)["step"].transform("max")
    busiest["phase"] = np.where(
        busiest["step"] <= EARLY * last, "early", np.where(busiest["step"] >= LATE * last, "late", "")
    )
    phases = busiest[busiest["phase"] != ""]
    per_seed = phases.groupby(["variant", "seed", "phase"], observed=True)["busiest"].mean().unstack("phase")
    rows = []
    for variant in variant_order(router_logs):
        if variant not in per_seed.index.get_level_values("variant"):
            continue
        part = per_seed.xs(variant, level="variant").reindex(columns=["early", "late"])
        rows.append(dict(variant=variant, early=part["early"].mean(), late=part["late"].mean(), n_seeds=len(part)))
    return pd.DataFrame(rows, columns=columns)


def load_over_training_item(router_logs: pd.DataFrame | None) -> list[Rich]:
    """One sentence on the load over training (busiest_load_over_training): which variant's busiest expert ends
    the furthest above a fair share and which the closest, each from the first tenth of training to the last."""
    if router_logs is None:
        return []
    table = busiest_load_over_training(router_logs)
    table = table[np.isfinite(table["late"].to_numpy(dtype=float))]
    if table.empty:
        return []
    values = {r.variant: pd.Series({"early": r.early, "late": r.late, "n": r.n_seeds}) for r in table.itertuples()}
    text = _extremes(
        values,
        "the busiest expert's share of the training batch, as a multiple of a fair share (E · max f; means over "
        "layers and seeds), from the first tenth of training to the last,",
        show=lambda row: f"{format_number(row['early'])} → {format_number(row['late'])}, n = {int(row['n'])}",
        key=lambda row: row["late"],
    )
    return [[("Load over training: ", "b"), (text + ".", "")]]


def _measured(summary: pd.DataFrame, split: str, metric: str) -> dict[str, pd.Series]:
    """Variant -> its summary row of `metric` on `split`, for the variants with a finite mean (study order)."""
    rows = summary[(summary["split"] == split) & (summary["kind"] == VARIANT) & (summary["metric"] == metric)]
    return {str(r["variant"]): r for _, r in rows.iterrows() if r["n"] > 0 and math.isfinite(r["mean"])}


def _mean_ci(row: pd.Series) -> str:
    return f"{format_number(row['mean'])} {format_interval(row['ci_low'], row['ci_high'])}, n = {int(row['n'])}"


def _extremes(
    values: dict[str, pd.Series], what: str, show=_mean_ci, key=lambda row: row["mean"], most="highest", least="lowest"
) -> str:
    """`what` of the variants of `values`, the largest and the smallest by `key`, each with `show` of its row."""
    ordered = sorted(values.items(), key=lambda item: key(item[1]))
    (low, low_row), (high, high_row) = ordered[0], ordered[-1]
    if len(ordered) == 1:
        return f"{what} is {show(high_row)} for {high}"
    return f"{what} is {most} for {high} ({show(high_row)}) and {least} for {low} ({show(low_row)})"


def _clauses(label: str, *clauses: tuple[dict[str, pd.Series], str]) -> list[Rich]:
    """One item: `label` in bold, then for each (values, what) with values, `_extremes(values, what)`, joined by
    semicolons; no item when no clause has values."""
    parts = [_extremes(values, what) for values, what in clauses if values]
    return [[(label, "b"), ("; ".join(parts) + ".", "")]] if parts else []


def specialisation_items(
    summary: pd.DataFrame, split: str, agreement: pd.DataFrame | None = None, router_logs: pd.DataFrame | None = None
) -> list[Rich]:
    """One sentence per analysis of what the experts learned (co-activation, vocabulary specialisation, utilisation
    over routing groups, routing stability over training), built from the summary's means and t CIs, one on
    agreement across seeds (``agreement``: stats.stability.agreement_summary; mean and range over pairs, no CI) and
    one on the load over training (``router_logs``: load_over_training_item); then the variants without values."""
    items: list[Rich] = []
    coactivation = _measured(summary, split, "coactivation_max")
    if coactivation:
        what = "the largest share of one expert's tokens also routed to a single other expert"
        items.append([("Co-activation: ", "b"), (_extremes(coactivation, what) + ".", "")])
    vocabulary = _measured(summary, split, "vocab_specialisation_above_floor")
    information = _measured(summary, split, "token_expert_mi_share_of_max")
    items += _clauses(
        "Vocabulary specialisation: ",
        (
            vocabulary,
            "the frequency-weighted share of a token id's occurrences routed to its most used expert, above the "
            "floor that k experts per token impose (0: the floor, 1: each id always reaches the same experts),",
        ),
        (information, "the token–expert MI as a share of its attainable maximum"),
    )
    low, high = (_measured(summary, split, f"utilisation_{name}") for name in ("p5", "p95"))
    spread = {v: pd.Series({"p5": low[v]["mean"], "p95": high[v]["mean"]}) for v in low if v in high}
    if spread:
        text = _extremes(
            spread,
            "the range from the 5th to the 95th percentile of the experts' utilisation E·f in a routing group "
            "(1: a fair share; means over seeds)",
            show=lambda row: f"{format_number(row['p5'])} to {format_number(row['p95'])}",
            key=lambda row: row["p95"] - row["p5"],
            most="widest",
            least="narrowest",
        )
        items.append([("Utilisation: ", "b"), (text + ".", "")])
    items += _clauses(
        "Routing stability over training (StableMoE): ",
        (
            _measured(summary, split, "routing_fluctuation"),
            "the mean share of probe tokens whose expert set changed between consecutive routing snapshots",
        ),
        (
            _measured(summary, split, "late_fluctuation_share"),
            "the share of probe tokens still changing after 20% of training",
        ),
    )
    if agreement is not None and len(agreement):
        show = {
            str(r["variant"]): pd.Series(
                {"mean": r["agreement_mean"], "low": r["agreement_min"], "high": r["agreement_max"]}
                | {"chance": r["chance_mean"], "pairs": r["n_pairs"]}
            )
            for _, r in agreement.iterrows()
            if math.isfinite(r["agreement_mean"])
        }
        if show:
            text = _extremes(
                show,
                "the matched agreement of two seeds' routings of the probe (1: the same routing up to expert labels)",
                show=lambda row: (
                    f"{format_number(row['mean'])}, range {format_number(row['low'])}–{format_number(row['high'])} "
                    f"over {int(row['pairs'])} pair{'s' if int(row['pairs']) != 1 else ''}, "
                    f"chance {format_number(row['chance'])}"
                ),
            )
            items.append([("Agreement across seeds: ", "b"), (text + ".", "")])
    items += load_over_training_item(router_logs)
    variants = dict.fromkeys(summary.loc[summary["kind"] == VARIANT, "variant"].astype(str))
    without = [v for v in variants if v not in {**coactivation, **vocabulary, **information, **spread}]
    if without:
        text = (
            f"No value for {', '.join(without)}: no routing, or runs evaluated before these metrics existed."
            if items
            else "No variant has these values: none routes, or its runs were evaluated before these metrics existed."
        )
        items.append([(text, "muted")])
    return items


def horizon_gain(tidy: pd.DataFrame, horizon: Mapping[str, Any] | None, split: str) -> dict | None:
    """The training-horizon check (config findings.horizon): how much the same router trained longer lowers the
    perplexity on `split`, paired by seed. The gain is variant − longer (positive: more steps still help), with its
    t CI, also as a share of the variant's mean; ``flagged`` when the mean share exceeds ``max_gain``."""
    if not horizon:
        return None
    short, long = horizon["variant"], horizon["longer"]
    a, b = per_seed(tidy, long, "ppl", split), per_seed(tidy, short, "ppl", split)
    paired = paired_difference(a, b)  # b − a = short − long
    common = [s for s in a.index if s in b.index and np.isfinite(a[s]) and np.isfinite(b[s])]
    mean_short = float(b[common].mean()) if common else math.nan
    relative = paired["mean_diff"] / mean_short if common else math.nan
    return dict(
        variant=short,
        longer=long,
        max_gain=float(horizon["max_gain"]),
        n=paired["n"],
        ppl=mean_short,
        ppl_longer=float(a[common].mean()) if common else math.nan,
        gain=paired["mean_diff"],
        ci_low=paired["ci_low"],
        ci_high=paired["ci_high"],
        relative=relative,
        flagged=bool(math.isfinite(relative) and relative > horizon["max_gain"]),
    )


def horizon_sentence(result: Mapping[str, Any] | None, split: str) -> Rich:
    """The training-horizon check in words."""
    if result is None:
        return [
            (
                "No horizon check declared in this study (config.yaml findings.horizon): the tuning study runs one "
                "(workflow/presets/tune.yaml).",
                "muted",
            )
        ]
    if result["n"] == 0:
        return [(f"{result['longer']} has no run paired with {result['variant']}: the horizon is not checked.", "fail")]
    text = (
        f"{result['longer']} ({result['variant']} trained longer) reaches {split} PPL "
        f"{format_number(result['ppl_longer'])} against {format_number(result['ppl'])}: more steps still gain "
        f"{format_number(result['gain'])} PPL {format_interval(result['ci_low'], result['ci_high'])} "
        f"({100 * result['relative']:.1f}% of it, n = {result['n']} paired seeds). "
    )
    if result["flagged"]:
        return [
            (text, ""),
            (
                f"That is more than the declared {100 * result['max_gain']:.0f}%: the study describes a short "
                "training horizon, and its differences may change with longer training.",
                "fail",
            ),
        ]
    return [(text, ""), (f"Within the declared {100 * result['max_gain']:.0f}%.", "pass")]


def adequacy_table(verdicts: pd.DataFrame, split: str) -> dict:
    """Head, rows (a rich-text cell per column) and note of the training-adequacy table."""
    level = int(CONFIDENCE * 100)
    head = [
        "variant",
        "runs ok",
        f"mean {split} PPL [{level}% CI]",
        "bigram PPL",
        "beats bigram",
        f"final loss slope, nats / {PER_STEPS} steps [{level}% CI] (descriptive)",
        "verdict",
    ]
    rows = []
    for v in verdicts.itertuples():
        runs = f"{v.runs_ok} / {v.runs}"
        if v.beats_bigram is None or pd.isna(v.beats_bigram):
            beats = ("n/a", "fail")
        elif not v.beats_bigram:
            beats = ("no", "fail")
        elif math.isfinite(v.ppl_ci_high) and v.ppl_ci_high >= v.bigram_ppl:
            beats = ("yes, but the CI reaches it", "caution")
        else:
            beats = ("yes", "pass")
        slope = f"{format_number(v.slope)} {format_interval(v.slope_ci_low, v.slope_ci_high)}"
        rows.append(
            [
                [(v.variant, "b")],
                [(runs, "fail" if v.runs_ok < v.runs else "")],
                [(f"{format_number(v.ppl)} {format_interval(v.ppl_ci_low, v.ppl_ci_high)}", "")],
                [(format_number(v.bigram_ppl), "")],
                [beats],
                [(slope, "")],
                [("fails: " + "; ".join(v.problems), "fail")] if v.problems else [("adequate", "pass")],
            ]
        )
    note = (
        f"Slope: least-squares fit (scipy.stats.linregress) of the training loss against the step over "
        f"the last {FINAL_FRACTION:.0%} of logged steps (at least {MIN_SLOPE_POINTS}), mean over seeds; "
        "descriptive only: under a decaying learning rate the slope flattens with the schedule, so it says nothing "
        "about convergence. The horizon check below compares each run with its router trained longer."
    )
    return dict(head=head, rows=rows, note=note)


def _at(curve: pd.DataFrame, metric: str, value: float) -> pd.Series:
    return curve[(curve["metric"] == metric) & (curve["value"] == value)].iloc[0]


def _ppl_resolution(curve: pd.DataFrame, reference: str) -> Rich:
    """Which values' perplexity the seeds separate from the reference's (paired Δ PPL CI excluding 0).

    The best-value rule compares mean Δ PPL with 0; where the interval contains 0 that comparison is
    within the seeds' noise, and the reader should know how much of the curve that is.
    """
    ppl = curve[(curve["metric"] == "ppl") & np.isfinite(curve["delta_ci_low"]) & np.isfinite(curve["delta_ci_high"])]
    if ppl.empty:
        return []
    sides = [
        f"{side} it at {', '.join(f'{v:g}' for v in rows['value'])}"
        for side, rows in (("below", ppl[ppl["delta_ci_high"] < 0]), ("above", ppl[ppl["delta_ci_low"] > 0]))
        if len(rows)
    ]
    unresolved = int(((ppl["delta_ci_low"] <= 0) & (ppl["delta_ci_high"] >= 0)).sum())
    if not sides:
        text = (
            f"No value's Δ PPL interval excludes 0: these seeds do not separate any value's perplexity from "
            f"{reference}'s, so which values count as no worse is within noise."
        )
        return [(text, "caution")]
    rest = (
        f"; at the other {unresolved} the Δ PPL interval contains 0, so whether they are no worse is within noise"
        if unresolved
        else ""
    )
    return [(f"Perplexity differs from {reference}'s beyond the seeds' noise {' and '.join(sides)}{rest}.", "")]


def _curve_sentence(curve: pd.DataFrame, best: pd.Series | None) -> Rich:
    """One dose-response curve in words: both ends against the reference, the best value, the term's reach."""
    first = curve.iloc[0]
    values = sorted(curve["value"].unique())
    low, high = values[0], values[-1]
    reference = str(first["reference"])
    option = first["option"] + (f" ({first['fixed']})" if first["fixed"] else "")
    term = f", the {first['term']} term" if isinstance(first["term"], str) else ""
    sentences: list[Rich] = [[(option, "b"), (f"{term}: {len(values)} values from {low:g} to {high:g}.", "")]]
    for metric in ("gini", "ppl"):
        a, b = _at(curve, metric, low), _at(curve, metric, high)
        text = (
            f"{metric_label(metric)} {format_number(a['mean'])} → {format_number(b['mean'])} "
            f"({reference}: {format_number(a['ref_mean'])})."
        )
        sentences.append([(text, "")])
    if best is None or not math.isfinite(best["value"]):
        note = best["note"] if best is not None and best["note"] else "no value has the rule's metrics"
        sentences.append([(f"No value chosen: {note}.", "caution")])
    else:
        sentences.append(_chosen_sentence(first["option"], best))
    sentences.append(_ppl_resolution(curve, reference))
    flips = curve[curve["metric"] == FLIP_RATE]
    if len(flips) and np.isfinite(flips["mean"]).any():
        top = flips.loc[flips["mean"].idxmax()]
        sentences.append([(f"The term flips up to {100 * top['mean']:.1f}% of top-k sets (at {top['value']:g}).", "")])
    rich: Rich = []
    for sentence in filter(None, sentences):
        rich += ([(" ", "")] if rich else []) + sentence
    return rich


def _chosen_sentence(option: str, best: pd.Series) -> Rich:
    """The value the declared rule chose, with its means; flagged when no value met the bounds."""
    means = (
        f"(PPL {format_number(best['ppl_mean'])}, MaxVio global {format_number(best['maxvio_global_mean'])}, "
        f"Gini {format_number(best['gini_mean'])} {format_interval(best['gini_ci_low'], best['gini_ci_high'])})"
    )
    if best["within_bounds"]:
        return [(f"Chosen by the declared rule, {best['rule']}: {option} = {best['value']:g} {means}.", "")]
    return [
        (
            f"No value meets the declared rule's bounds ({best['note']}): {option} = {best['value']:g} {means}.",
            "caution",
        )
    ]


def tuning_items(comparison: pd.DataFrame, best: pd.DataFrame, budget: pd.DataFrame) -> dict:
    """A tuning study in words: what each router got and the value chosen for it, then each frontier comparison."""
    chosen = []
    for row in budget.itertuples():
        match = best[(best["sweep"] == row.sweep) & (best["option"] == row.option)]
        pick = match.iloc[0] if len(match) else None
        head: Rich = [
            (f"{row.variant} ({row.router}, {row.option})", "b"),
            (f": {row.n_values} values ({row.values}) × {row.n_seeds} seeds, ", ""),
            (f"{row.runs_ok}/{row.runs_planned} runs ok. ", ""),
        ]
        if pick is None or not math.isfinite(pick["value"]):
            chosen.append(
                [*head, ("No value chosen" + (f": {pick['note']}" if pick is not None else "") + ".", "caution")]
            )
        else:
            chosen.append([*head, *_chosen_sentence(row.option, pick)])
    gaps = []
    level = int(CONFIDENCE * 100)
    for row in comparison.itertuples():
        head = [(f"{row.variant_a} − {row.variant_b}", "b"), (f" at matched {metric_label(row.balance_metric)}: ", "")]
        if row.n == 0 or not math.isfinite(row.gap_mean):
            gaps.append([*head, (f"not compared ({row.note or 'no seed with overlapping fronts'}).", "muted")])
            continue
        interval = format_interval(row.gap_ci_low, row.gap_ci_high)
        text = (
            f"PPL gap {format_number(row.gap_mean)} {interval} over {row.n} seed(s), balance range "
            f"{format_number(row.overlap_low)}–{format_number(row.overlap_high)}"
        )
        if math.isfinite(row.gap_ci_low) and (row.gap_ci_high < 0 or row.gap_ci_low > 0):
            side = "lower" if row.gap_ci_high < 0 else "higher"
            verdict = (
                f": {row.variant_a} reaches {side} perplexity at matched balance ({level}% CI excludes 0; exploratory)"
            )
        else:
            verdict = (
                ": the seeds resolve no difference (the interval includes 0 or is undefined); no claim of equality"
            )
        gaps.append([*head, (text + verdict + (f"; {row.note}" if row.note else "") + ".", "")])
    return dict(chosen=chosen, gaps=gaps)


def sensitivity_items(dose: pd.DataFrame, best: pd.DataFrame) -> list[Rich]:
    """Every sweep's curves in words (the dose-response table and the best values of `sensitivity`)."""
    items = []
    for (sweep, option, fixed), curve in dose.groupby(["sweep", "option", "fixed"], sort=False):
        match = best[(best["sweep"] == sweep) & (best["option"] == option) & (best["fixed"] == fixed)]
        items.append([(f"{sweep} · ", ""), *_curve_sentence(curve, match.iloc[0] if len(match) else None)])
    return items


# --------------------------------------------------------------------------- the page


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("analysis", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(inputs: FindingsInputs) -> str:
    """The findings page (standalone HTML)."""
    verdicts = adequacy(inputs)
    caveat = set(inputs.group_routed)
    failing = verdicts[verdicts["problems"].map(bool)] if len(verdicts) else verdicts
    ablation_base = str(inputs.ablations["variant_a"].iloc[0]) if len(inputs.ablations) else None
    sweeps = inputs.sensitivity is not None and len(inputs.sensitivity) > 0
    return (
        _environment()
        .get_template(TEMPLATE)
        .render(
            css=CSS,
            styles=STYLES,
            split=inputs.split,
            reference=inputs.reference,
            alpha=f"{inputs.alpha:g}",
            n_variants=len(verdicts),
            failing=[dict(variant=v.variant, problems=v.problems) for v in failing.itertuples()],
            confirmatory=confirmatory_families(inputs.confirmatory, inputs.power),
            has_confirmatory=inputs.confirmatory is not None,
            endpoints=endpoint_families(inputs.comparisons, inputs.alpha, inputs.power, inputs.reference, caveat),
            exploratory=_exploratory_sentence(inputs.comparisons, inputs.alpha),
            ablation_base=ablation_base,
            ablations=endpoint_families(inputs.ablations, inputs.alpha, inputs.power, ablation_base, set())
            if ablation_base
            else [],
            adequacy=adequacy_table(verdicts, inputs.split),
            horizon=horizon_sentence(inputs.horizon, inputs.split),
            sensitivity=sensitivity_items(inputs.sensitivity, inputs.sensitivity_best) if sweeps else [],
            sensitivity_split=SELECTION_SPLIT,
            tuning=tuning_items(inputs.frontier_comparison, inputs.sensitivity_best, inputs.tuning_budget)
            if inputs.stage == "tuning" and inputs.frontier_comparison is not None
            else None,
            tuning_rule=inputs.tuning_rule,
            caveat=[dict(variant=v, label=label) for v, label in sorted(inputs.group_routed.items())],
            noncausal=noncausal_perplexities(inputs.summary, inputs.split, inputs.group_routed),
            specialisation=specialisation_items(inputs.summary, inputs.split, inputs.agreement, inputs.router_logs),
        )
    )


def write_findings(inputs: FindingsInputs, path: str | Path) -> Path:
    path = Path(path)
    page = render(inputs)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    return path
