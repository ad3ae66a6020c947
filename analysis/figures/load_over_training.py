"""Expert load over training as a picture: per routed variant and MoE layer, an expert × step heatmap of each
expert's relative load, so that collapse (a few experts taking the batch) and recovery can be seen.

Method. At each logged step the router log holds, per MoE layer, the share ``f_i`` of the training batch's
assignments that expert i received; the relative load is ``E · f_i`` (1 = balanced share, 0 = unused, E = one
expert took the whole batch), with ``f_i`` renormalised over the step's experts so that it sums to E exactly. Two views:

- one run as it happened: the lowest seed of the variant, experts by their index;
- the mean over seeds with experts sorted by load: at each step the experts of each run and layer are ranked
  (rank 1 = the most loaded, as in the layer × expert heatmap) and the relative load of each rank is averaged
  over the seeds logging that step.
  Expert indices are arbitrary labels that differ between seeds, so only the sorted view can be averaged.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from analysis.collect import variant_order
from analysis.figures.canvas import message_figure, save_figure

TITLE = "Expert load over training"
MAX_LAYERS = 6  # layers drawn per variant; more would make the panels too narrow to read
MAX_FULL_VARIANTS = 12  # above this many routed variants only the first MoE layer is drawn

RUN_STEP = ["variant", "seed", "step", "layer"]


def load_over_training(router_log: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two views of the figure from the router logs (``collect.load_router_logs``).

    Returns ``(per_seed, sorted_mean)``:

    - ``per_seed``: ``variant, seed, step, layer, expert, relative_load`` for the lowest seed of each variant;
    - ``sorted_mean``: ``variant, layer, step, rank, relative_load, n_seeds``, the relative load of the rank-th
      most loaded expert (rank 1 = busiest) of each run, layer and step, averaged over the ``n_seeds`` seeds.

    Only variants with router-log rows appear, as an ordered categorical in study order; rows are sorted.
    """
    loads = router_log.loc[np.isfinite(router_log["load"].to_numpy(dtype=float)), [*RUN_STEP, "expert", "load"]]
    present = set(loads["variant"].astype(str))
    variants = [v for v in variant_order(router_log) if v in present]
    loads = loads.astype({"seed": int, "step": int, "layer": int, "expert": int, "load": float}).assign(
        variant=pd.Categorical(loads["variant"].astype(str), categories=variants, ordered=True)
    )
    batch = loads.groupby(RUN_STEP, observed=True)["load"]
    loads["relative_load"] = loads["load"] / batch.transform("sum") * batch.transform("size")

    lowest = loads.groupby("variant", observed=True)["seed"].transform("min")
    per_seed = loads.loc[loads["seed"] == lowest, [*RUN_STEP, "expert", "relative_load"]]
    per_seed = per_seed.sort_values([*RUN_STEP, "expert"]).reset_index(drop=True)

    # Rank within each run, layer and step before averaging: expert labels do not correspond across seeds.
    ranks = loads.groupby(RUN_STEP, observed=True)["relative_load"].rank(ascending=False, method="first")
    sorted_mean = (
        loads.assign(rank=ranks.astype(int))
        .groupby(["variant", "layer", "step", "rank"], observed=True)
        .agg(relative_load=("relative_load", "mean"), n_seeds=("seed", "nunique"))
        .reset_index()
    )
    return per_seed, sorted_mean


def _shown_layers(layers: list[int], n_variants: int) -> list[int]:
    """The MoE layers drawn: all of them, at most MAX_LAYERS spread from first to last, only the first when
    there are many variants."""
    if n_variants > MAX_FULL_VARIANTS:
        return layers[:1]
    if len(layers) <= MAX_LAYERS:
        return layers
    return [layers[i] for i in np.linspace(0, len(layers) - 1, MAX_LAYERS).round().astype(int)]


