"""Perplexity-balance frontiers (analysis.stats.frontier): Pareto fronts, their interpolation, the frontier
table and the seed-paired frontier comparison, against brute-force references written here with plain loops
and against scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis.stats import frontier, sensitivity
from gtmoe.errors import ConfigError

from helpers import point, tidy_table

SEEDS = (0, 1, 2)
# Two routers, each tuned over its balance knob: a sweep of four and one of three values.
SWEEPS = {
    "lb": dict(base="topk", router="topk", option="alpha", values=(0.0, 0.01, 0.1, 1.0)),
    "rd": dict(base="rdesi", router="rdesi", option="gamma", values=(0.0, 0.5, 1.0)),
}


def make_design() -> list[dict]:
    return [
        point(
            sweep=sweep,
            base=s["base"],
            router=s["router"],
            option=s["option"],
            value=v,
            variant=f"{sweep}{v:g}",
            term=None,
        )
        for sweep, s in SWEEPS.items()
        for v in s["values"]
    ]


def random_values(rng: np.random.Generator, seeds=SEEDS) -> dict[str, dict[str, dict[int, float]]]:
    """Per design variant: a stronger knob buys balance (lower Gini) with perplexity, plus seed noise large
    enough that some points are dominated on some seeds."""
    values = {}
    for sweep, s in SWEEPS.items():
        offset = 0.0 if sweep == "lb" else -1.5
        for i, v in enumerate(s["values"]):
            strength = i / (len(s["values"]) - 1)
            gini = {seed: 0.45 - 0.35 * strength + rng.normal(0, 0.04) for seed in seeds}
            values[f"{sweep}{v:g}"] = {
                "ppl": {seed: 100 + offset + 12 * strength + rng.normal(0, 2.5) for seed in seeds},
                "gini": gini,
                "maxvio_global": {seed: 2 * g + rng.normal(0, 0.05) for seed, g in gini.items()},
                "maxvio_batch": {seed: 3 * g + rng.normal(0, 0.05) for seed, g in gini.items()},
            }
    return values


def full_tidy(rng: np.random.Generator, splits=("validation", "test")) -> pd.DataFrame:
    return pd.concat([tidy_table(random_values(rng), split=split) for split in splits], ignore_index=True)


# --------------------------------------------------------------------------- brute-force references


def brute_front(x, y) -> list[tuple[float, float]]:
    """Non-dominated distinct finite points by an O(n²) dominance check, sorted by x."""
    points = {(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)}
    front = [
        p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points)
    ]
    return sorted(front)


def brute_at(front: list[tuple[float, float]], level: float) -> float:
    """The front's y at one level: find the segment by looping, interpolate by hand."""
    if not front or level < front[0][0] or level > front[-1][0]:
        return math.nan
    if len(front) == 1:
        return front[0][1]
    for (x0, y0), (x1, y1) in zip(front[:-1], front[1:]):
        if x0 <= level <= x1:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    raise AssertionError("level inside the range but in no segment")


def brute_gaps(values, n_levels=21, metric="gini") -> dict[int, tuple[float, float, float]]:
    """Per seed on both curves: (lo, hi, gap lb − rd) with plain loops over `values` ({variant: {metric: {seed}}})."""
    curves = {}
    for sweep, s in SWEEPS.items():
        per_seed = {}
        for v in s["values"]:
            variant = f"{sweep}{v:g}"
            for seed, ppl in values[variant].get("ppl", {}).items():
                x = values[variant].get(metric, {}).get(seed, math.nan)
                per_seed.setdefault(seed, []).append((x, ppl))
        fronts = {}
        for seed, pts in per_seed.items():
            front = brute_front([p[0] for p in pts], [p[1] for p in pts])
            if front:
                fronts[seed] = front
        curves[sweep] = fronts
    result = {}
    for seed in sorted(curves["lb"]):
        if seed not in curves["rd"]:
            continue
        fa, fb = curves["lb"][seed], curves["rd"][seed]
        lo, hi = max(fa[0][0], fb[0][0]), min(fa[-1][0], fb[-1][0])
        if lo > hi:
            result[seed] = (lo, hi, math.nan)
            continue
        levels = [lo] if lo == hi else [lo + (hi - lo) * k / (n_levels - 1) for k in range(n_levels)]
        diffs = [brute_at(fa, lv) - brute_at(fb, lv) for lv in levels]
        result[seed] = (lo, hi, sum(diffs) / len(diffs))
    return result


