"""Perplexity-balance frontiers of the routers tuned over their balance knob, and seed-paired comparisons of
two routers' frontiers.

A router's balance knob trades perplexity for load balance: one value of the knob is one point, and a single
point says little about the router, since another value moves it along the trade-off. A sweep of the knob
(the sweep design of ``analysis.stats.sensitivity``, one row per point) traces the router's *curve*, one per
(sweep, option, fixed) as there; in this use every sweep has one curve (its option is the router's balance
knob). Two routers are compared by their *frontiers*: what perplexity each reaches at the same balance.

Method
------
* ``frontier_table``: per point and metric (perplexity and the balance metrics) the mean over seeds with its
  Student t CI (``analysis.stats.describe``), on one split at model level; the points to plot.
* Per seed, a curve's *front* is the Pareto front of its points ``(balance, ppl)``, both minimised
  (``pareto_front``): the points no other point of the seed beats on both. Points without a finite value of
  either metric are left out; a seed counts for a curve when its front has a point.
* Per seed on both curves ``a`` and ``b``: the fronts are compared over the balance range both reach,
  ``[lo, hi] = [max(min_a, min_b), min(max_a, max_b)]`` of their balance values, at ``n_levels`` evenly spaced
  levels (the one level ``lo`` when ``lo == hi``), each front read by linear interpolation between its
  consecutive points (``front_at``). The seed's gap is the mean over the levels of ``ppl_a − ppl_b``:
  **a − b**, so a negative gap means ``a`` reaches lower perplexity at matched balance. Without overlap
  (``lo > hi``) the fronts are not compared at any balance and the seed's gap is NaN.
  Pairing by seed (the two routers' runs of one seed share data order and initialisation) removes the
  seed-to-seed spread both curves share.
* Over the seeds with a finite gap: n, mean gap, std and the t CI (``describe``), and the mean overlap range.
  No interpolation beyond a front's ends: a balance that one router does not reach on a seed is no evidence.
* Only the rows of the given split are read (a choice made on validation is never informed by test).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from analysis.collect import MODEL_LEVEL, variant_order
from analysis.stats import CONFIDENCE, describe, per_seed
from analysis.stats.sensitivity import CURVE, design_order, read_design
from gtmoe.errors import ConfigError

PPL = "ppl"  # the frontier's y: lower is better
BALANCE_METRICS = ("gini", "maxvio_global", "maxvio_batch")  # its possible x: lower is more balanced
N_LEVELS = 21  # balance levels at which two fronts are compared
FRONTIER_COLUMNS = [
    "sweep",
    "base",
    "router",
    "option",
    "fixed",
    "value",
    "variant",
    "split",
    "metric",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
]
PAIR_COLUMNS = ["sweep_a", "variant_a", "sweep_b", "variant_b", "split", "balance_metric"]
GAP_COLUMNS = [*PAIR_COLUMNS, "seed", "front_a", "front_b", "overlap_low", "overlap_high", "levels", "gap"]
COMPARISON_COLUMNS = [
    *PAIR_COLUMNS,
    "n_levels",
    "n",
    "seeds",
    "gap_mean",
    "gap_std",
    "gap_ci_low",
    "gap_ci_high",
    "overlap_low",
    "overlap_high",
    "note",
]


# --------------------------------------------------------------------------- fronts


def pareto_front(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated points of ``(x, y)`` when both are minimised, by increasing x (y strictly decreasing).

    A point is dominated when another is no larger in both coordinates and smaller in one. Points with a
    non-finite coordinate are dropped; identical points are kept once.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} and {y.size}")
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    order = np.lexsort((y, x))  # by x, then y: the first point of each x is its lowest
    x, y = x[order], y[order]
    # Along increasing x a point is on the front exactly when its y is below every y before it (a point
    # before it has x no larger; an equal y, a repeat included, means it is dominated or the same point).
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], y[:-1]])) if y.size else y
    keep = y < best_before
    return x[keep], y[keep]


def front_at(xs: Sequence[float], ys: Sequence[float], levels: Sequence[float]) -> np.ndarray:
    """The front's y at each level, linear between consecutive front points; NaN outside ``[xs[0], xs[-1]]``.

    ``xs`` must increase strictly (as ``pareto_front`` returns it). A one-point front has its y at its x
    only; an empty front is NaN everywhere.
    """
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    levels = np.asarray(levels, dtype=float)
    if xs.ndim != 1 or xs.shape != ys.shape:
        raise ValueError(f"a front is two 1-d arrays of one length, got shapes {xs.shape} and {ys.shape}")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise ValueError("a front has finite coordinates only")
    if np.any(np.diff(xs) <= 0):
        raise ValueError("a front's x must increase strictly")
    if xs.size == 0:
        return np.full(levels.shape, np.nan)
    if xs.size == 1:
        return np.where(levels == xs[0], ys[0], np.nan)
    # np.interp would hold the end values constant outside the range: a balance the router never reached.
    return np.interp(levels, xs, ys, left=np.nan, right=np.nan)


# --------------------------------------------------------------------------- design and data


def _as_design(design: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    return design if isinstance(design, pd.DataFrame) else read_design(design)


def _check_variants(tidy: pd.DataFrame, design: pd.DataFrame) -> None:
    # Against every variant of the table (names only, no values): a design point without runs is a typo or a
    # missing run, not a point without data on this split.
    unknown = sorted(set(design["variant"]) - set(variant_order(tidy)))
    if unknown:
        raise ConfigError(f"sweep design names variants absent from the table: {unknown}")


def _model_rows(tidy: pd.DataFrame, split: str, metrics: Sequence[str]) -> pd.DataFrame:
    """The model-level rows of ``split`` and ``metrics``: the only rows any statistic here reads."""
    return tidy[(tidy["layer"] == MODEL_LEVEL) & (tidy["split"] == split) & tidy["metric"].isin(list(metrics))]


def frontier_table(
    tidy: pd.DataFrame,
    design: pd.DataFrame | Sequence[dict],
    split: str,
    balance_metrics: Sequence[str] = BALANCE_METRICS,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """One row per design point and metric (``ppl``, then ``balance_metrics``): n seeds, mean, std and t CI
    over the seeds' values on ``split`` at model level, points in design order (``FRONTIER_COLUMNS``).

    A metric a variant lacks keeps its row, with n = 0 and NaN statistics.
    """
    balance_metrics = list(balance_metrics)
    if PPL in balance_metrics or len(set(balance_metrics)) != len(balance_metrics):
        raise ConfigError(f"balance metrics must be distinct and exclude {PPL!r}, got {balance_metrics}")
    design = _as_design(design)
    _check_variants(tidy, design)
    metrics = [PPL, *balance_metrics]
    rows_of_split = _model_rows(tidy, split, metrics)
    rows = [
        dict(
            point,
            split=split,
            metric=metric,
            **describe(per_seed(rows_of_split, point["variant"], metric, split), confidence),
        )
        for point in design_order(design).to_dict("records")
        for metric in metrics
    ]
    return pd.DataFrame(rows, columns=FRONTIER_COLUMNS)


def _curve_of(design: pd.DataFrame, sweep: str) -> pd.DataFrame:
    """The one curve of ``sweep``: a pair names sweeps, so a sweep of several curves is ambiguous."""
    rows = design[design["sweep"] == sweep]
    if rows.empty:
        raise ConfigError(f"frontier pair names sweep {sweep!r}, not in the design {sorted(set(design['sweep']))}")
    curves = rows.groupby(CURVE, sort=False).ngroups
    if curves != 1:
        raise ConfigError(
            f"sweep {sweep!r} has {curves} curves (options or fixed values): a frontier needs one balance knob"
        )
    return rows


def _seed_fronts(rows_of_split: pd.DataFrame, curve: pd.DataFrame, split: str, balance_metric: str) -> dict:
    """Per seed with a front point: the Pareto front ``(xs, ys)`` of the curve's points (balance, ppl)."""
    by_variant = [
        pd.concat(
            {
                "x": per_seed(rows_of_split, variant, balance_metric, split),
                "y": per_seed(rows_of_split, variant, PPL, split),
            },
            axis=1,
        )
        for variant in curve["variant"]
    ]
    points = pd.concat(by_variant)
    fronts = {}
    for seed, seed_points in points.groupby(level=0, sort=True):
        xs, ys = pareto_front(seed_points["x"].to_numpy(), seed_points["y"].to_numpy())
        if xs.size:
            fronts[seed] = (xs, ys)
    return fronts


