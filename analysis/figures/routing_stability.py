"""How stable routing is, as pictures (``stats.stability``): over training, StableMoE's routing fluctuation and the
share of probe tokens already routed as they end; across seeds, the matched agreement of every pair of seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from analysis.figures.canvas import message_figure, save_figure, variant_palette
from analysis.stats.stability import FLUCTUATION, SETTLED

STABILITY_TITLE = "Routing stability over training"
AGREEMENT_TITLE = "Routing agreement across seeds"
LATE = 0.2  # StableMoE's reading: the share of tokens whose routing still changes after 20% of training


def _without_note(fig: plt.Figure, without: Sequence[str], what: str) -> None:
    if without:
        fig.supxlabel(f"no {what}: {', '.join(without)}", fontsize=8)


def plot_routing_stability(curves: pd.DataFrame, path: str | Path, without: Sequence[str] = ()) -> Path:
    """Two panels over training progress, a line per variant (mean over seeds, 95% CI band over seeds): the share
    of probe tokens whose expert set changed since the previous snapshot, and the share routed as they are at the
    end from there on. ``without``: routed variants without routing snapshots, named beneath."""
    if curves.empty:
        return message_figure(
            path,
            STABILITY_TITLE,
            "no run with routing snapshots\n(train.routing_snapshots = 0, dense, or trained before snapshots)",
        )
    variants = [str(v) for v in curves["variant"].cat.categories]
    palette = variant_palette(variants)
    fig, (fluctuation_ax, settled_ax) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    for ax, curve, ylabel in (
        (fluctuation_ax, FLUCTUATION, "share of probe tokens whose\nexpert set changed since the last snapshot"),
        (settled_ax, SETTLED, "share of probe tokens already\nrouted as at the end of training"),
    ):
        part = curves[curves["curve"] == curve].assign(variant=lambda f: f["variant"].astype(str))
        sns.lineplot(
            part,
            x="progress",
            y="share",
            hue="variant",
            hue_order=variants,
            palette=palette,
            errorbar=("ci", 95),
            marker="o",
            markersize=3,
            ax=ax,
            legend=ax is settled_ax,
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("training progress (step / final step)")
        ax.set_ylabel(ylabel, fontsize=9)
    settled_ax.axvline(LATE, color="0.5", linestyle=":", linewidth=1)
    settled_ax.text(LATE, 0.02, " 20% of training", color="0.4", fontsize=8)
    # Outside the axes: the curves fill the panel's lower right, where a legend inside would sit.
    settled_ax.legend(fontsize=8, title="variant", title_fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fluctuation_ax.set_title("routing fluctuation between snapshots (StableMoE)", fontsize=10)
    settled_ax.set_title("tokens past their last fluctuation", fontsize=10)
    fig.suptitle(f"{STABILITY_TITLE} (probe of validation tokens; mean over MoE layers, then seeds)", fontsize=11)
    _without_note(fig, without, "routing snapshots")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_seed_agreement(pairs: pd.DataFrame, path: str | Path, without: Sequence[str] = ()) -> Path:
    """One row per variant: the matched agreement of each pair of seeds (a dot, mean over MoE layers) and the mean
    over pairs (a bar), beside the chance value of shuffled tokens (a grey mark). ``without``: routed variants with
    fewer than two seeds with a probe routing, named beneath."""
    if pairs.empty:
        return message_figure(
            path,
            AGREEMENT_TITLE,
            "no two seeds of a variant with a probe routing\n(eval.probe_blocks = 0, one seed, evaluated before it,\n"
            "or a study that does not score the validation split: eval_splits)",
        )
    variants = list(dict.fromkeys(pairs["variant"].astype(str)))
    palette = variant_palette(variants)
    by_pair = pairs.groupby(["variant", "seed_a", "seed_b"], observed=True, sort=False)[["agreement", "chance"]].mean()
    by_pair = by_pair.reset_index().assign(variant=lambda f: f["variant"].astype(str))
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(variants) + 1.8))
    sns.barplot(
        by_pair,
        y="variant",
        x="agreement",
        order=variants,
        hue="variant",
        palette=palette,
        errorbar=None,
        alpha=0.35,
        ax=ax,
    )
    sns.stripplot(by_pair, y="variant", x="agreement", order=variants, hue="variant", palette=palette, size=4, ax=ax)
    chance = by_pair.groupby("variant")["chance"].mean()
    ax.scatter(
        [chance[v] for v in variants],
        variants,
        marker="|",
        s=300,
        color="0.3",
        zorder=5,
        label="chance (tokens shuffled)",
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("matched agreement of two seeds' routings (1 = the same up to expert labels)")
    ax.set_ylabel("")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(
        f"{AGREEMENT_TITLE}\n(probe of validation tokens; a dot per pair of seeds, mean over layers)", fontsize=10
    )
    _without_note(fig, without, "two seeds with a probe routing")
    fig.tight_layout()
    return save_figure(fig, path)
