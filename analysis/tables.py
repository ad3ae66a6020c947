"""Parquet, CSV and self-contained HTML tables.

Parquet files are for machines (the figures and findings read the statistics tables from them, with
their types: no NaN or empty-string round trip); CSV files keep full precision and leave undefined
values empty for people and spreadsheets. The HTML pages are what the Snakemake report shows (it only
links CSVs): inline CSS, a caption, "n/a" for undefined values and numbers rounded to four
significant digits. Tables: run status, summary, paired comparisons, the confirmatory table (also as LaTeX,
for the paper) and the sensitivity tables.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from analysis import RUN_FAILED, RUN_MISSING, RUN_OK, writing
from analysis.outputs import SENSITIVITY
from analysis.stats import CONFIDENCE, EXPLORATORY, HIGHER_IS_BETTER, LOWER_IS_BETTER, REFERENCE_BASELINE, metric_label
from analysis.stats.confirmatory import ABLATIONS, CONTRASTS, DIFFERENT, EQUIVALENT
from analysis.stats.sensitivity import FLIP_RATE, SELECTION_SPLIT
from analysis.stats.sensitivity import METRICS as SENSITIVITY_METRICS

NA = "n/a"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #1d2330; background: #fff; }
h1 { font-size: 1.35em; margin: 0 0 6px 0; }
h2 { font-size: 1.1em; margin: 22px 0 6px 0; }
p.caption { max-width: 70em; line-height: 1.45; color: #39404d; margin: 4px 0 14px 0; }
div.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 8px; }
caption { caption-side: bottom; text-align: left; color: #5a6270; font-size: 12px; padding-top: 6px; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e3e6eb; vertical-align: top; }
th { background: #f3f5f8; text-align: left; border-bottom: 2px solid #c9ced6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td small, td .sub { color: #6b7380; font-size: 11px; }
tr:hover td { background: #fafbfd; }
.na { color: #9aa1ab; }
.better { background: #e6f4ea; }
.worse { background: #fbe9e7; }
tr.significant td { font-weight: 600; }
tr.exploratory td { color: #6b7380; }
tr.exploratory td.endpoint { font-style: italic; }
tr.reference td { background: #f6f3ea; font-style: italic; border-top: 1px dashed #c9ced6; }
.status-ok { color: #1e7b34; font-weight: 600; }
.status-missing { color: #a15c00; font-weight: 600; }
.status-failed { color: #b3261e; font-weight: 600; }
"""


# --------------------------------------------------------------------------- formatting


def format_number(value: float, digits: int = 4) -> str:
    """Four significant digits, thousands separators for large values, ``n/a`` for NaN."""
    if value is None or math.isnan(value := float(value)):
        return NA
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    magnitude = abs(value)
    if magnitude >= 10**digits:
        return f"{value:,.0f}"
    if magnitude != 0 and magnitude < 1e-3:
        return f"{value:.2e}"
    text = f"{value:#.{digits}g}"  # '#' keeps trailing zeros so columns align
    return text.rstrip(".") if "e" not in text else text


def format_p(p: float) -> str:
    """p-values with three decimals, ``<0.001`` below that, ``n/a`` when not computed."""
    if p is None or math.isnan(p := float(p)):
        return NA
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def format_interval(low: float, high: float) -> str:
    """``[low, high]`` or ``n/a`` when the interval is undefined."""
    if math.isnan(low) or math.isnan(high):
        return NA
    return f"[{format_number(low)}, {format_number(high)}]"


# --------------------------------------------------------------------------- HTML


class Markup(str):
    """A string that is already safe HTML (built here from escaped parts)."""


def _cell(text: str, classes: str = "") -> str:
    """A table cell; ``text`` is escaped unless it is pre-built markup (a ``Markup`` str)."""
    content = text if isinstance(text, Markup) else html.escape(str(text))
    if text == NA:
        classes = f"{classes} na".strip()
    return f'<td class="{classes}">{content}</td>' if classes else f"<td>{content}</td>"


