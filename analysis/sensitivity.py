"""Sensitivity of the routers to their options (issue 14): dose-response curves of the sweeps.

A sweep (config ``sweeps``, expanded by ``gtmoe.sweeps``) runs a base variant at several values
of its router options; each point is an ordinary variant. The workflow hands this module the
sweep *design*, one record per (sweep, option, value) point::

    {"sweep": "rdesi_terms", "base": "rdesi", "router": "rdesi", "option": "beta", "value": 0.3,
     "variant": "rdesi-beta0.3", "term": "reputation", "fixed": ""}

``term`` is the selection term the option scales (its flip rate is the tidy metric
``flip_rate_<term>``; null when the option scales none) and ``fixed`` labels the values of the
other options in a full-grid sweep ("" for one-at-a-time sweeps): one curve per ``fixed``.

For every point and metric the dose-response table has the mean over seeds with its Student t
CI, the reference variant's mean and CI (the band the curve is read against) and the
seed-paired difference point − reference. ``best_values`` picks, per curve, the value with
the lowest Gini among those whose perplexity is no worse than the reference's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written by batch jobs

import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.collect import MODEL_LEVEL, variant_order  # noqa: E402
from analysis.figures import finish_figure, message_figure  # noqa: E402
from analysis.stats import CONFIDENCE, describe, metric_label, paired_test, per_seed  # noqa: E402
from analysis.tables import NA, Markup, format_interval, format_number, html_page, html_table, value_cell, write_table  # noqa: E402

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
    "n_values_tried",
    "n_values_eligible",
    "note",
]
TABLE_FILES = ("sensitivity", "sensitivity_best")  # each as .csv and .html


def figure_name(sweep: str) -> str:
    """File name of a sweep's figure."""
    return f"sensitivity_{sweep}.png"


# --------------------------------------------------------------------------- design


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_design(design: str | Sequence[dict]) -> pd.DataFrame:
    """The sweep design (JSON text or a list of records) as a DataFrame of ``DESIGN_COLUMNS``.

    Raises ValueError naming the first problem: not a JSON list, a record that is not an
    object, a missing key, a non-numeric value, or two points of one curve at the same value.
    """
    if isinstance(design, str):
        try:
            design = json.loads(design)
        except json.JSONDecodeError as error:
            raise ValueError(f"sweep design is not valid JSON ({error})") from None
    if not isinstance(design, list):
        raise ValueError(f"sweep design must be a JSON list of records, got {type(design).__name__}")
    rows = []
    for i, record in enumerate(design):
        where = f"sweep design record {i}"
        if not isinstance(record, dict):
            raise ValueError(f"{where} must be an object, got {record!r}")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(map(repr, missing))} (has {sorted(record)})")
        for key in ("sweep", "base", "router", "option", "variant"):
            if not isinstance(record[key], str) or not record[key]:
                raise ValueError(f"{where}: {key} must be a non-empty string, got {record[key]!r}")
        where = f"{where} ({record['sweep']}, {record['option']})"
        if not _is_number(record["value"]):
            # Doses are plotted on a numeric (symlog) axis: a string or boolean option has none.
            raise ValueError(f"{where}: value must be a finite number, got {record['value']!r}")
        term, fixed = record.get("term"), record.get("fixed")
        if term is not None and (not isinstance(term, str) or not term):
            raise ValueError(f"{where}: term must be a selection term name or null, got {term!r}")
        if fixed is not None and not isinstance(fixed, str):
            raise ValueError(f"{where}: fixed must be a string label, got {fixed!r}")
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
        raise ValueError(
            f"sweep design has several points at {first['option']}={first['value']:g} of sweep "
            f"{first['sweep']!r}"
            + (f" ({first['fixed']})" if first["fixed"] else "")
            + f": variants {sorted(clash['variant'][clash['value'] == first['value']])}"
        )
    return frame


