"""Forest plots of the paired comparisons the `stats` step wrote (``stats.paired_comparisons``):
every variant against the reference, and each ablation against its base."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis.figures.canvas import message_figure, save_figure
from analysis.stats import CONFIDENCE, metric_label


def _forest(comparisons: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Mean paired difference (b − a) with its 95% t CI, one panel per metric."""
    if comparisons.empty:
        return message_figure(path, title, "no comparison (variants absent)")
    metrics = list(dict.fromkeys(comparisons["metric"]))
    labels = list(dict.fromkeys(comparisons["variant_b"] + " − " + comparisons["variant_a"]))
    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        squeeze=False,
        sharey=True,
        layout="constrained",
        figsize=(3.8 * columns + 2.2, (0.45 * len(labels) + 1.3) * rows + 0.5),
    )
    positions = {label: i for i, label in enumerate(labels)}
    for ax, metric in zip(axes.flat, metrics):
        part = comparisons[comparisons["metric"] == metric]
        ax.axvline(0, color="0.3", lw=1)
        for r in part.itertuples():
            y = positions[f"{r.variant_b} − {r.variant_a}"]
            if math.isnan(r.mean_diff):
                ax.text(0, y, "n/a", ha="center", va="center", color="0.5", fontsize=8)
                continue
            has_ci = not math.isnan(r.ci_low)
            xerr = [[r.mean_diff - r.ci_low], [r.ci_high - r.mean_diff]] if has_ci else None
            ax.errorbar(r.mean_diff, y, xerr=xerr, fmt="o", color="C0" if has_ci else "0.5", capsize=3, ms=6)
            p = r.p_ttest_holm
            ax.annotate(
                f"n={r.n}" + ("" if math.isnan(p) else f", p={p:.2g}"),
                (r.mean_diff, y),
                xytext=(0, 6),
                textcoords="offset points",
                ha="center",
                fontsize=7,
                color="0.3",
            )
        ax.set_title(metric_label(metric), fontsize=10)
        ax.set_xlabel("Δ = b − a", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.margins(x=0.25)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_axis_off()
    axes[0][0].set_yticks(range(len(labels)), labels)
    axes[0][0].set_ylim(len(labels) - 0.5, -0.8)
    fig.suptitle(
        f"{title} (mean paired difference, {int(CONFIDENCE * 100)}% t CI; p: Holm-adjusted paired t-test)", fontsize=11
    )
    return save_figure(fig, path)


def plot_ablation_forest(comparisons: pd.DataFrame, path: str | Path) -> Path:
    """Forest plot of ablation deltas (ablation − base): positive PPL/imbalance = the removed term helped."""
    bases = list(dict.fromkeys(comparisons["variant_a"].astype(str)))
    return _forest(comparisons, path, f"Ablations of {', '.join(bases)}" if bases else "Ablations")


def plot_reference_forest(comparisons: pd.DataFrame, path: str | Path) -> Path:
    """Forest plot of every variant against the reference router (variant − reference)."""
    return _forest(comparisons, path, "Variants vs reference")