def html_table(rows: Sequence[dict], columns: Sequence[str], note: str = "") -> str:
    """Render rows of ``{column: text}`` (plus optional ``_class`` per cell / ``_row_class``).

    Cell classes are given as ``{"_class": {column: "num better"}}``.
    """
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        classes = row.get("_class", {})
        cells = "".join(_cell(row.get(c, NA), classes.get(c, "")) for c in columns)
        row_class = row.get("_row_class", "")
        body.append(f'<tr class="{row_class}">{cells}</tr>' if row_class else f"<tr>{cells}</tr>")
    caption = f"<caption>{html.escape(note)}</caption>" if note else ""
    return (
        f'<div class="scroll"><table>{caption}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def html_page(title: str, caption: str, sections: Sequence[tuple[str, str]]) -> str:
    """A standalone HTML document: title, caption paragraph, then ``(heading, table_html)``."""
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="caption">{html.escape(caption)}</p>']
    for heading, table in sections:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(table)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


def write_table(frame: pd.DataFrame, page: str, stem: str | Path, parquet: bool = True) -> list[Path]:
    """`frame` as ``stem.parquet`` (unless ``parquet`` is false) and ``stem.csv`` (full precision), and
    `page`, its HTML rendering, as ``stem.html``; errors name the file. Returns the paths written."""
    stem = Path(stem)
    paths = [stem.with_name(f"{stem.name}.{suffix}") for suffix in (("parquet",) if parquet else ()) + ("csv", "html")]
    for path in paths:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".parquet":
                frame.to_parquet(path, index=False)
            elif path.suffix == ".csv":
                frame.to_csv(path, index=False)
            else:
                path.write_text(page, encoding="utf-8")
    return paths


def value_cell(value: float, detail: str) -> Markup:
    """A number with a detail (its CI, n) in small print beneath it."""
    return Markup(f'{html.escape(format_number(value))}<br><span class="sub">{html.escape(detail)}</span>')


# --------------------------------------------------------------------------- summary


def summary_rows(summary: pd.DataFrame, split: str) -> tuple[list[dict], list[str]]:
    """One row per variant, one column per metric: mean, then CI and n in small print.

    Reference baselines (``kind`` = "reference baseline": the n-gram models) come last, labelled
    and shaded; they are single deterministic models, so they show the value alone and n/a for
    the metrics they do not have.
    """
    part = summary[summary["split"] == split]
    metrics = list(dict.fromkeys(part.loc[part["kind"] != REFERENCE_BASELINE, "metric"]))
    metrics += [m for m in dict.fromkeys(part["metric"]) if m not in metrics]
    columns = ["variant", *(metric_label(m) for m in metrics)]
    rows = []
    for (kind, variant), group in part.groupby(["kind", "variant"], sort=False):
        reference = kind == REFERENCE_BASELINE
        row = {
            "variant": f"{variant} (reference baseline)" if reference else variant,
            "_class": {},
            "_row_class": "reference" if reference else "",
        }
        for record in group.itertuples():
            label = metric_label(record.metric)
            if record.n == 0:
                row[label] = NA
                continue
            detail = (
                "n-gram model, no seeds"
                if reference
                else f"{format_interval(record.ci_low, record.ci_high)} · n={record.n}"
            )
            row[label] = value_cell(record.mean, detail)
            row["_class"][label] = "num"
        rows.append(row)
    rows.sort(key=lambda row: row["_row_class"] == "reference")  # stable: variants first, study order
    return rows, columns


def write_summary(summary: pd.DataFrame, stem: str | Path, caption: str = "") -> list[Path]:
    """Summary per variant (output of ``stats.summarize``, with each variant's router and options):
    long parquet and CSV, one HTML table per split."""
    level = int(round(CONFIDENCE * 100))
    caption = caption or (
        f"Mean over seeds with the {level}% Student t confidence interval "
        "and the number of seeds n. n/a: undefined (fewer than two seeds for "
        "an interval; a metric the variant does not have, e.g. load metrics "
        "of an unrouted variant). Token-expert MI / H(expert): the mutual information of token id and expert "
        "divided by the expert entropy; with k distinct experts per token a token id fixes at most its k "
        "experts, so it is at most 1 − ln k / H(expert) (≤ 1 − ln k / ln E: 0.67 for top-2 of 8), not 1; "
        "token-expert MI / its maximum divides by that attainable maximum instead. The co-activation, vocabulary "
        "specialisation, top-10 share, MI / its maximum and utilisation columns (what the experts learned) are "
        "exploratory, defined in the report's Specialisation category. "
        "Shaded rows at the bottom: reference baselines "
        "(unigram and interpolated bigram counted on the train split), not "
        "variants of the study; they have perplexities only. The CSV also has each variant's router and "
        "its resolved router options, one column per option."
    )
    sections = []
    for split in dict.fromkeys(summary["split"]):
        rows, columns = summary_rows(summary, split)
        sections.append((f"Split: {split}", html_table(rows, columns)))
    return write_table(summary, html_page("Summary per variant", caption, sections), stem)


# --------------------------------------------------------------------------- comparisons


def _delta_class(metric: str, low: float, high: float) -> str:
    """Shade a difference whose CI excludes 0 by whether b is better or worse than a."""
    if math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return "num"
    increased = low > 0
    if metric in LOWER_IS_BETTER:
        return "num worse" if increased else "num better"
    if metric in HIGHER_IS_BETTER:
        return "num better" if increased else "num worse"
    return "num"


def format_mdd(mdd: float, mean_a: float) -> str | Markup:
    """The minimum detectable difference, with its share of the reference mean in small print."""
    text = format_number(mdd)
    if text == NA or not math.isfinite(mean_a) or mean_a == 0:
        return text
    return Markup(f'{html.escape(text)}<br><span class="sub">{abs(mdd / mean_a):.0%} of a</span>')


def comparison_rows(comparisons: pd.DataFrame, alpha: float, power: float) -> tuple[list[dict], list[str]]:
    """Rows for the HTML view of ``stats.paired_comparisons`` output."""
    mdd_column = f"MDD ({power:.0%} power)"
    columns = [
        "comparison (b − a)",
        "metric",
        "endpoint",
        "label",
        "n",
        "mean a",
        "mean b",
        "Δ = b − a",
        "95% CI of Δ",
        mdd_column,
        "p t-test",
        "p t (Holm)",
        "p Wilcoxon",
        "p Wilcoxon (Holm)",
        "Hedges' g_z",
        "note",
    ]
    label_columns = ("comparison (b − a)", "metric", "label", "note")  # text; the numbers are right-aligned
    rows = []
    for r in comparisons.itertuples():
        significant = not math.isnan(r.p_ttest_holm) and r.p_ttest_holm < alpha
        delta_class = _delta_class(r.metric, r.ci_low, r.ci_high)
        own_classes = {"Δ = b − a": delta_class, "95% CI of Δ": delta_class, "endpoint": "endpoint"}
        row_classes = (["significant"] if significant else []) + (["exploratory"] if r.endpoint == EXPLORATORY else [])
        rows.append(
            {
                "comparison (b − a)": f"{r.variant_b} − {r.variant_a}",
                "metric": metric_label(r.metric),
                "endpoint": r.endpoint,
                "label": r.label,
                "n": str(r.n),
                "mean a": format_number(r.mean_a),
                "mean b": format_number(r.mean_b),
                "Δ = b − a": format_number(r.mean_diff),
                "95% CI of Δ": format_interval(r.ci_low, r.ci_high),
                mdd_column: format_mdd(r.mdd, r.mean_a),
                "p t-test": format_p(r.p_ttest),
                "p t (Holm)": format_p(r.p_ttest_holm),
                "p Wilcoxon": format_p(r.p_wilcoxon),
                "p Wilcoxon (Holm)": format_p(r.p_wilcoxon_holm),
                "Hedges' g_z": format_number(r.hedges_gz, digits=3),
                "note": r.note or "",
                "_row_class": " ".join(row_classes),
                "_class": {c: "num" for c in columns if c not in label_columns} | own_classes,
            }
        )
    return rows, columns


def write_comparisons(
    comparisons: pd.DataFrame, stem: str | Path, title: str, *, alpha: float, power: float, caption: str = ""
) -> list[Path]:
    """Paired comparisons (output of ``stats.paired_comparisons``) as parquet, CSV and HTML."""
    primary = (
        ", ".join(
            metric_label(m) for m in dict.fromkeys(comparisons.loc[comparisons["endpoint"] != EXPLORATORY, "metric"])
        )
        or "none"
    )
    caption = caption or (
        "Seed-paired differences Δ = b − a on the seeds both variants completed (n). "
        "CI: 95% Student t interval of the mean difference; p: paired t-test and Wilcoxon "
        f"signed-rank test (only where it can reach p ≤ {alpha:g}: n ≥ 6 at 0.05), each "
        "Holm-adjusted within its family, the comparisons of one metric on one split; "
        "Hedges' g_z: the mean of the paired differences over their sd, small-sample corrected; not a g of two "
        "independent groups (with equal sds, d_z = d / √(2(1 − r)), r the correlation of the pairs). Every "
        "row of this table is "
        "exploratory (column label): the confirmatory tests, the declared contrasts and the ablations on the "
        f"primary endpoints ({primary}) with Holm over contrasts and endpoints together and an equivalence "
        "test, are the confirmatory table's. Grey rows: metrics that are not primary endpoints. MDD: the "
        f"smallest |Δ| a two-sided paired t-test at α = {alpha:g} would detect with {power:.0%} power, from n "
        "and the observed sd of the differences; a non-significant Δ shows no equivalence, whatever its size "
        "(only a TOST verdict does). A load metric constant by construction (a router that balances load by "
        "construction, no spread over its seeds) is not tested; the note says so. Bold "
        f"rows: Holm-adjusted t-test p < {alpha:g}. Green / red: the CI excludes 0 and b is "
        "better / worse than a. n/a: not computable, the note says why."
    )
    rows, columns = comparison_rows(comparisons, alpha, power)
    note = f"Split: {', '.join(dict.fromkeys(comparisons['split']))}" if len(comparisons) else ""
    page = html_page(title, caption, [("", html_table(rows, columns, note))])
    return write_table(comparisons, page, stem)


# --------------------------------------------------------------------------- confirmatory

FAMILY_TITLES = {
    CONTRASTS: "Declared contrasts × primary endpoints",
    ABLATIONS: "Ablations × primary endpoints (each ablation − its base)",
}


def _verdict_class(verdict: str) -> str:
    return "worse" if verdict == DIFFERENT else "better" if verdict.startswith(EQUIVALENT) else ""


def confirmatory_rows(table: pd.DataFrame, alpha: float, power: float) -> tuple[list[dict], list[str]]:
    """Rows for the HTML view of ``stats.confirmatory.confirmatory_comparisons`` output."""
    columns = [
        "contrast (a − b)",
        "endpoint",
        "n",
        "mean a",
        "mean b",
        "Δ = a − b",
        "95% CI of Δ",
        "p t-test",
        "p t (Holm)",
        "margin ±m",
        "p TOST (Holm)",
        "verdict",
        f"MDD ({power:.0%} power, α)",
        "MDD (α / m)",
        "Hedges' g_z",
        "note",
    ]
    text = ("contrast (a − b)", "endpoint", "verdict", "note")
    rows = []
    for r in table.itertuples():
        margin = format_number(r.margin)
        if r.margin_kind == "relative" and margin != NA:
            margin = Markup(f'{html.escape(margin)}<br><span class="sub">{r.margin_value:.1%} of mean b</span>')
        rows.append(
            {
                "contrast (a − b)": r.contrast,
                "endpoint": metric_label(r.metric),
                "n": str(r.n),
                "mean a": format_number(r.mean_a),
                "mean b": format_number(r.mean_b),
                "Δ = a − b": format_number(r.mean_diff),
                "95% CI of Δ": format_interval(r.ci_low, r.ci_high),
                "p t-test": format_p(r.p_ttest),
                "p t (Holm)": format_p(r.p_ttest_holm),
                "margin ±m": margin,
                "p TOST (Holm)": format_p(r.p_tost_holm),
                "verdict": r.verdict,
                f"MDD ({power:.0%} power, α)": format_mdd(r.mdd, r.mean_b),
                "MDD (α / m)": format_mdd(r.mdd_family, r.mean_b),
                "Hedges' g_z": format_number(r.hedges_gz, digits=3),
                "note": r.note or "",
                "_row_class": "significant" if r.verdict == DIFFERENT else "",
                "_class": {c: "num" for c in columns if c not in text} | {"verdict": _verdict_class(r.verdict)},
            }
        )
    return rows, columns


def _latex_text(text: str) -> str:
    """Plain text for a LaTeX cell: the characters LaTeX treats specially escaped, − and ± as math."""
    for char in "&%$#_{}":  # a name cannot hold a backslash (gtmoe.checks.NAME)
        text = text.replace(char, f"\\{char}")
    return text.replace("−", "$-$").replace("±", "$\\pm$")


def confirmatory_latex(table: pd.DataFrame, power: float) -> str:
    """The confirmatory table as a LaTeX tabular (``DataFrame.to_latex``), booktabs rules, for the paper."""
    mdd = f"MDD ({power:.0%} power)".replace("%", "\\%")
    cells = pd.DataFrame(
        {
            "Family": table["family"].astype(str),
            "Contrast": table["contrast"],
            "Endpoint": [metric_label(m) for m in table["metric"]],
            "$n$": table["n"].astype(str),
            "$\\Delta$": [format_number(v) for v in table["mean_diff"]],
            "95\\% CI": [format_interval(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])],
            "$p_\\mathrm{Holm}$": [format_p(p) for p in table["p_ttest_holm"]],
            "$\\pm m$": [format_number(m) for m in table["margin"]],
            "$p_\\mathrm{TOST,Holm}$": [format_p(p) for p in table["p_tost_holm"]],
            "Verdict": table["verdict"],
            mdd: [format_number(v) for v in table["mdd"]],
        }
    )
    for column in ("Family", "Contrast", "Endpoint", "95\\% CI", "Verdict", mdd):
        cells[column] = cells[column].map(_latex_text)
    for column in cells.columns:
        cells[column] = cells[column].replace({NA: "--", "<0.001": "$<$0.001"})
    return cells.to_latex(index=False, escape=False, column_format="lll" + "r" * 6 + "lr")