def _design_order(design: pd.DataFrame) -> pd.DataFrame:
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
    design: pd.DataFrame | str | Sequence[dict],
    split: str = "test",
    reference: str = "topk",
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """One row per (sweep, option, fixed, value, variant, metric): n seeds, mean, std, t CI, the
    reference's n, mean and t CI on that metric, and the seed-paired difference point − reference
    (mean and t CI over the seeds both have, ``n_paired``).

    Metrics are ``METRICS``; ``flip_rate`` is the tidy metric ``flip_rate_<term>`` of the point's
    term, left out for an option that scales no term. The flip rate has no reference (a router
    without the term has none), so its reference and difference columns are NaN.
    """
    design = design if isinstance(design, pd.DataFrame) else read_design(design)
    variants = variant_order(tidy)
    if reference not in variants:
        raise ValueError(f"reference variant {reference!r} not among the table's variants {variants}")
    unknown = sorted(set(design["variant"]) - set(variants))
    if unknown:
        raise ValueError(f"sweep design names variants absent from the table: {unknown}")
    tidy = tidy[(tidy["layer"] == MODEL_LEVEL) & (tidy["split"] == split)]  # once, not per lookup
    reference_values = {m: per_seed(tidy, reference, m, split) for m in METRICS if m != FLIP_RATE}
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
    for point in _design_order(design).to_dict("records"):
        for metric in METRICS:
            if metric == FLIP_RATE and pd.isna(point["term"]):  # None, or NaN once in a frame
                continue
            source = f"{FLIP_RATE}_{point['term']}" if metric == FLIP_RATE else metric
            values = per_seed(tidy, point["variant"], source, split)
            row = dict(
                point, split=split, metric=metric, **describe(values, confidence), reference=reference, **no_reference
            )
            if metric in reference_values:
                ref = reference_stats[metric]
                paired = paired_test(reference_values[metric], values, confidence)  # b − a = point − reference
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


def _points(dose: pd.DataFrame) -> pd.DataFrame:
    """One row per point with the columns the selection needs, in the dose table's order."""
    by_metric = {m: dose[dose["metric"] == m].set_index(POINT) for m in ("ppl", "gini", "maxvio_global")}
    ppl, gini, maxvio = by_metric["ppl"], by_metric["gini"], by_metric["maxvio_global"]
    return pd.DataFrame(
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
    ).reset_index()


def best_values(dose: pd.DataFrame) -> pd.DataFrame:
    """Per curve (sweep, option, fixed): the value with the lowest mean Gini among the *eligible*
    values, those whose seed-paired mean PPL difference to the reference is ≤ 0 (no worse).

    Ties in Gini go to the smaller value (the weaker intervention). A curve with no eligible
    value (or none with a Gini) keeps a row with value NaN and a note saying why.
    """
    rows = []
    for (sweep, option, fixed), curve in _points(dose).groupby(CURVE, sort=False):
        reference = curve["reference"].iloc[0]
        eligible = curve[curve["delta_ppl"] <= 0]  # NaN (no paired seeds) is not eligible
        candidates = eligible[np.isfinite(eligible["gini_mean"])].sort_values(["gini_mean", "value"], kind="stable")
        counts = dict(n_values_tried=len(curve), n_values_eligible=len(eligible))
        unpaired = int(curve["delta_ppl"].isna().sum())
        notes = [f"{unpaired} value(s) without seeds paired with {reference}"] if unpaired else []
        if candidates.empty:
            notes.insert(
                0,
                f"no value keeps PPL at or below {reference}'s"
                if eligible.empty
                else "no value that keeps PPL has a Gini",
            )
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
                    **counts,
                    note="; ".join(notes),
                )
            )
        else:
            best = candidates.iloc[0].to_dict()
            rows.append({**best, **counts, "note": "; ".join(notes)})
    return pd.DataFrame(rows, columns=BEST_COLUMNS)


# --------------------------------------------------------------------------- figure

PANEL_TITLES = {"gini": "Gini", "maxvio_global": "MaxVio global", "ppl": "PPL", FLIP_RATE: "flip rate"}


def _x_axis(ax: plt.Axes, option: str, values: np.ndarray) -> None:
    """Symlog x through the tried values: linear within the smallest non-zero |value| of the
    option, so the ablation at 0 sits on the axis next to the logarithmic decades."""
    nonzero = np.abs(values[values != 0])
    if nonzero.size:
        ax.set_xscale("symlog", linthresh=float(nonzero.min()))
    # A tick at every value tried; labels only where they do not run into the previous one.
    scaled = ax.xaxis.get_transform().transform(values)
    gap, last, labels = 0.07 * (np.ptp(scaled) or 1.0), -np.inf, []
    for value, x in zip(values, scaled):
        labels.append(f"{value:.3g}" if x - last >= gap else "")
        last = x if labels[-1] else last
    ax.set_xticks(values, labels, fontsize=8, rotation=45)
    ax.set_xlabel(option)