# --------------------------------------------------------------------------- fronts


def test_pareto_front_matches_brute_force_on_random_clouds():
    rng = np.random.default_rng(0)
    sizes_seen = set()
    for trial in range(300):
        n = int(rng.integers(0, 25))
        # Rounded to one decimal for many ties in x, in y and of whole points; some NaNs in either coordinate.
        x, y = np.round(rng.random(n), 1), np.round(rng.random(n), 1)
        if trial % 3 == 0 and n:
            x[rng.random(n) < 0.2] = np.nan
            y[rng.random(n) < 0.2] = np.nan
        xs, ys = frontier.pareto_front(x, y)
        expected = brute_front(x, y)
        assert list(zip(xs.tolist(), ys.tolist())) == expected, (trial, x, y)
        assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) < 0)
        sizes_seen.add(len(expected))
    assert {0, 1} <= sizes_seen and max(sizes_seen) >= 4  # empty, one-point and long fronts all exercised


def test_pareto_front_ties_and_nans_by_hand():
    xs, ys = frontier.pareto_front([1, 1, 2, 2, 0.5, np.nan, 3, 1], [5, 5, 4, 6, 9, 0, 4, 5])
    assert xs.tolist() == [0.5, 1.0, 2.0] and ys.tolist() == [9.0, 5.0, 4.0]  # (3, 4): dominated by (2, 4)
    assert [a.size for a in frontier.pareto_front([np.nan], [1.0])] == [0, 0]
    with pytest.raises(ValueError, match="differ in length"):
        frontier.pareto_front([1, 2], [1])


def test_front_at_matches_brute_force_interpolation():
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(1, 8))
        front = brute_front(rng.random(n), rng.random(n))
        xs, ys = np.array([p[0] for p in front]), np.array([p[1] for p in front])
        # Inside, outside and exactly at the front points.
        levels = np.concatenate([rng.uniform(-0.2, 1.2, 30), xs])
        got = frontier.front_at(xs, ys, levels)
        expected = np.array([brute_at(front, lv) for lv in levels])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
        assert np.isnan(got[(levels < xs[0]) | (levels > xs[-1])]).all()
        assert np.isfinite(got[(levels >= xs[0]) & (levels <= xs[-1])]).all()


def test_front_at_one_point_empty_and_invalid_fronts():
    got = frontier.front_at([0.3], [7.0], [0.2, 0.3, 0.3000001, 1.0])
    assert got[1] == 7.0 and np.isnan(got[[0, 2, 3]]).all()
    assert np.isnan(frontier.front_at([], [], [0.0, 1.0])).all()
    np.testing.assert_allclose(frontier.front_at([0, 1], [10, 0], [0, 0.25, 1]), [10, 7.5, 0])
    with pytest.raises(ValueError, match="increase strictly"):
        frontier.front_at([1, 0], [0, 1], [0.5])
    with pytest.raises(ValueError, match="one length"):
        frontier.front_at([0, 1], [1], [0.5])


# --------------------------------------------------------------------------- frontier table