def write_confirmatory(
    table: pd.DataFrame, stem: str | Path, *, alpha: float, power: float, empty_note: str = ""
) -> list[Path]:
    """The confirmatory table (``stats.confirmatory.confirmatory_comparisons``) as parquet, CSV, HTML (one
    section per family) and ``stem.tex`` (LaTeX). ``empty_note`` says why a table has no rows. Returns the paths
    written."""
    stem = Path(stem)
    margins = "; ".join(
        f"{metric_label(m)} ±{r.margin_value:g}" + (" × mean b" if r.margin_kind == "relative" else "")
        for m, r in table.drop_duplicates("metric").set_index("metric").iterrows()
    )
    caption = (
        "The study's confirmatory tests, declared in config.yaml (statistics.contrasts, statistics.primary, "
        "statistics.margins; the ablations from ablation) before any run. Δ = a − b per seed, on the seeds "
        "both variants completed (n); 95% Student t CI of its mean; p: two-sided paired t-test, "
        "Holm-adjusted over the whole family (every contrast × every primary endpoint; the ablations are a "
        "family of their own). TOST: two one-sided paired t-tests against ±m (Schuirmann), p the larger, "
        f"Holm-adjusted over the same family. Margins: {margins or 'none'}. Verdict: different (Holm p < "
        f"{alpha:g}); else equivalent within ±m (Holm TOST p < {alpha:g}); else inconclusive: the data "
        "show neither. Equivalence is claimed only by that verdict. MDD: the smallest |Δ| a paired t-test "
        f"detects with {power:.0%} power at α = {alpha:g} and at α / m, the level of Holm's first step (m "
        "tests in the family), from n and the sd of the differences; in small print as a share of mean b. "
        "Hedges' g_z: effect size of the paired differences. A load metric constant by construction is not "
        "tested. Every other comparison in the report is exploratory."
    )
    sections = [
        (FAMILY_TITLES.get(family, family), html_table(*confirmatory_rows(part, alpha, power)))
        for family, part in table.groupby("family", sort=False)
    ] or [
        (
            "",
            f'<p class="caption">{html.escape(empty_note or "No confirmatory contrast declared and no ablation.")}</p>',
        )
    ]
    paths = write_table(table, html_page("Confirmatory contrasts", caption, sections), stem)
    tex = stem.with_name(f"{stem.name}.tex")
    with writing(tex):
        tex.write_text(confirmatory_latex(table, power), encoding="utf-8")
    return [*paths, tex]


