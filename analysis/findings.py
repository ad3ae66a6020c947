"""Findings in words: the study's answer, generated from the statistics tables.

Every number on the page comes from an input file, never from this module:

* ``comparisons.csv`` / ``ablations.csv`` (``stats.paired_comparisons``): for each primary
  endpoint (``endpoint == "primary"``), which variants differ from the reference after
  Holm's adjustment within the endpoint's family, with Δ, its 95% CI and the minimum
  detectable difference (MDD) of every comparison;
* ``summary.csv`` (``stats.summarize``): each variant's mean test perplexity with its t CI;
* ``run_status.csv`` (``collect.collect_runs``): runs that are missing or failed;
* ``ngram.json`` (``python -m gtmoe baselines``): the bigram's perplexity, the floor a
  trained model has to beat;
* the training logs: the slope of the training loss over the last 10% of steps
  (``scipy.stats.linregress``), which says whether a model was still learning when stopped;
* ``sensitivity.csv`` / ``sensitivity_best.csv`` (``analysis.sensitivity``), when the study
  has sweeps: each dose-response curve's ends, its best value and how far its term reached.

A variant that fails a check (missing or failed runs, non-finite perplexity, perplexity
not below the bigram's, still learning) is shown in red at the top of the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from analysis import RUN_OK, writing
from analysis.stats import (
    ALPHA,
    CONFIDENCE,
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    POWER,
    PRIMARY,
    metric_label,
    t_confidence_interval,
)
from analysis.tables import format_interval, format_number, format_p, html_page

FINAL_FRACTION = 0.1  # the slope is fitted over the last 10% of the training steps
MIN_SLOPE_POINTS = 3  # ...and over at least this many logged steps
PER_STEPS = 1000  # slopes are quoted in nats per 1000 steps
EXPERT_CHOICE = "expert_choice"
BIGRAM = "bigram"

# Inline styles: the page is embedded in report.html as a standalone document.
_STYLE = {
    "fail": "color:#b3261e;font-weight:600",
    "pass": "color:#1e7b34;font-weight:600",
    "caution": "color:#a15c00;font-weight:600",
    "muted": "color:#6b7380",
}


@dataclass(frozen=True)
class FindingsInputs:
    comparisons: pd.DataFrame  # paired comparisons against the reference variant
    ablations: pd.DataFrame  # paired comparisons of the ablation base against its ablations
    summary: pd.DataFrame  # per-variant summary (stats.summarize)
    status: pd.DataFrame  # run status table (collect.collect_runs)
    train_logs: pd.DataFrame  # training logs of the ok runs (collect.load_train_logs)
    baselines: pd.DataFrame  # n-gram baselines (collect.read_baselines); may be empty
    reference: str
    split: str = "test"
    alpha: float = ALPHA
    power: float = POWER
    still_learning_slope: float = 1.0  # nats per 1000 steps; a steeper final descent is flagged
    sensitivity: pd.DataFrame | None = None  # dose-response table (sensitivity.csv); None: no sweeps
    sensitivity_best: pd.DataFrame | None = None  # best value per curve (sensitivity_best.csv)


# --------------------------------------------------------------------------- computations


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
    summary = inputs.summary[(inputs.summary["split"] == inputs.split) & (inputs.summary["metric"] == "ppl")]
    if "kind" in summary.columns:
        summary = summary[summary["kind"] == "variant"]
    summary = summary.set_index(summary["variant"].astype(str))
    slopes = loss_slopes(inputs.train_logs)
    bigram = bigram_ppl(inputs.baselines, inputs.split)
    rows = []
    for variant, runs in status.groupby("variant", sort=False):
        problems = []
        bad = runs[runs["status"] != RUN_OK]
        for run in bad.itertuples():
            detail = f" ({run.detail})" if isinstance(run.detail, str) and run.detail else ""
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
        still_learning = math.isfinite(slope) and slope < -inputs.still_learning_slope
        if not seed_slopes.size:
            problems.append("no training log to judge convergence")
        elif still_learning:
            problems.append(
                f"still learning: the training loss fell {format_number(-slope)} nats per "
                f"{PER_STEPS} steps over the last {FINAL_FRACTION:.0%} of steps"
            )
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
                still_learning=still_learning,
                problems=problems,
            )
        )
    return pd.DataFrame(rows)


def classify(comparisons: pd.DataFrame, alpha: float) -> dict[str, dict[str, pd.DataFrame]]:
    """Primary rows grouped by family (endpoint), each split into significant / not / untestable.

    Significant: Holm-adjusted paired t-test p < ``alpha``. Untestable: no p-value (the
    note column says why). Tables without an ``endpoint`` column count every row as primary.
    """
    if comparisons.empty:
        return {}
    primary = comparisons[comparisons["endpoint"] == PRIMARY] if "endpoint" in comparisons else comparisons
    families = primary["family"] if "family" in primary else primary["metric"] + "/" + primary["split"]
    result = {}
    for family, rows in primary.groupby(families, sort=False):
        p = rows["p_ttest_holm"].astype(float)
        result[family] = dict(significant=rows[p < alpha], not_significant=rows[p >= alpha], untestable=rows[p.isna()])
    return result


def _direction(metric: str, delta: float) -> str:
    if metric in LOWER_IS_BETTER:
        return "better" if delta < 0 else "worse"
    if metric in HIGHER_IS_BETTER:
        return "better" if delta > 0 else "worse"
    return "higher" if delta > 0 else "lower"


# --------------------------------------------------------------------------- HTML


def _span(text: str, kind: str) -> str:
    return f'<span style="{_STYLE[kind]}">{text}</span>'


def _e(value: object) -> str:
    return html.escape(str(value))


def _note(row) -> str:
    return row.note if isinstance(row.note, str) and row.note else "no p-value"


def _mdd(row) -> str:
    return format_number(row.mdd) if "mdd" in row._fields else "n/a"


def _comparison_line(row, caveat: bool, alpha: float) -> str:
    """``variant: Δ = …, 95% CI […], Holm p = …, n = …, MDD = …`` for one comparison row."""
    mark = "†" if caveat else ""
    significant = math.isfinite(row.p_ttest_holm) and row.p_ttest_holm < alpha
    direction = f" ({_direction(row.metric, row.mean_diff)})" if significant else ""
    mdd = _mdd(row) + (_relative(row.mdd, row.mean_a) if "mdd" in row._fields else "")
    return (
        f"<b>{_e(row.variant_b)}</b>{mark}: Δ = {_e(format_number(row.mean_diff))}"
        f"{_e(_relative(row.mean_diff, row.mean_a, signed=True))}{direction}, "
        f"{int(CONFIDENCE * 100)}% CI {_e(format_interval(row.ci_low, row.ci_high))}, "
        f"Holm p = {_e(format_p(row.p_ttest_holm))}, n = {int(row.n)}, MDD = {_e(mdd)}"
    )


def _relative(value: float, base: float, signed: bool = False) -> str:
    """`` (x% of the reference's mean)`` in short, or nothing where the base is 0 or undefined."""
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return ""
    return f" ({100 * value / abs(base):{'+' if signed else ''}.1f}%)"


def _mdd_sentence(rows: pd.DataFrame, label: str, alpha: float, power: float) -> str:
    if "mdd" not in rows or not np.isfinite(rows["mdd"].astype(float)).any():
        return _span(
            "The minimum detectable difference could not be computed (fewer than two paired seeds or no spread).",
            "caution",
        )
    mdd = rows["mdd"].astype(float)
    mdd = mdd[np.isfinite(mdd)]
    seeds = sorted({int(n) for n in rows["n"] if n >= 2})
    span = (
        format_number(mdd.min())
        if math.isclose(mdd.min(), mdd.max())
        else f"{format_number(mdd.min())} to {format_number(mdd.max())}, depending on the comparison"
    )
    return (
        f"With n = {_e(', '.join(map(str, seeds)))} paired seeds, the study could not detect "
        f"differences in {_e(label)} smaller than the minimum detectable difference (MDD), "
        f"{_e(span)} (paired t-test, α = {alpha:g}, power {power:g}, from each comparison's observed sd)."
    )


def _listed(rows: pd.DataFrame, caveat_variants: set[str], alpha: float) -> str:
    """List items of comparison rows; perplexity rows of caveat variants get a dagger."""
    return "".join(
        f"<li>{_comparison_line(r, r.metric == 'ppl' and r.variant_b in caveat_variants, alpha)}</li>"
        for r in rows.itertuples()
    )


def endpoint_section(
    comparisons: pd.DataFrame, alpha: float, power: float, against: str, caveat_variants: set[str]
) -> str:
    """One paragraph list per primary endpoint: who differs, who does not, the MDD."""
    families = classify(comparisons, alpha)
    if not families:
        return f'<p style="{_STYLE["muted"]}">No comparison (the variants are absent from the study).</p>'
    parts = []
    for groups in families.values():
        rows = pd.concat([groups["significant"], groups["not_significant"], groups["untestable"]])
        metric = str(rows["metric"].iloc[0])
        split = str(rows["split"].iloc[0])
        label = metric_label(metric)
        m = int(rows["p_ttest"].notna().sum())
        items = []
        significant = groups["significant"]
        if len(significant):
            lines = _listed(significant, caveat_variants, alpha)
            items.append(f"<li>Differ significantly from {_e(against)}:<ul>{lines}</ul></li>")
        else:
            items.append(f"<li>No variant differs significantly from {_e(against)}.</li>")
        if len(groups["not_significant"]):
            lines = _listed(groups["not_significant"], caveat_variants, alpha)
            items.append(
                f"<li>No significant difference (absence of evidence, not evidence of equality):<ul>{lines}</ul></li>"
            )
        if len(groups["untestable"]):
            lines = "".join(
                f"<li><b>{_e(r.variant_b)}</b>: {_e(_note(r))}</li>" for r in groups["untestable"].itertuples()
            )
            items.append(f"<li>Not testable:<ul>{lines}</ul></li>")
        items.append(f"<li>{_mdd_sentence(rows, label, alpha, power)}</li>")
        parts.append(
            f"<h3>{_e(label)} ({_e(split)}) — Holm family of {m} "
            f"comparison{'s' if m != 1 else ''}</h3><ul>{''.join(items)}</ul>"
        )
    return "".join(parts)


def _exploratory_sentence(comparisons: pd.DataFrame, alpha: float) -> str:
    if "endpoint" not in comparisons or comparisons.empty:
        return ""
    exploratory = comparisons[comparisons["endpoint"] != PRIMARY]
    if exploratory.empty:
        return ""
    hits = exploratory[exploratory["p_ttest_holm"].astype(float) < alpha]
    metrics = ", ".join(dict.fromkeys(metric_label(m) for m in exploratory["metric"]))
    listed = "; ".join(
        f"{r.variant_b} on {metric_label(r.metric)} (Δ = {format_number(r.mean_diff)})" for r in hits.itertuples()
    )
    return (
        f"<p>Exploratory endpoints ({_e(metrics)}) are in the tables but not interpreted here: "
        f"{len(hits)} of {len(exploratory)} comparisons reach Holm p &lt; {alpha:g} within their "
        f"family{_e(': ' + listed) if listed else ''}. They generate hypotheses, they do not test them.</p>"
    )


def adequacy_table(verdicts: pd.DataFrame, split: str, threshold: float) -> str:
    level = int(CONFIDENCE * 100)
    head = [
        "variant",
        "runs ok",
        f"mean {split} PPL [{level}% CI]",
        "bigram PPL",
        "beats bigram",
        f"loss slope, nats / {PER_STEPS} steps [{level}% CI]",
        "verdict",
    ]
    body = []
    for v in verdicts.itertuples():
        runs = f"{v.runs_ok} / {v.runs}"
        runs = _span(_e(runs), "fail") if v.runs_ok < v.runs else _e(runs)
        ppl = f"{format_number(v.ppl)} {format_interval(v.ppl_ci_low, v.ppl_ci_high)}"
        if v.beats_bigram is None or pd.isna(v.beats_bigram):
            beats = _span("n/a", "fail")
        elif not v.beats_bigram:
            beats = _span("no", "fail")
        elif math.isfinite(v.ppl_ci_high) and v.ppl_ci_high >= v.bigram_ppl:
            beats = _span("yes, but the CI reaches it", "caution")
        else:
            beats = _span("yes", "pass")
        slope = f"{format_number(v.slope)} {format_interval(v.slope_ci_low, v.slope_ci_high)}"
        slope = _span(_e(slope + " — still learning"), "fail") if v.still_learning else _e(slope)
        verdict = _span("fails: " + _e("; ".join(v.problems)), "fail") if v.problems else _span("adequate", "pass")
        cells = [f"<b>{_e(v.variant)}</b>", runs, _e(ppl), _e(format_number(v.bigram_ppl)), beats, slope, verdict]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    note = (
        f"Slope: least-squares fit (scipy.stats.linregress) of the training loss against the step over "
        f"the last {FINAL_FRACTION:.0%} of logged steps (at least {MIN_SLOPE_POINTS}), mean over seeds; "
        f"“still learning” when it falls faster than {format_number(threshold)} nats per {PER_STEPS} steps "
        "(config.yaml findings.still_learning_slope)."
    )
    return (
        '<div class="scroll"><table><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{''.join(body)}</tbody><caption>{_e(note)}</caption></table></div>"
    )


def _at(curve: pd.DataFrame, metric: str, value: float) -> pd.Series:
    return curve[(curve["metric"] == metric) & (curve["value"] == value)].iloc[0]


def _ppl_resolution(curve: pd.DataFrame, reference: str) -> str:
    """Which values' perplexity the seeds separate from the reference's (paired Δ PPL CI excluding 0).

    The best-value rule compares mean Δ PPL with 0; where the interval contains 0 that comparison is
    within the seeds' noise, and the reader should know how much of the curve that is.
    """
    ppl = curve[(curve["metric"] == "ppl") & np.isfinite(curve["delta_ci_low"]) & np.isfinite(curve["delta_ci_high"])]
    if ppl.empty:
        return ""
    sides = [
        f"{side} it at {', '.join(f'{v:g}' for v in rows['value'])}"
        for side, rows in (("below", ppl[ppl["delta_ci_high"] < 0]), ("above", ppl[ppl["delta_ci_low"] > 0]))
        if len(rows)
    ]
    unresolved = int(((ppl["delta_ci_low"] <= 0) & (ppl["delta_ci_high"] >= 0)).sum())
    if not sides:
        return _span(
            f"No value's Δ PPL interval excludes 0: these seeds do not separate any value's perplexity from "
            f"{reference}'s, so which values count as no worse is within noise.",
            "caution",
        )
    rest = (
        f"; at the other {unresolved} the Δ PPL interval contains 0, so whether they are no worse is within noise"
        if unresolved
        else ""
    )
    return f"Perplexity differs from {_e(reference)}'s beyond the seeds' noise {' and '.join(sides)}{rest}."


def _curve_sentence(curve: pd.DataFrame, best: pd.Series | None) -> str:
    """One dose-response curve in words: both ends against the reference, the best value, the term's reach."""
    first = curve.iloc[0]
    values = sorted(curve["value"].unique())
    low, high = values[0], values[-1]
    reference = str(first["reference"])
    option = _e(first["option"]) + (f" ({_e(first['fixed'])})" if first["fixed"] else "")
    term = f", the {_e(first['term'])} term" if isinstance(first["term"], str) else ""
    parts = [f"<b>{option}</b>{term}: {len(values)} values from {low:g} to {high:g}."]
    for metric in ("gini", "ppl"):
        a, b = _at(curve, metric, low), _at(curve, metric, high)
        parts.append(
            f"{metric_label(metric)} {format_number(a['mean'])} → {format_number(b['mean'])} "
            f"({_e(reference)}: {format_number(a['ref_mean'])})."
        )
    if best is None or not math.isfinite(best["value"]):
        parts.append(_span(f"No value keeps perplexity at or below {reference}'s.", "caution"))
    else:
        parts.append(
            f"Lowest Gini with perplexity no worse than {_e(reference)}'s: {_e(first['option'])} = "
            f"{best['value']:g} (Gini {format_number(best['gini_mean'])} "
            f"{format_interval(best['gini_ci_low'], best['gini_ci_high'])}, Δ PPL "
            f"{format_number(best['delta_ppl'])} "
            f"{format_interval(best['delta_ppl_ci_low'], best['delta_ppl_ci_high'])})."
        )
    parts.append(_ppl_resolution(curve, reference))
    flips = curve[curve["metric"] == "flip_rate"]
    if len(flips) and np.isfinite(flips["mean"]).any():
        top = flips.loc[flips["mean"].idxmax()]
        parts.append(f"The term flips up to {100 * top['mean']:.1f}% of top-k sets (at {top['value']:g}).")
    return " ".join(parts)


def sensitivity_section(dose: pd.DataFrame, best: pd.DataFrame) -> str:
    """Every sweep's curves in words (sensitivity.csv, sensitivity_best.csv)."""
    # A CSV reads the one-at-a-time curves' empty `fixed` label back as NaN, which groupby would drop.
    dose, best = (table.assign(fixed=table["fixed"].astype(object).fillna("")) for table in (dose, best))
    items = []
    for (sweep, option, fixed), curve in dose.groupby(["sweep", "option", "fixed"], sort=False):
        match = best[(best["sweep"] == sweep) & (best["option"] == option) & (best["fixed"] == fixed)]
        items.append(f"<li>{_e(sweep)} · {_curve_sentence(curve, match.iloc[0] if len(match) else None)}</li>")
    return (
        "<p>Means over seeds on the test split; intervals are 95% t CIs; Δ PPL is paired by seed "
        "(figures and tables under Sensitivity).</p><ul>" + "".join(items) + "</ul>"
    )


def render(inputs: FindingsInputs) -> str:
    """The findings page (standalone HTML)."""
    verdicts = adequacy(inputs)
    routers = dict(zip(inputs.status["variant"].astype(str), inputs.status["router"]))
    caveat = {v for v, r in routers.items() if EXPERT_CHOICE in (v, r)}
    sections = []

    failing = verdicts[verdicts["problems"].map(bool)] if len(verdicts) else verdicts
    if len(failing):
        lines = "".join(f"<li><b>{_e(v.variant)}</b>: {_e('; '.join(v.problems))}</li>" for v in failing.itertuples())
        checks = _span(f"{len(failing)} of {len(verdicts)} variants fail a check:", "fail")
        checks = f'<p>{checks}</p><ul style="{_STYLE["fail"]}">{lines}</ul>'
    else:
        checks = (
            f"<p>{_span('Every variant passes the checks', 'pass')}: all runs ok, finite perplexity "
            f"below the bigram's on {_e(inputs.split)}, no longer falling steeply at the end of training.</p>"
        )
    sections.append(("Checks", checks))

    sections.append(
        (
            f"Primary endpoints: every variant against {inputs.reference}",
            "<p>Δ = variant − " + _e(inputs.reference) + "; significant means Holm-adjusted "
            f"paired t-test p &lt; {inputs.alpha:g} within the endpoint's family.</p>"
            + endpoint_section(inputs.comparisons, inputs.alpha, inputs.power, inputs.reference, caveat)
            + _exploratory_sentence(inputs.comparisons, inputs.alpha),
        )
    )
    if len(inputs.ablations):
        base = str(inputs.ablations["variant_a"].iloc[0])
        sections.append(
            (
                f"Ablations: each against {base}",
                f"<p>Δ = ablation − {_e(base)}: a worse ablation means the removed term helped.</p>"
                + endpoint_section(inputs.ablations, inputs.alpha, inputs.power, base, set()),
            )
        )
    else:
        sections.append(
            ("Ablations", f'<p style="{_STYLE["muted"]}">No ablation in this study (config.yaml ablation).</p>')
        )
    sections.append(("Training adequacy", adequacy_table(verdicts, inputs.split, inputs.still_learning_slope)))
    if inputs.sensitivity is not None and len(inputs.sensitivity):
        sections.append(
            (
                "Sensitivity: dose-response of the swept options",
                sensitivity_section(inputs.sensitivity, inputs.sensitivity_best),
            )
        )
    if caveat:
        names = ", ".join(sorted(caveat))
        sections.append(
            (
                "Caveat",
                f"<p>† {_e(names)}: expert-choice routing picks tokens over the whole "
                "routing group, so a token's routing depends on later tokens of its "
                "sequence. Its perplexity is not strictly comparable with the causal "
                "routers'.</p>",
            )
        )
    caption = (
        f"The study's results in words, generated from the statistics tables (comparisons, ablations, "
        f"summary, run status), the n-gram baselines and the training logs. Red marks a variant that "
        f"fails a check; it stays in every table. Split: {inputs.split}."
    )
    return html_page("Findings", caption, sections)


def write_findings(inputs: FindingsInputs, path: str | Path) -> Path:
    path = Path(path)
    page = render(inputs)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    return path


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV table written by ``tables``; empty files (no rows) give an empty frame."""
    try:
        return pd.read_csv(path, keep_default_na=True)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def load_inputs(
    tables_dir: str | Path, baselines: str | None, run_dirs: Sequence[str], reference: str, **settings
) -> FindingsInputs:
    """Read every input file of the findings page: the tables of `stats` and `aggregate` in
    ``tables_dir`` (comparisons, ablations, summary, run_status .csv; the sensitivity tables
    too, if any), the n-gram baselines and the training logs of the ok runs."""
    from analysis import collect

    tables_dir = Path(tables_dir)
    dose, best = tables_dir / "sensitivity.csv", tables_dir / "sensitivity_best.csv"
    if dose.exists() and best.exists():
        settings.update(sensitivity=read_table(dose), sensitivity_best=read_table(best))
    status_table = read_table(tables_dir / "run_status.csv")
    ok = status_table[status_table["status"] == RUN_OK]
    keep = set(zip(ok["variant"].astype(str), ok["seed"].astype(int)))
    return FindingsInputs(
        comparisons=read_table(tables_dir / "comparisons.csv"),
        ablations=read_table(tables_dir / "ablations.csv"),
        summary=read_table(tables_dir / "summary.csv"),
        status=status_table,
        train_logs=collect.load_train_logs(run_dirs, keep=keep),
        baselines=collect.read_baselines(baselines),
        reference=reference,
        **settings,
    )
