"""Dose-response figures of the sweeps, one per sweep, from the dose-response table of
``analysis.stats.sensitivity.dose_response``."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.figures.canvas import finish_figure, message_figure
from analysis.stats import CONFIDENCE, metric_label
from analysis.stats.sensitivity import FLIP_RATE, METRICS

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


def plot_sensitivity(dose: pd.DataFrame, path: str | Path, sweep: str) -> Path:
    """Dose-response figure of one sweep: a row per swept option, columns Gini, MaxVio global,
    PPL and the flip rate of the option's term against the option's value (symlog x). Lines:
    mean over seeds with a 95% t band across seeds, one per ``fixed`` group (full grids);
    dashed line and grey band: the reference's mean and t CI (not on the flip-rate panel), the
    reference being the dose table's own (``stats.sensitivity.dose_response``)."""
    title = f"Sensitivity: {sweep}"
    rows = dose[dose["sweep"] == sweep]
    if rows.empty:
        return message_figure(path, title, "no point of this sweep in the dose-response table")
    if not np.isfinite(rows["mean"].to_numpy(dtype=float)).any():
        return message_figure(path, title, "no usable run of this sweep's variants (see the run status)")
    options = list(dict.fromkeys(rows["option"]))
    split, reference = rows["split"].iloc[0], rows["reference"].iloc[0]
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