# --------------------------------------------------------------------------- run status


def write_status(status: pd.DataFrame, stem: str | Path, caption: str = "") -> list[Path]:
    """The runs table (output of ``collect.collect_runs``) as parquet, CSV and HTML."""
    counts = status["status"].value_counts()
    caption = caption or (
        f"Every expected (variant, seed) run: {counts.get(RUN_OK, 0)} ok, "
        f"{counts.get(RUN_MISSING, 0)} missing, {counts.get(RUN_FAILED, 0)} failed. "
        "Only ok runs enter the statistics; the detail column says what is missing or why "
        "a run failed (evaluation status not ok, non-finite perplexity or load metric, unreadable file)."
    )
    columns = ["variant", "seed", "status", "router", "detail", "run_dir"]
    rows = [
        {
            "variant": r.variant,
            "seed": str(r.seed),
            "status": r.status,
            "router": r.router if isinstance(r.router, str) else NA,
            "detail": r.detail or "",
            "run_dir": r.run_dir if isinstance(r.run_dir, str) else NA,
            "_class": {"status": f"status-{r.status}", "seed": "num"},
        }
        for r in status.itertuples()
    ]
    page = html_page("Run status", caption, [("", html_table(rows, columns))])
    return write_table(status, page, stem)


# --------------------------------------------------------------------------- sensitivity


