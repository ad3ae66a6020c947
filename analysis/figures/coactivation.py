"""Expert co-activation per router (OLMoE, Muennighoff et al. 2024): one heatmap per routed variant of the share of
an expert's tokens also routed to each other expert, averaged over seeds and MoE layers with experts ranked by their
tokens (``stats.specialisation.coactivation_by_rank``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from analysis.figures.canvas import message_figure, save_figure
from gtmoe.contract import MAX_COACTIVATION_EXPERTS

TITLE = "Expert co-activation"


def plot_coactivation(
    shares: pd.DataFrame, panels: pd.DataFrame, path: str | Path, without: Sequence[str] = ()
) -> Path:
    """One panel per variant of ``panels`` (study order): rank × partner-rank heatmap of the mean co-activation
    share (0–1, one scale for every panel; the diagonal grey), titled with the seeds and layers averaged and the
    share every cell would have if a token's other experts were independent of its first. ``without``: routed
    variants without co-activation counts, named beneath."""
    if panels.empty:
        return message_figure(
            path, TITLE, "no routed variant with co-activation counts\n(dense, or evaluated before they existed)"
        )
    n_experts = int(panels["n_experts"].max())
    columns = min(3 if n_experts <= 16 else 2, len(panels))
    rows = math.ceil(len(panels) / columns)
    side = min(6.0, max(3.2, 0.35 * n_experts + 1.6))
    fig, axes = plt.subplots(rows, columns, squeeze=False, figsize=(side * columns + 1.2, side * rows + 0.8))
    mesh = None
    for ax, panel in zip(axes.flat, panels.itertuples()):
        part = shares[shares["variant"] == panel.variant]
        matrix = part.pivot(index="rank", columns="partner_rank", values="share")
        sns.heatmap(
            matrix,
            ax=ax,
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            cbar=False,
            square=True,
            mask=~np.isfinite(matrix.to_numpy(dtype=float)),
            annot=panel.n_experts <= 8,
            fmt=".2f",
            annot_kws={"fontsize": 7},
            xticklabels=max(1, panel.n_experts // 16),
            yticklabels=max(1, panel.n_experts // 16),
        )
        ax.set_facecolor("0.85")  # the diagonal (1 by definition) and cells nothing defines
        ax.grid(False)
        mesh = ax.collections[0]
        seeds = f"{panel.n_seeds} seed{'s' if panel.n_seeds != 1 else ''}"
        layers = f"{panel.n_layers} layer{'s' if panel.n_layers != 1 else ''}"
        independent = "n/a" if math.isnan(panel.independent) else f"{panel.independent:.2f}"
        ax.set_title(f"{panel.variant} ({seeds} × {layers})\nindependent routing: {independent} per cell", fontsize=9)
        ax.set_xlabel("partner expert, ranked by tokens", fontsize=8)
        ax.set_ylabel("expert, ranked by tokens (1 = busiest)", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    fig.set_layout_engine("constrained")
    colorbar = fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.8)
    colorbar.set_label("share of the row expert's tokens\nalso routed to the column expert", fontsize=9)
    fig.suptitle(f"{TITLE}\n(OLMoE's row shares; mean over seeds and layers, experts ranked by tokens)", fontsize=10)
    if without:
        fig.supxlabel(
            f"no co-activation counts (evaluated before they existed, or more than {MAX_COACTIVATION_EXPERTS} "
            f"experts): {', '.join(without)}",
            fontsize=8,
        )
    return save_figure(fig, path)