def _reference_band(ax: plt.Axes, rows: pd.DataFrame, reference: str) -> None:
    """The reference's mean as a dashed line over the grey band of its t CI."""
    ref = rows.iloc[0]
    if not math.isfinite(ref["ref_mean"]):
        return
    if math.isfinite(ref["ref_ci_low"]):
        ax.axhspan(
            ref["ref_ci_low"],
            ref["ref_ci_high"],
            color="0.5",
            alpha=0.18,
            lw=0,
            zorder=0,
            label=f"{reference} {int(CONFIDENCE * 100)}% CI",
        )
    ax.axhline(
        ref["ref_mean"], color="0.25", ls="--", lw=1.2, zorder=1, label=f"{reference} mean (n={int(ref['ref_n'])})"
    )


def _curves(ax: plt.Axes, rows: pd.DataFrame, colours: dict[str, tuple], scale: float = 1.0) -> None:
    """Mean with markers and the shaded t CI band across seeds, one line per ``fixed`` group."""
    for fixed, curve in rows.groupby("fixed", sort=False):
        n = curve["n"]
        seeds = f"n={n.min()}" if n.min() == n.max() else f"n={n.min()}–{n.max()}"
        ax.plot(
            curve["value"],
            scale * curve["mean"],
            marker="o",
            ms=5,
            lw=1.6,
            color=colours[fixed],
            label=f"{fixed} ({seeds})" if fixed else f"mean ({seeds})",
            zorder=3,
        )
        ax.fill_between(
            curve["value"],
            scale * curve["ci_low"],
            scale * curve["ci_high"],
            color=colours[fixed],
            alpha=0.2,
            lw=0,
            zorder=2,
        )


def plot_sensitivity(dose: pd.DataFrame, path: str | Path, sweep: str, reference: str = "topk") -> Path:
    """Dose-response figure of one sweep: a row per swept option, columns Gini, MaxVio global,
    PPL and the flip rate of the option's term against the option's value (symlog x). Lines:
    mean over seeds with a 95% t band across seeds, one per ``fixed`` group (full grids);
    dashed line and grey band: the reference's mean and t CI (not on the flip-rate panel)."""
    title = f"Sensitivity: {sweep}"
    rows = dose[dose["sweep"] == sweep]
    if rows.empty:
        return message_figure(path, title, "no point of this sweep in the dose-response table")
    if not np.isfinite(rows["mean"].to_numpy(dtype=float)).any():
        return message_figure(path, title, "no usable run of this sweep's variants (see the run status)")
    options = list(dict.fromkeys(rows["option"]))
    split = rows["split"].iloc[0]
    groups = list(dict.fromkeys(rows["fixed"]))
    colours = dict(zip(groups, sns.color_palette("colorblind" if len(groups) <= 10 else "husl", len(groups))))
    fig, axes = plt.subplots(
        len(options), len(METRICS), squeeze=False, figsize=(3.9 * len(METRICS), 3.3 * len(options))
    )
    for row_axes, option in zip(axes, options):
        option_rows = rows[rows["option"] == option]
        values = np.sort(option_rows["value"].unique())
        base = option_rows[option_rows["variant"] == option_rows["base"]]
        term = option_rows["term"].iloc[0] if option_rows["term"].notna().any() else None
        for ax, metric in zip(row_axes, METRICS):
            panel = option_rows[option_rows["metric"] == metric]
            flip = metric == FLIP_RATE
            ax.set_title(
                f"{option}: flip rate of the {term} term" if flip and term else f"{option}: {PANEL_TITLES[metric]}",
                fontsize=10,
            )
            _x_axis(ax, option, values)
            if panel.empty or not np.isfinite(panel["mean"].to_numpy(dtype=float)).any():
                ax.text(
                    0.5,
                    0.5,
                    "no selection term scaled by this option" if flip and not term else "no data",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="0.35",
                    fontsize=9,
                )
                ax.set_yticks([])
                continue
            if flip:
                _curves(ax, panel, colours, scale=100)  # a rate, shown in % like the flip-rate figure
                ax.set_ylabel("top-k set flips (% of tokens)")
                ax.set_ylim(bottom=0)
            else:
                _reference_band(ax, panel, reference)
                _curves(ax, panel, colours)
                ax.set_ylabel(f"{metric_label(metric)} ({split})")
            for value in base["value"].unique():
                ax.axvline(
                    value,
                    color="0.55",
                    ls=":",
                    lw=1,
                    zorder=1,
                    label=f"base {base['base'].iloc[0]} ({option}={value:.3g})",
                )
        handles, labels = row_axes[0].get_legend_handles_labels()
        if handles:
            row_axes[0].legend(
                handles,
                labels,
                fontsize=7,
                loc="best",
                title="other options" if len(groups) > 1 else None,
                title_fontsize=7,
            )
    first = rows.iloc[0]
    return finish_figure(
        fig,
        path,
        f"{title} — {first['router']} router around {first['base']}, {split} split (mean over seeds; "
        f"band: {int(CONFIDENCE * 100)}% t CI across seeds; dashed and grey: {reference}; symlog x)",
    )