def _interval_cell(mean: float, low: float, high: float, n: int, scale: float = 1.0) -> str | Markup:
    """A mean (or mean difference) with its CI and n beneath; n/a without a value."""
    if n == 0 or not math.isfinite(mean):
        return NA
    return value_cell(scale * mean, f"{format_interval(scale * low, scale * high)} · n={n}")


def _dose_rows(part: pd.DataFrame) -> tuple[list[dict], list[str]]:
    """One HTML row per point (mean [CI] · n per metric, Δ PPL), then the reference's row."""
    labels = {m: metric_label(m) for m in ("gini", "maxvio_global", "ppl")} | {FLIP_RATE: "flip rate (%)"}
    delta = "Δ PPL vs reference"
    columns = [
        "option",
        *(["other options"] if part["fixed"].ne("").any() else []),
        "value",
        "variant",
        *(labels[m] for m in SENSITIVITY_METRICS[:3]),
        delta,
        labels[FLIP_RATE],
    ]
    rows = []
    for (option, fixed, value, variant), point in part.groupby(["option", "fixed", "value", "variant"], sort=False):
        by_metric = point.set_index("metric")
        row = {
            "option": option,
            "other options": fixed,
            "value": f"{value:g}",
            "variant": variant,
            "_class": {c: "num" for c in [*labels.values(), delta, "value"]},
        }
        for metric in SENSITIVITY_METRICS:
            if metric not in by_metric.index:
                row[labels[metric]] = NA
                continue
            r = by_metric.loc[metric]
            row[labels[metric]] = _interval_cell(
                r["mean"], r["ci_low"], r["ci_high"], int(r["n"]), scale=100 if metric == FLIP_RATE else 1
            )
        ppl = by_metric.loc["ppl"]
        row[delta] = _interval_cell(ppl["delta"], ppl["delta_ci_low"], ppl["delta_ci_high"], int(ppl["n_paired"]))
        rows.append(row)
    reference = part.drop_duplicates("metric").set_index("metric")
    ref_row = {
        "option": "",
        "other options": "",
        "value": "",
        "variant": f"{reference['reference'].iloc[0]} (reference)",
        "_row_class": "reference",
        "_class": {labels[m]: "num" for m in SENSITIVITY_METRICS[:3]},
    }
    for metric in SENSITIVITY_METRICS[:3]:
        r = reference.loc[metric]
        ref_row[labels[metric]] = _interval_cell(r["ref_mean"], r["ref_ci_low"], r["ref_ci_high"], int(r["ref_n"]))
    rows.append(ref_row)
    return rows, columns


