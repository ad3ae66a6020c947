"""Report figures (seaborn, PNG). Each public function takes a DataFrame and an output
path, writes one PNG and returns its path.

Inputs are the tidy table of ``collect`` (already restricted to usable runs), the summary of
``stats.summarize``, the concatenated router and training logs of ``collect``, or a comparison
table of ``stats.paired_comparisons`` as the `stats` step wrote it. Router names and labels come
from the caller (the study record), never from here. A figure with nothing to show (no routed
variant, no stateful router) is still written, with a message, so that workflow outputs always exist.

This package: the per-variant and training figures (here), the forest plots of the paired
comparisons (``forest``), the dose-response figures of the sweeps (``sensitivity``), expert co-activation
(``coactivation``, drawn by the `specialisation` step), and the canvas they share (``canvas``: backend, theme,
colours, saving).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import TwoSlopeNorm

from analysis.collect import MODEL_LEVEL, variant_order
from analysis.figures.canvas import DPI, finish_figure, message_figure, save_figure, variant_palette  # noqa: F401
from analysis.figures.forest import plot_ablation_forest, plot_reference_forest  # noqa: F401
from analysis.figures.sensitivity import plot_sensitivity  # noqa: F401
from analysis.stats import CONFIDENCE, VARIANT, metric_label, router_balance_curves, summarize, t_confidence_interval
from gtmoe.contract import FLIP_RATE_PREFIX, ROUTER_LOG_INDEX

BASELINE_STYLES = {"unigram": (0, (6, 2)), "bigram": "-."}  # line styles of the n-gram reference lines
UNROUTED_DASHES = ("--", (0, (1, 1.5)), (0, (8, 2, 1, 2, 1, 2)), (0, (3, 3)))  # unrouted variants' lines, in turn


def _t_band(values: pd.Series) -> tuple[float, float]:
    """Seaborn ``errorbar`` callable: Student t CI across seeds (NaN for one seed, no band)."""
    x = values.to_numpy(dtype=float)
    return t_confidence_interval(x[np.isfinite(x)])


def _seed_mean_lines(
    ax: plt.Axes, curves: pd.DataFrame, y: str, variants: Sequence[str], palette: dict[str, tuple]
) -> None:
    """One line per variant over ``step``: the mean across seeds with its t CI band."""
    sns.lineplot(
        data=curves,
        x="step",
        y=y,
        hue="variant",
        hue_order=variants,
        palette=palette,
        errorbar=_t_band,
        estimator="mean",
        ax=ax,
        lw=1.5,
    )


def _baseline_lines(ax: plt.Axes, baselines: pd.DataFrame | None, metric: str, split: str) -> None:
    """Horizontal, labelled reference lines for the n-gram models (``collect.read_baselines``).

    A baseline far outside the plotted values (the unigram, several times the perplexity of a
    trained model) would squash the variants into a strip: it is named in a note at the top
    instead of drawn. "Far" is more than one data range beyond the axis limits.
    """
    if baselines is None or baselines.empty:
        return
    rows = baselines[(baselines["metric"] == metric) & (baselines["split"] == split)]
    has_data = ax.has_data()
    low, high = ax.get_ylim()
    span = high - low
    off_scale = []
    for row in rows.itertuples():
        value = f"{row.value:,.0f}" if abs(row.value) >= 1000 else f"{row.value:.4g}"
        if has_data and not low - span <= row.value <= high + span:
            off_scale.append(f"{row.model} baseline {value} ({'above' if row.value > high else 'below'})")
            continue
        ax.axhline(
            row.value,
            color="0.2",
            alpha=0.8,
            lw=1.2,
            ls=BASELINE_STYLES.get(row.model, "--"),
            zorder=0,
            label=f"{row.model} baseline ({value})",
        )
        ax.annotate(
            f"{row.model} baseline {value}",
            (1.0, row.value),
            xycoords=("axes fraction", "data"),
            xytext=(-3, 2),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.2",
        )
    if off_scale:
        ax.text(
            0.01,
            0.99,
            "off scale: " + "; ".join(off_scale),
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=7,
            color="0.3",
        )


def _summary(tidy: pd.DataFrame, summary: pd.DataFrame | None, metrics: Sequence[str], split: str) -> pd.DataFrame:
    """The variants' rows of ``summary`` for ``metrics`` on ``split`` in study order (``summarize`` of ``tidy``
    when no summary is given), with the columns of ``stats.SUMMARY_COLUMNS``."""
    if summary is None:
        return summarize(tidy, metrics, [split])
    rows = summary[(summary["kind"] == VARIANT) & (summary["split"] == split) & summary["metric"].isin(metrics)]
    order = {v: i for i, v in enumerate(variant_order(tidy))}
    rows = rows[rows["variant"].astype(str).isin(order)]
    rank = rows["variant"].astype(str).map(order) * len(metrics) + rows["metric"].map(list(metrics).index)
    return rows.assign(variant=rows["variant"].astype(str)).iloc[np.argsort(rank.to_numpy(), kind="stable")]


def _model_level(tidy: pd.DataFrame, split: str, metrics: Sequence[str]) -> pd.DataFrame:
    rows = tidy[(tidy["layer"] == MODEL_LEVEL) & (tidy["split"] == split) & tidy["metric"].isin(metrics)]
    rows = rows[np.isfinite(rows["value"])]
    return rows.assign(variant=rows["variant"].astype(str))


# --------------------------------------------------------------------------- per-variant points


def _metric_panels(
    tidy: pd.DataFrame,
    path: str | Path,
    metrics: Sequence[str],
    split: str,
    title: str,
    baselines: pd.DataFrame | None = None,
    summary: pd.DataFrame | None = None,
) -> Path:
    """One panel per metric: seeds as dots, mean with its 95% t CI as an error bar (from ``summary``,
    the `stats` step's table; computed from ``tidy`` when not given), and the n-gram reference models
    of ``baselines`` (if any) as labelled horizontal lines."""
    variants = variant_order(tidy)
    palette = variant_palette(variants)
    values = _model_level(tidy, split, metrics)
    summary = _summary(tidy, summary, metrics, split)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 4.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        stats_m = summary[(summary["metric"] == metric) & (summary["n"] > 0)]
        present = list(stats_m["variant"])
        ax.set_title(metric_label(metric))
        if not present:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        points = values[values["metric"] == metric]
        sns.stripplot(
            data=points,
            x="variant",
            y="value",
            hue="variant",
            order=present,
            hue_order=present,
            palette=palette,
            alpha=0.55,
            size=5,
            jitter=0.15,
            legend=False,
            ax=ax,
            zorder=1,
        )
        for position, row in enumerate(stats_m.itertuples()):
            has_ci = not math.isnan(row.ci_low)
            yerr = [[row.mean - row.ci_low], [row.ci_high - row.mean]] if has_ci else None
            ax.errorbar(
                position + 0.28,
                row.mean,
                yerr=yerr,
                fmt="D",
                color=palette[row.variant],
                markeredgecolor="black",
                markersize=6,
                capsize=4,
                lw=1.6,
                zorder=3,
            )
        ax.set_xticks(
            range(len(present)),
            [f"{v} (n={n})" for v, n in zip(present, stats_m["n"])],
            rotation=35,
            ha="right",
            fontsize=9,
        )
        ax.set_xlabel("")
        ax.set_ylabel(metric_label(metric))
        _baseline_lines(ax, baselines, metric, split)
    has_lines = baselines is not None and not baselines.empty
    return finish_figure(
        fig,
        path,
        f"{title} ({split}; dots: seeds, diamond: mean with "
        f"{int(CONFIDENCE * 100)}% t CI" + ("; lines: n-gram reference baselines" if has_lines else "") + ")",
    )


def plot_perplexity(
    tidy: pd.DataFrame,
    path: str | Path,
    split: str = "test",
    baselines: pd.DataFrame | None = None,
    summary: pd.DataFrame | None = None,
) -> Path:
    """Token- and word-level perplexity per variant with 95% t CIs across seeds; the n-gram
    reference models (``collect.read_baselines``) as labelled horizontal lines."""
    return _metric_panels(tidy, path, ["ppl", "word_ppl"], split, "Perplexity per variant", baselines, summary)


def plot_load_balance(
    tidy: pd.DataFrame, path: str | Path, split: str = "test", summary: pd.DataFrame | None = None
) -> Path:
    """Gini, MaxVio (global and batch) per variant with 95% t CIs across seeds."""
    metrics = ["gini", "maxvio_global", "maxvio_batch"]
    return _metric_panels(tidy, path, metrics, split, "Load imbalance per variant", summary=summary)


# --------------------------------------------------------------------------- load heatmap


def relative_expert_load(tidy: pd.DataFrame, split: str = "test", by_rank: bool = True) -> pd.DataFrame:
    """Mean over seeds of the relative load ``E · f_i`` per (variant, layer, expert); 1 = balanced.

    Counts are normalised within each run and layer first, so seeds weigh equally.
    Expert indices are arbitrary labels (expert 3 of seed 0 has nothing to do with
    expert 3 of seed 1), so by default experts are ranked by load within each run and
    layer before averaging (column ``rank``, 1 = busiest); ``by_rank=False`` keeps the
    raw index (column ``expert``), meaningful for a single seed.
    """
    slot = "rank" if by_rank else "expert"
    loads = tidy[(tidy["split"] == split) & (tidy["layer"] != MODEL_LEVEL) & tidy["metric"].str.fullmatch(r"load_e\d+")]
    if loads.empty:
        return pd.DataFrame(columns=["variant", "layer", slot, "relative_load", "n_seeds"])
    loads = loads.assign(
        variant=loads["variant"].astype(str),
        layer=loads["layer"].astype(int),
        expert=loads["metric"].str.removeprefix("load_e").astype(int),
    )
    run_layer = loads.groupby(["variant", "seed", "layer"])["value"]
    loads = loads.assign(relative_load=loads["value"] / run_layer.transform("sum") * run_layer.transform("size"))
    if by_rank:
        loads["rank"] = (
            loads.groupby(["variant", "seed", "layer"])["relative_load"]
            .rank(ascending=False, method="first")
            .astype(int)
        )
    grouped = loads.groupby(["variant", "layer", slot])
    return grouped.agg(relative_load=("relative_load", "mean"), n_seeds=("seed", "nunique")).reset_index()


def plot_load_heatmap(tidy: pd.DataFrame, path: str | Path, split: str = "test", by_rank: bool = True) -> Path:
    """Layer × expert heatmap of relative load ``E · f_i`` (mean over seeds), one facet per
    variant; experts ranked by load within each run and layer unless ``by_rank=False``."""
    load = relative_expert_load(tidy, split, by_rank)
    if load.empty:
        return message_figure(path, "Expert load per layer", "no routed variant with per-layer loads")
    slot = "rank" if by_rank else "expert"
    variants = [v for v in variant_order(tidy) if v in set(load["variant"])]
    n_experts = int(load[slot].nunique())
    columns = min(3 if n_experts <= 16 else 2, len(variants))
    rows = math.ceil(len(variants) / columns)
    panel_width = min(7.0, max(3.6, 0.3 * n_experts + 1.8))
    panel_height = min(5.0, 0.4 * load["layer"].nunique() + 1.8)
    # Layout engine set after drawing: sns.heatmap draws the whole figure once per panel
    # (to check label overlap), and a constrained layout would be solved at every draw.
    fig, axes = plt.subplots(
        rows, columns, squeeze=False, figsize=(panel_width * columns + 1.2, panel_height * rows + 0.6)
    )
    # Diverging around 1 (balanced): blue = under-used, red = over-used experts.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(load["relative_load"].max())))
    mesh = None
    for ax, variant in zip(axes.flat, variants):
        part = load[load["variant"] == variant]
        matrix = part.pivot(index="layer", columns=slot, values="relative_load")
        sns.heatmap(
            matrix,
            ax=ax,
            cmap="RdBu_r",
            norm=norm,
            cbar=False,
            linecolor="white",
            linewidths=0.3 if n_experts <= 16 else 0,
            annot=n_experts <= 8,
            fmt=".2f",
            annot_kws={"fontsize": 7},
            xticklabels=max(1, n_experts // 16),
            yticklabels=max(1, len(matrix) // 16),
        )
        mesh = ax.collections[0]
        seeds = int(part["n_seeds"].max())
        ax.set_title(f"{variant} ({seeds} seed{'s' if seeds != 1 else ''})", fontsize=10)
        ax.set_xlabel("expert rank by load (1 = busiest)" if by_rank else "expert", fontsize=9)
        ax.set_ylabel("layer", fontsize=9)
    for ax in list(axes.flat)[len(variants) :]:
        ax.set_axis_off()
    fig.set_layout_engine("constrained")
    fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.8, label="relative load E·f (1 = balanced)")
    fig.suptitle(f"Expert load per layer ({split} split, mean over seeds)", fontsize=11)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- training curves


def plot_training_balance(router_log: pd.DataFrame, path: str | Path) -> Path:
    """Per-step Gini and MaxVio of the training batch (mean over layers), mean over seeds
    with a 95% t band across seeds (no band where a variant has one seed)."""
    curves = router_balance_curves(router_log)
    if curves.empty:
        return message_figure(path, "Load balance during training", "no router logs (no routed variant)")
    study = variant_order(router_log)
    palette = variant_palette(study)
    curves = curves.assign(variant=curves["variant"].astype(str))
    variants = [v for v in study if v in set(curves["variant"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, metric in zip(axes, ["gini", "maxvio_batch"]):
        _seed_mean_lines(ax, curves, metric, variants, palette)
        ax.set_ylabel(f"{metric_label(metric)} (training batch)")
        ax.set_title(metric_label(metric))
        if ax is not axes[-1]:
            ax.get_legend().remove()
    axes[-1].legend(title="variant", fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return finish_figure(
        fig, path, f"Load balance during training (mean over layers; band: {int(CONFIDENCE * 100)}% t CI across seeds)"
    )


# --------------------------------------------------------------------------- Pareto view


def plot_pareto(
    tidy: pd.DataFrame,
    path: str | Path,
    split: str = "test",
    imbalance: str = "gini",
    baselines: pd.DataFrame | None = None,
    summary: pd.DataFrame | None = None,
) -> Path:
    """Perplexity against load imbalance: runs as dots, variant means with 95% t CIs (from
    ``summary`` when given), the Pareto front of the means (lower is better on both axes),
    unrouted variants and the n-gram reference models (``baselines``) as horizontal lines."""
    values = _model_level(tidy, split, ["ppl", imbalance])
    runs = values.pivot_table(index=["variant", "seed"], columns="metric", values="value").reset_index()
    variants = variant_order(tidy)
    palette = variant_palette(variants)
    if runs.empty or "ppl" not in runs:
        return message_figure(path, "Perplexity vs imbalance", "no perplexity values")
    if imbalance not in runs:
        runs[imbalance] = np.nan
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    routed = runs[np.isfinite(runs[imbalance])]
    summary = _summary(tidy, summary, ["ppl", imbalance], split).set_index(["variant", "metric"])
    means = []
    for variant in variants:
        part = routed[routed["variant"] == variant]
        if part.empty:
            continue
        colour = palette[variant]
        ax.scatter(part[imbalance], part["ppl"], color=colour, alpha=0.45, s=22)
        x, y = summary.loc[(variant, imbalance)], summary.loc[(variant, "ppl")]
        xerr = None if math.isnan(x.ci_low) else [[x["mean"] - x.ci_low], [x.ci_high - x["mean"]]]
        yerr = None if math.isnan(y.ci_low) else [[y["mean"] - y.ci_low], [y.ci_high - y["mean"]]]
        ax.errorbar(
            x["mean"],
            y["mean"],
            xerr=xerr,
            yerr=yerr,
            fmt="o",
            ms=9,
            color=colour,
            markeredgecolor="black",
            capsize=3,
            label=f"{variant} (n={int(y.n)})",
            zorder=3,
        )
        means.append((x["mean"], y["mean"]))
    # Several unrouted references (dense, dense_total) get neighbouring hues: a dash pattern each tells them apart.
    dashes = itertools.cycle(UNROUTED_DASHES)
    for variant in variants:
        unrouted = runs[(runs["variant"] == variant) & ~np.isfinite(runs[imbalance])]
        if not unrouted.empty and variant not in set(routed["variant"]):
            ax.axhline(
                unrouted["ppl"].mean(),
                color=palette[variant],
                ls=next(dashes),
                lw=1.2,
                label=f"{variant} (no router; n={len(unrouted)})",
            )
    if means:
        front = _pareto_front(np.array(means))
        ax.step(
            front[:, 0], front[:, 1], where="post", color="0.4", lw=1, ls=":", label="Pareto front of means", zorder=2
        )
    _baseline_lines(ax, baselines, "ppl", split)
    ax.set_xlabel(f"{metric_label(imbalance)} ({split}; lower = more balanced)")
    ax.set_ylabel(f"perplexity ({split})")
    ax.set_title("Perplexity vs load imbalance (dots: seeds; markers: mean ± 95% t CI)", fontsize=11)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return save_figure(fig, path)


def _pareto_front(points: np.ndarray) -> np.ndarray:
    """Points not dominated when minimising both coordinates, sorted by the first."""
    ordered = points[np.lexsort((points[:, 1], points[:, 0]))]
    front, best = [], math.inf
    for x, y in ordered:
        if y < best:
            front.append((x, y))
            best = y
    return np.array(front)


# --------------------------------------------------------------------------- router state


def router_state_columns(router_log: pd.DataFrame) -> list[str]:
    """The state columns of the router logs: everything after gtmoe.contract.ROUTER_LOG_INDEX."""
    return [c for c in router_log.columns if c not in ("variant", "seed", *ROUTER_LOG_INDEX)]


def plot_router_state(
    router_log: pd.DataFrame,
    path: str | Path,
    seed: int | None = None,
    layer: int | None = None,
    state_labels: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Each stateful router's state per expert over training steps: one row per variant, one panel per
    state tensor its router declares (``Router.state_names``), titled with the router's label for it
    (``state_labels``: variant -> state -> label, from the study record; the state's name without one).

    Expert indices are arbitrary labels that differ between seeds and layers, so trajectories
    are shown for one run and one layer (default: lowest seed, first MoE layer) per variant
    rather than averaged.
    """
    columns = router_state_columns(router_log)
    state = router_log[router_log[columns].notna().any(axis=1)] if columns else router_log.iloc[:0]
    if state.empty:
        return message_figure(
            path, "Router state", "no router of this study keeps a state over training (none declares one)"
        )
    present = set(state["variant"].astype(str))
    variants = [v for v in variant_order(router_log) if v in present]
    tracked = {
        v: [c for c in columns if state.loc[state["variant"].astype(str) == v, c].notna().any()] for v in variants
    }
    width = max(map(len, tracked.values()))
    fig, axes = plt.subplots(len(variants), width, figsize=(4.7 * width, 3.2 * len(variants)), squeeze=False)
    for row_axes, variant in zip(axes, variants):
        part = state[state["variant"].astype(str) == variant]
        run_seed = seed if seed is not None and seed in set(part["seed"]) else int(part["seed"].min())
        part = part[part["seed"] == run_seed]
        run_layer = layer if layer is not None and layer in set(part["layer"]) else int(part["layer"].min())
        part = part[part["layer"] == run_layer]
        n_experts = part["expert"].nunique()
        many = n_experts > 16  # thin translucent lines: the spread is the message
        for i, ax in enumerate(row_axes):
            if i >= len(tracked[variant]):
                ax.set_visible(False)
                continue
            quantity = tracked[variant][i]
            label = ((state_labels or {}).get(variant) or {}).get(quantity, quantity)
            sns.lineplot(
                data=part,
                x="step",
                y=quantity,
                hue="expert",
                palette="viridis",
                ax=ax,
                lw=0.7 if many else 1.1,
                alpha=0.6 if many else 1.0,
                legend=not many and i == len(tracked[variant]) - 1,
            )
            ax.set_title(f"{variant} — {label}\n(seed {run_seed}, layer {run_layer})", fontsize=10)
            ax.set_ylabel(label)
            if ax.get_legend() is not None:
                sns.move_legend(
                    ax, "upper left", bbox_to_anchor=(1.02, 1), title="expert", fontsize=7, ncol=1 + n_experts // 9
                )
    return finish_figure(fig, path, "Router state per expert over training")


def flip_rate_curves(train_log: pd.DataFrame | None) -> pd.DataFrame:
    """Long table ``variant, seed, step, term, flip_rate`` of the finite flip-rate values in
    the training logs (columns ``flip_rate_*``; a router without a term has NaN or no column)."""
    columns = ["variant", "seed", "step", "term", "flip_rate"]
    present = [c for c in (train_log.columns if train_log is not None else []) if c.startswith(FLIP_RATE_PREFIX)]
    if not present:
        return pd.DataFrame(columns=columns)
    long = train_log.melt(
        id_vars=["variant", "seed", "step"], value_vars=present, var_name="term", value_name="flip_rate"
    )
    long = long[np.isfinite(long["flip_rate"].astype(float))]
    return long.assign(variant=long["variant"].astype(str))[columns]


def plot_flip_rates(
    train_log: pd.DataFrame | None, path: str | Path, term_labels: Mapping[str, str] | None = None
) -> Path:
    """Flip rate of each selection term over training: the fraction of tokens whose top-k
    expert set changes when that term is removed from the score (mean over MoE layers),
    mean over seeds with a 95% t band across seeds, one panel per term (titled with its label in
    ``term_labels``, from the study record), one line per variant."""
    curves = flip_rate_curves(train_log)
    if curves.empty:
        return message_figure(
            path,
            "Flip rate of the selection terms",
            "no router with selection terms in this study\n(flip rates are logged for routers that declare terms)",
        )
    study = variant_order(train_log)
    palette = variant_palette(study)
    terms = list(dict.fromkeys(curves["term"]))
    variants = [v for v in study if v in set(curves["variant"])]
    curves = curves.assign(flip_rate=100 * curves["flip_rate"].astype(float))
    fig, axes = plt.subplots(1, len(terms), figsize=(4.6 * len(terms) + 1.8, 4.2), squeeze=False)
    for ax, term in zip(axes[0], terms):
        part = curves[curves["term"] == term]
        shown = [v for v in variants if v in set(part["variant"])]
        _seed_mean_lines(ax, part, "flip_rate", shown, palette)
        name = term.removeprefix(FLIP_RATE_PREFIX)
        ax.set_title(f"without the {(term_labels or {}).get(name, name + ' term')}", fontsize=10)
        ax.set_ylabel("tokens whose top-k set flips (%)")
        ax.set_ylim(0, min(100, ax.get_ylim()[1]))  # a rate: the t band of few seeds can overshoot 0–100%
        sns.move_legend(ax, "best", title="variant", fontsize=8)
    return finish_figure(
        fig,
        path,
        f"Flip rate per selection term during training (mean over MoE layers; band: "
        f"{int(CONFIDENCE * 100)}% t CI across seeds)",
    )
