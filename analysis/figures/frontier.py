"""The frontier figure of a tuning study: each router's perplexity against its balance, across its knob values."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.figures.canvas import finish_figure, message_figure, variant_palette
from analysis.stats import metric_label

LINE_STYLES = ("-", "--", ":", "-.")


def plot_frontier(
    frontier: pd.DataFrame, path: str | Path, balance_metrics: tuple[str, ...], chosen: pd.DataFrame | None = None
) -> Path:
    """One panel per balance metric: mean PPL (y) against the mean balance metric (x) at each knob value of each
    tuned router (``stats.frontier.frontier_table``), with the seeds' 95% t intervals on both axes (cut at the
    frame, which fits the means), the points joined in the order of the knob's values and labelled with them; a
    ringed point is the value the declared rule chose (``chosen``: sensitivity's best-value table). A sweep of
    several options (a one-at-a-time sweep of a router's secondary knobs) draws one curve per option, in its
    router's colour with its own line style: the knob's values of two options may coincide."""
    title = "Frontiers: perplexity against balance across each router's knob"
    if frontier.empty or not np.isfinite(frontier["mean"].to_numpy(dtype=float)).any():
        return message_figure(path, title, "no usable run of the tuned variants (see the run status)")
    split = frontier["split"].iloc[0]
    curves = list(dict.fromkeys(zip(frontier["sweep"], frontier["option"], frontier["fixed"].fillna(""))))
    bases = dict(zip(frontier["sweep"], frontier["base"]))
    colours = variant_palette(list(dict.fromkeys(bases[sweep] for sweep, _, _ in curves)))
    styles: dict[tuple, str] = {}  # a base's first curve solid, its next ones dashed, dotted, ...
    for curve in curves:
        styles[curve] = LINE_STYLES[sum(bases[c[0]] == bases[curve[0]] for c in styles) % len(LINE_STYLES)]
    picked = (
        set()
        if chosen is None
        else {(r.sweep, r.option, r.fixed if isinstance(r.fixed, str) else "", r.value) for r in chosen.itertuples()}
    )
    fig, axes = plt.subplots(1, len(balance_metrics), squeeze=False, figsize=(5.2 * len(balance_metrics), 4.4))
    for ax, metric in zip(axes[0], balance_metrics):
        shown: list[tuple[float, float]] = []  # the means drawn: the axes frame them, not the intervals
        for curve in curves:
            sweep, option, fixed = curve
            rows = frontier[
                (frontier["sweep"] == sweep) & (frontier["option"] == option) & (frontier["fixed"].fillna("") == fixed)
            ]
            x = rows[rows["metric"] == metric].set_index("value")
            y = rows[rows["metric"] == "ppl"].set_index("value")
            values = [
                v for v in sorted(set(x.index) & set(y.index)) if np.isfinite([x.at[v, "mean"], y.at[v, "mean"]]).all()
            ]
            if not values:
                continue
            xs, ys = x.loc[values], y.loc[values]
            shown += list(zip(xs["mean"], ys["mean"]))
            colour = colours[bases[sweep]]
            ax.errorbar(
                xs["mean"],
                ys["mean"],
                xerr=_half_widths(xs),
                yerr=_half_widths(ys),
                color=colour,
                marker="o",
                ms=4,
                lw=1.4,
                elinewidth=0.6,  # thin: the means and their order carry the frontier; the intervals are context
                capsize=1.5,
                ls=styles[curve],
                label=f"{bases[sweep]} ({option}{', ' + fixed if fixed else ''})",
            )
            for value in values:
                ax.annotate(
                    f"{value:g}",
                    (xs.at[value, "mean"], ys.at[value, "mean"]),
                    fontsize=7,
                    color=colour,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
                if (*curve, value) in picked:
                    ax.plot(xs.at[value, "mean"], ys.at[value, "mean"], "o", ms=11, mfc="none", mec=colour, mew=1.6)
        _frame(ax, shown)
        ax.set_xlabel(f"{metric_label(metric)} ({split}, mean over seeds)")
        ax.set_ylabel(f"perplexity ({split})")
        ax.set_title(f"PPL vs {metric_label(metric)}", fontsize=10)
    axes[0][0].legend(fontsize=8, title="router (knob); ringed: chosen", title_fontsize=8)
    return finish_figure(fig, path, title)


def _frame(ax: plt.Axes, points: list[tuple[float, float]]) -> None:
    """Limits around the means with a margin: with few seeds a t interval can be wider than every difference
    between the points (t(0.975, 1) = 12.7), and axes sized to the intervals would hide the frontiers. The
    intervals run off the frame where they are wider; the caption says what they are."""
    if not points:
        return
    xs, ys = np.array(points).T
    for low, high, set_limits, floor in (
        (xs.min(), xs.max(), ax.set_xlim, 0.0),
        (ys.min(), ys.max(), ax.set_ylim, None),
    ):
        pad = 0.12 * (high - low) or 0.05 * abs(high) or 0.05
        set_limits(max(floor, low - pad) if floor is not None else low - pad, high + pad)


def _half_widths(rows: pd.DataFrame) -> np.ndarray:
    """Asymmetric error bars from a CI; 0 where the CI is undefined (one seed)."""
    low = (rows["mean"] - rows["ci_low"]).to_numpy(dtype=float)
    high = (rows["ci_high"] - rows["mean"]).to_numpy(dtype=float)
    return np.nan_to_num(np.vstack([low, high]), nan=0.0)