def _best_rows(best: pd.DataFrame) -> tuple[list[dict], list[str]]:
    columns = [
        "sweep",
        "option",
        *(["other options"] if best["fixed"].ne("").any() else []),
        "chosen value",
        "variant",
        "Gini",
        "MaxVio global",
        "PPL",
        "Δ PPL vs reference",
        "values tried",
        "values eligible",
        "note",
    ]
    text_columns = ("sweep", "option", "other options", "variant", "note")  # every other column is right-aligned
    rows = []
    for r in best.itertuples():
        chosen = math.isfinite(r.value)
        rows.append(
            {
                "sweep": r.sweep,
                "option": r.option,
                "other options": r.fixed,
                "chosen value": (f"{r.value:g}" if r.within_bounds else f"{r.value:g} (outside the bounds)")
                if chosen
                else NA,
                "variant": r.variant or NA,
                "Gini": _interval_cell(r.gini_mean, r.gini_ci_low, r.gini_ci_high, int(r.n)),
                "MaxVio global": format_number(r.maxvio_global_mean),
                "PPL": format_number(r.ppl_mean),
                "Δ PPL vs reference": _interval_cell(
                    r.delta_ppl, r.delta_ppl_ci_low, r.delta_ppl_ci_high, int(r.n_paired)
                ),
                "values tried": str(r.n_values_tried),
                "values eligible": str(r.n_values_eligible),
                "note": r.note,
                "_class": {c: "num" for c in columns if c not in text_columns},
            }
        )
    return rows, columns