def _edges(values: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres: halfway between neighbours, half a gap beyond the ends (steps need not
    be evenly spaced, e.g. the final step)."""
    if len(values) == 1:
        return np.array([values[0] - 0.5, values[0] + 0.5])
    middle = (values[1:] + values[:-1]) / 2
    return np.concatenate([[2 * values[0] - middle[0]], middle, [2 * values[-1] - middle[-1]]])


def _heatmap(ax: plt.Axes, part: pd.DataFrame, slot: str, norm: TwoSlopeNorm, title: str, ylabel: str) -> None:
    """Relative load of ``part`` as a ``slot`` × step heatmap on ``ax`` (a note when ``part`` is empty: a layer
    this variant does not route)."""
    ax.set_title(title, fontsize=8)
    if part.empty:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.35")
        return
    matrix = part.pivot(index=slot, columns="step", values="relative_load").sort_index().sort_index(axis=1)
    steps, slots = matrix.columns.to_numpy(dtype=float), matrix.index.to_numpy(dtype=float)
    ax.pcolormesh(
        _edges(steps), _edges(slots), np.ma.masked_invalid(matrix.to_numpy(dtype=float)), cmap="RdBu_r", norm=norm
    )
    ax.set_facecolor("0.8")  # a cell nothing was logged for is grey, not white (= balanced)
    ax.grid(False)
    ax.invert_yaxis()  # expert 0 / rank 1 on top
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.tick_params(labelsize=7)
    ax.set_ylabel(ylabel, fontsize=8)


def plot_load_over_training(router_log: pd.DataFrame, path: str | Path) -> Path:
    """Expert × training-step heatmaps of the relative load ``E · f_i`` of the training batch: one row per routed
    variant (study order), two panels per MoE layer: the lowest seed as it happened (experts by index) and the
    mean over seeds with experts sorted by load (``load_over_training``). Diverging around 1 (balanced) as the
    other load heatmaps: red = over-used, blue = under-used, grey = not logged."""
    per_seed, sorted_mean = load_over_training(router_log)
    if per_seed.empty:
        return message_figure(path, TITLE, "no router logs (no routed variant)")
    variants = variant_order(per_seed)
    all_layers = sorted(set(per_seed["layer"]))
    layers = _shown_layers(all_layers, len(variants))
    columns = 2 * len(layers)
    panel_width = min(3.6, max(2.4, 28 / columns))
    # Taller rows for more experts, shorter ones for many variants (the figure stays within ~40 inches).
    row_height = min(2.8, 0.04 * per_seed["expert"].nunique() + 1.5, max(1.4, 40 / len(variants)))
    width, height = panel_width * columns + 1.0, row_height * len(variants) + 0.8
    fig, axes = plt.subplots(len(variants), columns, squeeze=False, figsize=(width, height), layout="constrained")
    # One scale for every panel so colours compare across variants; at least 0–2 so a balanced study is not
    # drawn in saturated colours.
    vmax = max(2.0, float(per_seed["relative_load"].max()), float(sorted_mean["relative_load"].max()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    for row_axes, variant in zip(axes, variants):
        run = per_seed[per_seed["variant"] == variant]
        mean = sorted_mean[sorted_mean["variant"] == variant]
        seed, n_seeds = int(run["seed"].iloc[0]), int(mean["n_seeds"].max())
        for i, layer in enumerate(layers):
            seed_ax, mean_ax = row_axes[2 * i], row_axes[2 * i + 1]
            label = f"{variant}, layer {layer}"
            seeds = f"mean of {n_seeds} seed{'s' if n_seeds != 1 else ''}, sorted by load"
            _heatmap(seed_ax, run[run["layer"] == layer], "expert", norm, f"{label}\nseed {seed}", "expert")
            _heatmap(mean_ax, mean[mean["layer"] == layer], "rank", norm, f"{label}\n{seeds}", "rank (1 = busiest)")
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=8)
    scale = ScalarMappable(norm=norm, cmap="RdBu_r")
    # Colour bar sizes in inches (matplotlib's are fractions of the whole grid): close to the panels, at most
    # ~4.5 inches tall however many variants.
    fig.colorbar(
        scale,
        ax=axes.ravel().tolist(),
        pad=0.15 / width,
        fraction=0.4 / width,
        shrink=min(0.8, 4.5 / height),
        label="relative load E·f (1 = balanced)",
    )
    if layers == all_layers:
        shown = ""
    elif len(variants) > MAX_FULL_VARIANTS:
        shown = f"; first MoE layer only ({len(variants)} variants)"
    else:
        shown = f"; layers {', '.join(map(str, layers))} of {len(all_layers)}"
    fig.suptitle(f"{TITLE} (training batch, relative load E·f per logged step{shown})", fontsize=11)
    return save_figure(fig, path)