def _levels(lo: float, hi: float, n_levels: int) -> np.ndarray:
    if lo > hi:
        return np.empty(0)
    # linspace returns lo and hi exactly at its ends, so both fronts are defined at every level.
    return np.array([lo]) if lo == hi else np.linspace(lo, hi, n_levels)


def _pair_gaps(
    tidy: pd.DataFrame,
    design: pd.DataFrame | Sequence[dict],
    pairs: Sequence[tuple[str, str]],
    split: str,
    balance_metric: str,
    n_levels: int,
) -> Iterator[tuple[dict, list[dict], int]]:
    """Per pair: its key columns, its per-seed gap rows (seeds on both curves) and how many seeds only one
    curve has."""
    if balance_metric == PPL:
        raise ConfigError(f"the balance metric is the frontier's x and cannot be {PPL!r}")
    if isinstance(n_levels, bool) or not isinstance(n_levels, (int, np.integer)) or n_levels < 2:
        raise ConfigError(f"n_levels must be an integer ≥ 2, got {n_levels!r}")
    design = _as_design(design)
    _check_variants(tidy, design)
    rows_of_split = _model_rows(tidy, split, [PPL, balance_metric])
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ConfigError(f"frontier pair {i} must be two sweep names, got {pair!r}")
        sweep_a, sweep_b = pair
        if sweep_a == sweep_b:
            raise ConfigError(f"frontier pair {i} compares sweep {sweep_a!r} with itself")
        curve_a, curve_b = _curve_of(design, sweep_a), _curve_of(design, sweep_b)
        key = dict(
            sweep_a=sweep_a,
            variant_a=curve_a["base"].iloc[0],
            sweep_b=sweep_b,
            variant_b=curve_b["base"].iloc[0],
            split=split,
            balance_metric=balance_metric,
        )
        fronts_a = _seed_fronts(rows_of_split, curve_a, split, balance_metric)
        fronts_b = _seed_fronts(rows_of_split, curve_b, split, balance_metric)
        rows = []
        for seed in sorted(set(fronts_a) & set(fronts_b)):
            (xa, ya), (xb, yb) = fronts_a[seed], fronts_b[seed]
            lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
            levels = _levels(lo, hi, n_levels)
            gap = float(np.mean(front_at(xa, ya, levels) - front_at(xb, yb, levels))) if levels.size else math.nan
            rows.append(
                dict(
                    key,
                    seed=seed,
                    front_a=xa.size,
                    front_b=xb.size,
                    overlap_low=float(lo),
                    overlap_high=float(hi),
                    levels=levels.size,
                    gap=gap,
                )
            )
        yield key, rows, len(set(fronts_a) ^ set(fronts_b))