def write_sensitivity(dose: pd.DataFrame, best: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """The dose-response table (``stats.sensitivity.dose_response``) and the best value per curve
    (``best_values``), each as parquet, CSV and HTML: ``sensitivity.*`` and ``sensitivity_best.*``."""
    out = Path(out_dir)
    level = int(round(CONFIDENCE * 100))
    reference = str(dose["reference"].iloc[0]) if len(dose) else "the reference"  # html_page escapes
    dose_caption = (
        f"Dose-response of each sweep on the {', '.join(dict.fromkeys(dose['split'])) or 'test'} split. One row "
        "per point of a curve: the swept option, the values of the other options of a full-grid sweep "
        "(other options), the option's value and the variant that ran there (the base variant is the point "
        "at its own value). Gini, MaxVio global, PPL and flip rate: mean over the seeds with a finite value, "
        f"with its {level}% Student t confidence interval mean ± t(0.975, n − 1) · s / √n and the number of "
        "seeds n. Flip rate: the share of tokens whose top-k expert set changes when the option's selection "
        "term is removed from the score (n/a when the option scales no term). Δ PPL vs reference: mean "
        f"seed-paired difference point − {reference} over the seeds both completed, with its t CI; ≤ 0 means "
        f"no worse than {reference}. Shaded last row: {reference}'s mean and CI, the band each curve is read "
        "against. n/a: undefined (fewer than two seeds for an interval, no value). The CSV has one row per "
        "(point, metric) with the reference's statistics and the paired difference for every metric."
    )
    sections = [
        (f"Sweep: {sweep} ({part['router'].iloc[0]} around {part['base'].iloc[0]})", html_table(*_dose_rows(part)))
        for sweep, part in dose.groupby("sweep", sort=False)
    ]
    rule = str(best["rule"].iloc[0]) if len(best) else "the declared rule"
    best_caption = (
        "Per dose-response curve (sweep, option and, in a full grid, the other options' values): the value the "
        f"rule declared in config.yaml (tuning.select) chooses on the {SELECTION_SPLIT} split, from the means "
        f"over seeds: {rule}; ties go to the smaller value. Values eligible: those within the bounds; with none, "
        "the value with the lowest mean of the first bounded metric, marked outside the bounds. Gini: mean with "
        f"its {level}% t CI and n seeds; MaxVio global and PPL: means over seeds; Δ PPL: mean paired "
        f"difference chosen − {reference} with its t CI over n paired seeds. The test split plays no part: it "
        "confirms the chosen values in a confirmation study on other seeds."
    )
    best_rows, best_columns = _best_rows(best)
    pages = {
        "sensitivity": (dose, html_page("Sensitivity: dose-response of the router options", dose_caption, sections)),
        "sensitivity_best": (
            best,
            html_page(
                "Sensitivity: the chosen value per option", best_caption, [("", html_table(best_rows, best_columns))]
            ),
        ),
    }
    return [path for name in SENSITIVITY for path in write_table(*pages[name], out / name)]


# --------------------------------------------------------------------------- tuning study


def write_tuning(
    frontier: pd.DataFrame, comparison: pd.DataFrame, budget: pd.DataFrame, out_dir: str | Path, rule: str
) -> list[Path]:
    """A tuning study's tables, each as parquet, CSV and HTML: the frontier points (``frontier.*``), the paired
    frontier comparisons (``frontier_comparison.*``, also LaTeX) and what every router got (``tuning_budget.*``)."""
    out = Path(out_dir)
    level = int(round(CONFIDENCE * 100))
    split = str(frontier["split"].iloc[0]) if len(frontier) else SELECTION_SPLIT
    frontier_caption = (
        f"Each tuned router at each value of its balance knob, on the {split} split: mean over the tuning seeds "
        f"with its {level}% Student t CI and n seeds, for perplexity and each balance metric. The frontier "
        "figure plots PPL against each balance metric from these rows."
    )
    frontier_rows = [
        {
            "router (knob)": f"{r.base} ({r.option})",
            "value": f"{r.value:g}",
            "variant": r.variant,
            "metric": metric_label(r.metric),
            "mean [CI]": _interval_cell(r.mean, r.ci_low, r.ci_high, int(r.n)),
            "_class": {"value": "num", "mean [CI]": "num"},
        }
        for r in frontier.itertuples()
    ]
    comparison_caption = (
        "The study's test of 'better balance at equal perplexity', on the tuning runs: for each declared contrast "
        "[a, b] whose routers were both tuned, and each tuning seed, the Pareto front of (balance, PPL) over each "
        "router's knob values; PPL read off each front by linear interpolation at evenly spaced balance levels "
        "over the range both fronts cover; the seed's gap is the mean of PPL a − PPL b over those levels "
        "(negative: a reaches lower perplexity at matched balance). Mean gap over seeds with its "
        f"{level}% t CI (n seeds). Exploratory: the values chosen here are confirmed on fresh seeds and the test "
        "split by a confirmation study; with two tuning seeds the interval is wide."
    )
    comparison_rows = [
        {
            "contrast": f"{r.variant_a} − {r.variant_b}",
            "balance": metric_label(r.balance_metric),
            "matched range": f"{format_number(r.overlap_low)} – {format_number(r.overlap_high)}",
            "PPL gap [CI]": _interval_cell(r.gap_mean, r.gap_ci_low, r.gap_ci_high, int(r.n)),
            "note": r.note,
            "_class": {"PPL gap [CI]": "num", "matched range": "num"},
        }
        for r in comparison.itertuples()
    ]
    budget_caption = (
        "What every router got: the values of its balance knob (gtmoe.tuning: the same number for every tuned "
        "knob, checked when the config is read) times the tuning seeds, the runs that finished ok and the "
        f"training steps. A config sweep gives its base extra points and is listed beside the knobs. Selection "
        f"rule (config.yaml tuning.select), on the {split} split: {rule}."
    )
    budget_columns = ["router (knob)", "kind", "values", "seeds", "runs ok / planned", "training steps"]
    budget_rows = [
        {
            "router (knob)": f"{r.variant}: {r.router} ({r.option})",
            "kind": r.kind,
            "values": r.values,
            "seeds": r.seeds,
            "runs ok / planned": f"{r.runs_ok} / {r.runs_planned}",
            "training steps": f"{r.training_steps:,}",
            "_class": {"runs ok / planned": "num", "training steps": "num"},
        }
        for r in budget.itertuples()
    ]
    pages = {
        "frontier": (
            frontier,
            html_page(
                "Frontiers: each router across its knob",
                frontier_caption,
                [("", html_table(frontier_rows, ["router (knob)", "value", "variant", "metric", "mean [CI]"]))],
            ),
        ),
        "frontier_comparison": (
            comparison,
            html_page(
                "Frontier comparison, paired by seed",
                comparison_caption,
                [("", html_table(comparison_rows, ["contrast", "balance", "matched range", "PPL gap [CI]", "note"]))],
            ),
        ),
        "tuning_budget": (
            budget,
            html_page("Tuning budget per router", budget_caption, [("", html_table(budget_rows, budget_columns))]),
        ),
    }
    paths = [path for name, (frame, page) in pages.items() for path in write_table(frame, page, out / name)]
    tex = out / "frontier_comparison.tex"
    cells = pd.DataFrame(
        {
            "Contrast": [f"{r.variant_a} − {r.variant_b}" for r in comparison.itertuples()],
            "Balance": [metric_label(m) for m in comparison["balance_metric"]],
            "$n$": comparison["n"].astype(str),
            "PPL gap": [format_number(v) for v in comparison["gap_mean"]],
            "95\\% CI": [
                format_interval(lo, hi) for lo, hi in zip(comparison["gap_ci_low"], comparison["gap_ci_high"])
            ],
        }
    )
    for column in ("Contrast", "Balance"):
        cells[column] = cells[column].map(_latex_text)
    with writing(tex):
        tex.write_text(cells.replace({NA: "--"}).to_latex(index=False, escape=False, column_format="llrrl"), "utf-8")
    return [*paths, tex]


# --------------------------------------------------------------------------- specialisation


def write_specialisation(table: pd.DataFrame, stem: str | Path, split: str) -> list[Path]:
    """The specialisation metrics per variant (``stats.specialisation.specialisation_summary``: the summary's rows,
    labelled) as parquet, CSV and HTML: one row per variant, one column per metric, mean with its CI and n."""
    level = int(round(CONFIDENCE * 100))
    labels = dict.fromkeys(metric_label(m) for m in table["metric"])
    primary = sorted({metric_label(r.metric) for r in table.itertuples() if r.label != EXPLORATORY})
    caption = (
        f"What the experts learned, per variant on the {split} split: mean over seeds with its {level}% Student t CI "
        "and the number of seeds n (each run's value is the mean over its MoE layers). "
        + (
            f"Declared primary endpoints among them: {', '.join(primary)}; every other column is exploratory. "
            if primary
            else "Every column is exploratory: no primary endpoint unless declared in statistics.primary. "
        )
        + "n/a: no value (an unrouted variant, or runs evaluated before these metrics existed). The definitions are "
        "in this table's caption in the report and in docs/statistics.md."
    )
    rows = []
    for variant, part in table[table["split"] == split].groupby(table["variant"].astype(str), sort=False):
        row = {"variant": variant, "_class": {}}
        for record in part.itertuples():
            label = metric_label(record.metric)
            row[label] = (
                value_cell(record.mean, f"{format_interval(record.ci_low, record.ci_high)} · n={record.n}")
                if record.n
                else NA
            )
            row["_class"][label] = "num"
        rows.append(row)
    note = f"label: {', '.join(dict.fromkeys(table['label']))}" if len(table) else ""
    page = html_page("Specialisation per variant", caption, [("", html_table(rows, ["variant", *labels], note))])
    return write_table(table, page, stem)


def write_vocabulary(
    table: pd.DataFrame,
    stem: str | Path,
    top: int,
    split: str,
    tokenizer: str | None,
    routers: Mapping[str, str] | None = None,
) -> list[Path]:
    """Each expert's top token ids as text (``stats.specialisation.vocabulary_table``) as parquet, CSV and HTML: one
    section per variant (its lowest seed, last MoE layer; ``routers``: variant -> its router's label, from the study
    record), one row per expert, busiest first."""
    text = f"decoded with the study's tokenizer ({tokenizer})" if tokenizer else "as token ids (#id: no tokenizer)"
    caption = (
        f"Which token ids each expert takes, on the {split} split, for one run per variant (its lowest seed) and its "
        f"last MoE layer. Load share: the expert's share of the layer's assignments. Top-{top} share: the share of "
        f"the expert's tokens whose id is one of its {top} most routed ids (1: the expert serves those ids only). "
        f"Top tokens: those ids, most routed first, {text}, each with how often it was routed to the expert; "
        "␣ is a space, ↵ a newline. Exploratory, descriptive: one seed, one layer."
    )
    sections = []
    for variant, part in table.groupby(table["variant"].astype(str), sort=False):
        rows = [
            {
                "expert": str(r.expert),
                "load share": format_number(r.load_share),
                f"top-{top} share": format_number(r.top_token_share),
                "top tokens (count)": r.tokens or NA,
                "_class": {"expert": "num", "load share": "num", f"top-{top} share": "num"},
            }
            for r in part.itertuples()
        ]
        first = part.iloc[0]
        router = f" ({routers[variant]})" if routers and variant in routers else ""
        heading = f"{variant}{router}: seed {first['seed']}, layer {first['layer']}"
        sections.append((heading, html_table(rows, ["expert", "load share", f"top-{top} share", "top tokens (count)"])))
    if not sections:
        sections = [("", '<p class="caption">No routed run with top token ids (dense, or evaluated before them).</p>')]
    return write_table(table, html_page("Vocabulary per expert", caption, sections), stem)


def write_agreement(summary: pd.DataFrame, pairs: pd.DataFrame, stem: str | Path) -> list[Path]:
    """Agreement across seeds per variant (``stats.stability.agreement_summary``) as parquet, CSV and HTML: one row
    per variant with its seeds and pairs, the mean matched agreement with the range over pairs, and the chance value
    of shuffled tokens. ``pairs`` (``agreement_pairs``) gives the probe's size in the caption."""
    tokens = int(pairs["tokens"].max()) if len(pairs) else 0
    caption = (
        "How much two seeds of a variant route the same validation tokens to the same experts, up to a relabelling "
        f"of the experts (the routing probe: {tokens} real tokens, the same for every run; the Hungarian method on "
        "the co-assignment matrix of every pair of seeds and MoE layer). Agreement: the share of the two routings' "
        "assignments that coincide after matching (1: the same routing; for top-k, the mean share of a token's k "
        "experts the seeds share). Chance: the same after one seed's tokens are shuffled, which keeps the loads; "
        "agreement near chance means the routing is a property of the seed, not of the data. Mean over pairs and "
        "layers, range over pairs; pairs share seeds, so there is no confidence interval. Exploratory."
    )
    rows = [
        {
            "variant": r.variant,
            "seeds": str(r.n_seeds),
            "pairs": str(r.n_pairs),
            "layers": str(r.n_layers),
            "agreement": value_cell(
                r.agreement_mean, f"range {format_number(r.agreement_min)}–{format_number(r.agreement_max)}"
            ),
            "chance": format_number(r.chance_mean),
            "_class": {name: "num" for name in ("seeds", "pairs", "layers", "agreement", "chance")},
        }
        for r in summary.itertuples()
    ]
    section = (
        html_table(rows, ["variant", "seeds", "pairs", "layers", "agreement", "chance"])
        if rows
        else '<p class="caption">No variant has two seeds with a probe routing (eval.probe_blocks = 0, one seed, '
        "no routing, or runs evaluated before the probe existed).</p>"
    )
    return write_table(summary, html_page("Agreement across seeds", caption, [("", section)]), stem)