def test_frontier_table_matches_scipy_in_design_order_and_keeps_missing_metrics():
    rng = np.random.default_rng(2)
    values = random_values(rng)
    del values["rd0.5"]["maxvio_batch"]  # a metric the variant lacks
    values["lb0.1"]["gini"][1] = math.nan  # one seed without a finite value
    design = make_design()
    design_frame = sensitivity.read_design(list(reversed(design)))  # order restored by value within the curve
    tidy = tidy_table(values, split="validation")
    table = frontier.frontier_table(tidy, design_frame, "validation")
    assert list(table.columns) == frontier.FRONTIER_COLUMNS
    metrics = ["ppl", "gini", "maxvio_global", "maxvio_batch"]
    expected_points = [(p["sweep"], p["value"]) for p in design if p["sweep"] == "rd"] + [
        (p["sweep"], p["value"]) for p in design if p["sweep"] == "lb"
    ]
    assert list(zip(table["sweep"], table["value"]))[:: len(metrics)] == expected_points
    assert table["metric"].tolist() == metrics * len(design)
    for row in table.itertuples():
        by_seed = values[row.variant].get(row.metric, {})
        x = np.array([v for v in by_seed.values() if math.isfinite(v)])
        assert row.n == x.size
        if x.size == 0:
            assert (row.variant, row.metric) == ("rd0.5", "maxvio_batch")
            assert np.isnan([row.mean, row.std, row.ci_low, row.ci_high]).all()
            continue
        low, high = sps.t.interval(0.95, df=x.size - 1, loc=x.mean(), scale=sps.sem(x))
        assert row.mean == pytest.approx(x.mean(), rel=1e-12)
        assert row.std == pytest.approx(x.std(ddof=1), rel=1e-12)
        assert (row.ci_low, row.ci_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
    assert table.loc[(table["variant"] == "lb0.1") & (table["metric"] == "gini"), "n"].item() == 2
    # The list form of the design gives the same table; the design's sweep order is the table's.
    pd.testing.assert_frame_equal(frontier.frontier_table(tidy, list(reversed(design)), "validation"), table)
    assert frontier.frontier_table(tidy, design, "validation")["sweep"].iloc[0] == "lb"


def test_frontier_table_rejects_bad_input():
    tidy = tidy_table(random_values(np.random.default_rng(3)))
    with pytest.raises(ConfigError, match="absent from the table"):
        frontier.frontier_table(tidy, [*make_design(), point(sweep="lb", value=5, variant="ghost")], "test")
    with pytest.raises(ConfigError, match="exclude 'ppl'"):
        frontier.frontier_table(tidy, make_design(), "test", balance_metrics=("ppl",))


# --------------------------------------------------------------------------- paired comparison


def test_paired_frontier_comparison_matches_brute_force_and_scipy():
    rng = np.random.default_rng(4)
    values = random_values(rng)
    tidy = tidy_table(values, split="validation")
    design = make_design()
    gaps = frontier.frontier_gaps_per_seed(tidy, design, [("lb", "rd")], "validation")
    expected = brute_gaps(values)
    assert list(gaps.columns) == frontier.GAP_COLUMNS
    assert gaps["seed"].tolist() == list(SEEDS)
    for row in gaps.itertuples():
        lo, hi, gap = expected[row.seed]
        assert (row.overlap_low, row.overlap_high) == (lo, hi)
        assert row.levels == 21 and row.gap == pytest.approx(gap, rel=1e-10, abs=1e-10)
    # Non-degenerate data: fronts of several points, and gaps that differ between seeds.
    assert (gaps["front_a"] >= 2).any() and (gaps["front_b"] >= 2).any() and gaps["gap"].std() > 0.1
    per_seed_gaps = np.array([expected[s][2] for s in SEEDS])

    result = frontier.paired_frontier_comparison(tidy, design, [("lb", "rd")], "validation")
    assert list(result.columns) == frontier.COMPARISON_COLUMNS and len(result) == 1
    row = result.iloc[0]
    assert (row.sweep_a, row.variant_a, row.sweep_b, row.variant_b) == ("lb", "topk", "rd", "rdesi")
    assert (row.split, row.balance_metric, row.n_levels, row.n, row.seeds) == ("validation", "gini", 21, 3, "0,1,2")
    low, high = sps.t.interval(0.95, df=2, loc=per_seed_gaps.mean(), scale=sps.sem(per_seed_gaps))
    assert row.gap_mean == pytest.approx(per_seed_gaps.mean(), rel=1e-10)
    assert row.gap_std == pytest.approx(per_seed_gaps.std(ddof=1), rel=1e-10)
    assert (row.gap_ci_low, row.gap_ci_high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    assert row.overlap_low == pytest.approx(np.mean([expected[s][0] for s in SEEDS]), rel=1e-12)
    assert row.overlap_high == pytest.approx(np.mean([expected[s][1] for s in SEEDS]), rel=1e-12)
    assert row.note == ""

    # The direction is a − b: the reversed pair negates every gap, and another level count changes them.
    reversed_gaps = frontier.frontier_gaps_per_seed(tidy, design, [("rd", "lb")], "validation")
    np.testing.assert_allclose(reversed_gaps["gap"], -gaps["gap"], rtol=1e-12)
    coarse = frontier.frontier_gaps_per_seed(tidy, design, [("lb", "rd")], "validation", n_levels=3)
    expected_coarse = brute_gaps(values, n_levels=3)
    np.testing.assert_allclose(coarse["gap"], [expected_coarse[s][2] for s in SEEDS], rtol=1e-10)
    # Another balance metric is read from its own rows.
    on_maxvio = frontier.frontier_gaps_per_seed(tidy, design, [("lb", "rd")], "validation", "maxvio_global")
    expected_maxvio = brute_gaps(values, metric="maxvio_global")
    np.testing.assert_allclose(on_maxvio["gap"], [expected_maxvio[s][2] for s in SEEDS], rtol=1e-10)


def test_lower_frontier_gives_negative_gap_by_hand():
    # a = b shifted down by 2 perplexity at every balance: the gap is exactly −2 on every seed.
    values = {}
    for sweep, shift in (("lb", -2.0), ("rd", 0.0)):
        for i, v in enumerate(SWEEPS[sweep]["values"]):
            x = 0.1 + 0.3 * i / (len(SWEEPS[sweep]["values"]) - 1)
            values[f"{sweep}{v:g}"] = {
                "ppl": {s: 120 - 50 * x + shift + s for s in SEEDS},
                "gini": {s: x for s in SEEDS},
            }
    result = frontier.paired_frontier_comparison(tidy_table(values), make_design(), [("lb", "rd")], "test")
    row = result.iloc[0]
    assert row.n == 3 and row.gap_mean == pytest.approx(-2.0, abs=1e-9) and row.gap_std == pytest.approx(0, abs=1e-9)
    assert (row.overlap_low, row.overlap_high) == (pytest.approx(0.1), pytest.approx(0.4))


def test_no_overlap_gives_nan_gap_and_a_note_and_unpaired_seeds_are_left_out():
    rng = np.random.default_rng(5)
    values = random_values(rng)
    for v in SWEEPS["rd"]["values"]:
        values[f"rd{v:g}"]["gini"][1] += 5.0  # seed 1: rd's balance range far above lb's
        for metric in values[f"rd{v:g}"].values():
            metric.pop(2)  # seed 2: no rd run at all
    values["lb0"]["ppl"][0] = math.nan  # a point without ppl is not a front point (seed 0 still has others)
    tidy = tidy_table(values)
    design = make_design()
    gaps = frontier.frontier_gaps_per_seed(tidy, design, [("lb", "rd")], "test")
    expected = brute_gaps(values)
    assert gaps["seed"].tolist() == [0, 1] == sorted(expected)
    assert math.isnan(gaps.loc[gaps["seed"] == 1, "gap"].item())
    assert gaps.loc[gaps["seed"] == 1, "levels"].item() == 0
    assert gaps.loc[gaps["seed"] == 1, "overlap_low"].item() > gaps.loc[gaps["seed"] == 1, "overlap_high"].item()
    assert gaps.loc[gaps["seed"] == 0, "gap"].item() == pytest.approx(expected[0][2], rel=1e-10)

    row = frontier.paired_frontier_comparison(tidy, design, [("lb", "rd")], "test").iloc[0]
    assert row.n == 1 and row.seeds == "0"
    assert row.gap_mean == pytest.approx(expected[0][2], rel=1e-10)
    assert np.isnan([row.gap_std, row.gap_ci_low, row.gap_ci_high]).all()
    assert row.overlap_low == gaps.loc[gaps["seed"] == 0, "overlap_low"].item()
    assert "1 seed(s) without overlapping balance ranges" in row.note
    assert "1 seed(s) with a front on one curve only" in row.note
    assert "fewer than 2 seeds: no CI" in row.note

    # No seed overlapping: a row with n = 0 and NaN statistics, not a missing row.
    for v in SWEEPS["rd"]["values"]:
        values[f"rd{v:g}"]["gini"][0] += 5.0
    row = frontier.paired_frontier_comparison(tidy_table(values), design, [("lb", "rd")], "test").iloc[0]
    assert row.n == 0 and row.seeds == "" and math.isnan(row.gap_mean) and math.isnan(row.overlap_low)
    assert "2 seed(s) without overlapping" in row.note and "no seed with overlapping fronts" in row.note


def test_touching_ranges_compare_at_the_single_level():
    # lb's fronts end at Gini 0.5 exactly where rd's begin: one level, the two ends' perplexities.
    values = {}
    for sweep, (x_lo, x_hi, ppl_lo, ppl_hi) in (("lb", (0.25, 0.5, 120, 101)), ("rd", (0.5, 1.0, 110, 90))):
        n = len(SWEEPS[sweep]["values"])
        for i, v in enumerate(SWEEPS[sweep]["values"]):
            t = i / (n - 1)
            values[f"{sweep}{v:g}"] = {
                "gini": {s: x_lo + (x_hi - x_lo) * t for s in SEEDS},
                "ppl": {s: ppl_lo + (ppl_hi - ppl_lo) * t + s for s in SEEDS},
            }
    gaps = frontier.frontier_gaps_per_seed(tidy_table(values), make_design(), [("lb", "rd")], "test")
    assert gaps["levels"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(gaps["gap"], [101 - 110] * 3)


def test_one_point_front_is_compared_at_its_own_balance():
    # On every seed one lb point dominates the others: lb's front is that point, read at its Gini only.
    values = {}
    for sweep, n in (("lb", 4), ("rd", 3)):
        for i, v in enumerate(SWEEPS[sweep]["values"]):
            if sweep == "lb":
                gini, ppl = (0.5, 100.0) if i == 1 else (0.5 + 0.25 * i, 110.0 + i)
            else:
                gini, ppl = 0.25 + 0.5 * i / (n - 1), 120.0 - 8 * i  # rd: (0.25, 120), (0.5, 112), (0.75, 104)
            values[f"{sweep}{v:g}"] = {"gini": {s: gini for s in SEEDS}, "ppl": {s: ppl + s for s in SEEDS}}
    gaps = frontier.frontier_gaps_per_seed(tidy_table(values), make_design(), [("lb", "rd")], "test")
    assert gaps["front_a"].tolist() == [1, 1, 1] and gaps["front_b"].tolist() == [3, 3, 3]
    assert gaps["levels"].tolist() == [1, 1, 1] and (gaps["overlap_low"] == 0.5).all()
    np.testing.assert_allclose(gaps["gap"], [100.0 - 112.0] * 3)
    row = frontier.paired_frontier_comparison(tidy_table(values), make_design(), [("lb", "rd")], "test").iloc[0]
    assert row.n == 3 and row.gap_mean == pytest.approx(-12.0) and row.note == ""


def test_other_splits_and_layers_change_nothing():
    rng = np.random.default_rng(6)
    tidy = full_tidy(rng)
    design = make_design()
    # Per-layer rows of the chosen split, with values nothing should read.
    layer_rows = tidy[tidy["split"] == "validation"].assign(layer="0", value=1e6)
    base = pd.concat([tidy, layer_rows], ignore_index=True)
    changed = base.copy()
    on_test = changed["split"] == "test"
    changed.loc[on_test, "value"] = changed.loc[on_test, "value"] * 10 + rng.normal(0, 1, on_test.sum())
    outputs = [
        lambda t: frontier.frontier_table(t, design, "validation"),
        lambda t: frontier.frontier_gaps_per_seed(t, design, [("lb", "rd"), ("rd", "lb")], "validation"),
        lambda t: frontier.paired_frontier_comparison(t, design, [("lb", "rd"), ("rd", "lb")], "validation"),
    ]
    for output in outputs:
        pd.testing.assert_frame_equal(output(base), output(changed))
        # ... while the same change on the split read does change the output (the check can fail).
        changed_here = base.copy()
        on_validation = (changed_here["split"] == "validation") & (changed_here["layer"] == "all")
        changed_here.loc[on_validation, "value"] = changed_here.loc[on_validation, "value"] * 10
        assert not output(base).equals(output(changed_here))


@pytest.mark.parametrize(
    "pairs, kwargs, message",
    [
        ([("lb", "nope")], {}, "sweep 'nope', not in the design"),
        ([("lb", "lb")], {}, "with itself"),
        ([("lb",)], {}, "pair 0 must be two sweep names"),
        ([("lb", "grid")], {}, "sweep 'grid' has 2 curves"),
        ([("lb", "rd")], dict(balance_metric="ppl"), "cannot be 'ppl'"),
        ([("lb", "rd")], dict(n_levels=1), "n_levels must be an integer ≥ 2"),
    ],
)
def test_paired_frontier_comparison_rejects_bad_input(pairs, kwargs, message):
    values = random_values(np.random.default_rng(7))
    grid = [
        point(sweep="grid", option="beta", value=1, variant="lb0", fixed="gamma=0", term=None),
        point(sweep="grid", option="beta", value=1, variant="lb1", fixed="gamma=1", term=None),
    ]
    for function in (frontier.paired_frontier_comparison, frontier.frontier_gaps_per_seed):
        with pytest.raises(ConfigError, match=message):
            function(tidy_table(values), [*make_design(), *grid], pairs, "test", **kwargs)


def test_the_frontier_figure_draws_one_curve_per_option_where_two_options_share_values(tmp_path, monkeypatch):
    """A one-at-a-time sweep of two secondary knobs (beta and c, both tried at 0 and 1) beside a tuned knob: each
    option is its own curve, ringed where the rule chose it (the values coincide, so a curve per sweep cannot be
    drawn)."""
    from analysis.figures import frontier as frontier_figure

    design = [point(sweep="tune_rd", option="gamma", value=v, variant=f"rd-gamma{v:g}", term=None) for v in (0, 1)]
    design += [
        point(sweep="terms", option=option, value=v, variant=f"rd-{option}{v:g}", term=None)
        for option in ("beta", "c")
        for v in (0, 1)
    ]
    rng = np.random.default_rng(0)
    values = {
        p["variant"]: {
            m: {s: rng.uniform(0.1, 0.5) + (m == frontier.PPL) * 50 for s in SEEDS}
            for m in (frontier.PPL, *frontier.BALANCE_METRICS)
        }
        for p in design
    }
    table = frontier.frontier_table(tidy_table(values, split="validation"), design, "validation")
    chosen = pd.DataFrame([dict(sweep="terms", option="c", fixed="", value=1.0)])
    drawn = {}
    monkeypatch.setattr(frontier_figure, "finish_figure", lambda fig, path, title: drawn.setdefault("fig", fig))
    frontier_figure.plot_frontier(table, tmp_path / "frontier.png", frontier.BALANCE_METRICS, chosen)
    for ax in drawn["fig"].axes[: len(frontier.BALANCE_METRICS)]:
        labels = [c.get_label() for c in ax.containers]
        assert labels == ["rdesi (gamma)", "rdesi (beta)", "rdesi (c)"]  # the base variant (helpers.point)
        styles = [c.lines[0].get_linestyle() for c in ax.containers]
        assert styles == ["-", "--", ":"]
        rings = [line for line in ax.lines if line.get_markersize() == 11]
        assert len(rings) == 1  # the chosen c = 1 only, not beta = 1
        x, y = rings[0].get_xdata()[0], rings[0].get_ydata()[0]
        at = table[(table["variant"] == "rd-c1")].set_index("metric")["mean"]
        assert y == pytest.approx(at["ppl"]) and x in set(at.drop("ppl"))