# --------------------------------------------------------------------------- tables


def _cell(mean: float, low: float, high: float, n: int, scale: float = 1.0) -> str | Markup:
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
        *(labels[m] for m in METRICS[:3]),
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
        for metric in METRICS:
            if metric not in by_metric.index:
                row[labels[metric]] = NA
                continue
            r = by_metric.loc[metric]
            row[labels[metric]] = _cell(
                r["mean"], r["ci_low"], r["ci_high"], int(r["n"]), scale=100 if metric == FLIP_RATE else 1
            )
        ppl = by_metric.loc["ppl"]
        row[delta] = _cell(ppl["delta"], ppl["delta_ci_low"], ppl["delta_ci_high"], int(ppl["n_paired"]))
        rows.append(row)
    reference = part.drop_duplicates("metric").set_index("metric")
    ref_row = {
        "option": "",
        "other options": "",
        "value": "",
        "variant": f"{reference['reference'].iloc[0]} (reference)",
        "_row_class": "reference",
        "_class": {labels[m]: "num" for m in METRICS[:3]},
    }
    for metric in METRICS[:3]:
        r = reference.loc[metric]
        ref_row[labels[metric]] = _cell(r["ref_mean"], r["ref_ci_low"], r["ref_ci_high"], int(r["ref_n"]))
    rows.append(ref_row)
    return rows, columns


def _best_rows(best: pd.DataFrame) -> tuple[list[dict], list[str]]:
    columns = [
        "sweep",
        "option",
        *(["other options"] if best["fixed"].ne("").any() else []),
        "best value",
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
                "best value": f"{r.value:g}" if chosen else NA,
                "variant": r.variant or NA,
                "Gini": _cell(r.gini_mean, r.gini_ci_low, r.gini_ci_high, int(r.n)),
                "MaxVio global": format_number(r.maxvio_global_mean),
                "PPL": format_number(r.ppl_mean),
                "Δ PPL vs reference": _cell(r.delta_ppl, r.delta_ppl_ci_low, r.delta_ppl_ci_high, int(r.n_paired)),
                "values tried": str(r.n_values_tried),
                "values eligible": str(r.n_values_eligible),
                "note": r.note,
                "_class": {c: "num" for c in columns if c not in text_columns},
            }
        )
    return rows, columns


def write_tables(dose: pd.DataFrame, best: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """``sensitivity.csv``/``.html`` (the dose-response table) and ``sensitivity_best.csv``/``.html``."""
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
    best_caption = (
        "Per dose-response curve (sweep, option and, in a full grid, the other options' values): among the "
        "values whose mean seed-paired PPL difference to the reference is ≤ 0 (eligible: PPL no worse than "
        f"{reference}'s), the one with the lowest mean Gini; ties go to the smaller value. Gini: mean with "
        f"its {level}% t CI and n seeds; MaxVio global and PPL: means over seeds; Δ PPL: mean paired "
        f"difference best − {reference} with its t CI over n paired seeds. Values tried: points on the "
        "curve; values eligible: those with Δ PPL ≤ 0 (a point without paired seeds is not eligible). "
        "When none is eligible the row has no value and the note says so. A choice among noisy means: "
        "check the CI of Δ PPL and of Gini before adopting a value."
    )
    best_rows, best_columns = _best_rows(best)
    pages = {
        "sensitivity": (dose, html_page("Sensitivity: dose-response of the router options", dose_caption, sections)),
        "sensitivity_best": (
            best,
            html_page("Sensitivity: best value per option", best_caption, [("", html_table(best_rows, best_columns))]),
        ),
    }
    return [
        path for name in TABLE_FILES for path in write_table(*pages[name], out / f"{name}.csv", out / f"{name}.html")
    ]