# --------------------------------------------------------------------------- comparisons


def frontier_gaps_per_seed(
    tidy: pd.DataFrame,
    design: pd.DataFrame | Sequence[dict],
    pairs: Sequence[tuple[str, str]],
    split: str,
    balance_metric: str = "gini",
    n_levels: int = N_LEVELS,
) -> pd.DataFrame:
    """Per pair ``(sweep_a, sweep_b)`` and seed on both curves: the sizes of the two fronts, their overlap
    ``[overlap_low, overlap_high]`` in ``balance_metric`` (low > high: none), the number of levels compared
    and the mean gap ``ppl_a − ppl_b`` over them (NaN without overlap); ``GAP_COLUMNS``, pairs in the given
    order, seeds increasing."""
    rows = [
        row for _, pair_rows, _ in _pair_gaps(tidy, design, pairs, split, balance_metric, n_levels) for row in pair_rows
    ]
    return pd.DataFrame(rows, columns=GAP_COLUMNS)


def paired_frontier_comparison(
    tidy: pd.DataFrame,
    design: pd.DataFrame | Sequence[dict],
    pairs: Sequence[tuple[str, str]],
    split: str,
    balance_metric: str = "gini",
    n_levels: int = N_LEVELS,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """One row per pair ``(sweep_a, sweep_b)``: the seed-paired frontier gap ``a − b`` at matched
    ``balance_metric`` (``frontier_gaps_per_seed``) over the seeds with a finite gap, its n, seeds, mean, std
    and t CI, and the mean overlap range; ``COMPARISON_COLUMNS``. ``variant_a`` / ``variant_b`` are the
    sweeps' base variants. The note counts the seeds left out (no overlap, on one curve only) and says why a
    statistic is NaN.
    """
    rows = []
    for key, pair_rows, one_curve in _pair_gaps(tidy, design, pairs, split, balance_metric, n_levels):
        gaps = pd.DataFrame(pair_rows, columns=GAP_COLUMNS)
        compared = gaps[np.isfinite(gaps["gap"].to_numpy(dtype=float))]
        summary = describe(compared["gap"].to_numpy(dtype=float), confidence)
        notes = []
        no_overlap = len(gaps) - len(compared)
        if no_overlap:
            notes.append(f"{no_overlap} seed(s) without overlapping balance ranges")
        if one_curve:
            notes.append(f"{one_curve} seed(s) with a front on one curve only: not paired")
        if summary["n"] == 0:
            notes.append("no seed with overlapping fronts on both curves")
        elif summary["n"] == 1:
            notes.append("fewer than 2 seeds: no CI")
        n = summary["n"]
        rows.append(
            dict(
                key,
                n_levels=n_levels,
                n=n,
                seeds=",".join(str(s) for s in compared["seed"]),
                gap_mean=summary["mean"],
                gap_std=summary["std"],
                gap_ci_low=summary["ci_low"],
                gap_ci_high=summary["ci_high"],
                overlap_low=float(compared["overlap_low"].mean()) if n else math.nan,
                overlap_high=float(compared["overlap_high"].mean()) if n else math.nan,
                note="; ".join(notes),
            )
        )
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
