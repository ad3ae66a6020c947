"""Statistics and collection of the analysis stage, against scipy and hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import RUN_FAILED, RUN_MISSING, RUN_OK, collect, stats
from analysis.record import Record
from gtmoe.errors import ConfigError, DataError

from helpers import make_router_log, study_record, write_run

# t quantile t(0.975, 4) from printed tables, so the CI test does not just re-run scipy.
T_975_DF4 = 2.7764451051977987
LEVELS = dict(alpha=0.05, power=0.8)  # the study's level and power (gtmoe.study's defaults)
PRIMARY = ["ppl", "gini", "maxvio_global"]


def tidy_from(values: dict[str, dict[int, float]], metric: str = "ppl", split: str = "test") -> pd.DataFrame:
    """A minimal tidy table: ``{variant: {seed: value}}``."""
    rows = [
        dict(variant=v, seed=s, split=split, metric=metric, layer="all", value=x, source="x", run_status=RUN_OK)
        for v, by_seed in values.items()
        for s, x in by_seed.items()
    ]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- descriptives


def test_t_interval_matches_hand_formula():
    low, high = stats.t_confidence_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)  # s² = 2.5 with ddof = 1
    assert low == pytest.approx(3 - half, rel=1e-12)
    assert high == pytest.approx(3 + half, rel=1e-12)


def test_t_interval_of_constant_values_is_the_point():
    assert stats.t_confidence_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


@pytest.mark.parametrize("values", [[], [7.0], [7.0, math.nan, math.inf]])
def test_describe_below_two_values_is_nan_not_zero(values):
    result = stats.describe(values)
    finite = [v for v in values if math.isfinite(v)]
    assert result["n"] == len(finite)
    assert math.isnan(result["std"]) and math.isnan(result["ci_low"]) and math.isnan(result["ci_high"])
    assert math.isnan(result["mean"]) if not finite else result["mean"] == finite[0]


def test_summarize_counts_seeds_keeps_undefined_metrics_and_order():
    tidy = pd.concat(
        [
            tidy_from({"topk": {0: 10.0, 1: 12.0, 2: 14.0}, "lossfree": {0: 11.0}}),
            tidy_from({"dense": {0: math.nan, 1: math.nan}, "topk": {0: 0.2, 1: 0.3}}, "gini"),
        ]
    )
    tidy["variant"] = pd.Categorical(tidy["variant"], ["dense", "topk", "lossfree"], ordered=True)
    summary = stats.summarize(tidy, ["ppl", "gini"], ["test"]).set_index(["variant", "metric"])
    assert list(summary.index.get_level_values(0).unique()) == ["dense", "topk", "lossfree"]
    topk = summary.loc[("topk", "ppl")]
    assert (topk.n, topk["mean"], topk["std"]) == (3, 12.0, 2.0)
    assert topk.ci_low == pytest.approx(12 - sps.t.ppf(0.975, 2) * 2 / math.sqrt(3))
    single = summary.loc[("lossfree", "ppl")]
    assert single.n == 1 and single["mean"] == 11.0
    assert math.isnan(single["std"]) and math.isnan(single.ci_low) and math.isnan(single.ci_high)
    dense = summary.loc[("dense", "gini")]
    assert dense.n == 0 and math.isnan(dense["mean"])
    assert summary.loc[("dense", "ppl")].n == 0  # no ppl rows at all: still listed


# --------------------------------------------------------------------------- Holm, Hedges


def test_holm_on_known_example():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → running max 0.06
    adjusted = stats.holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])


def test_holm_ignores_nan_and_caps_at_one():
    np.testing.assert_allclose(stats.holm_adjust([0.01, math.nan, 0.04]), [0.02, math.nan, 0.04])
    np.testing.assert_allclose(stats.holm_adjust([0.5, 0.6]), [1.0, 1.0])
    assert stats.holm_adjust([]).size == 0


def test_hedges_gz_by_hand():
    d = [1.0, 2.0, 3.0, 4.0, 6.0]
    # mean 3.2, sd² = 14.8 / 4 = 3.7, J = 1 − 3 / (4·4 − 1) = 0.8
    g, reason = stats.hedges_gz(d)
    assert reason == ""
    assert g == pytest.approx(0.8 * 3.2 / math.sqrt(3.7), rel=1e-12)


@pytest.mark.parametrize(
    "d, fragment", [([], "n=0"), ([1.0], "n=1"), ([1.0, 2.0], "n=2"), ([2.0, 2.0, 2.0], "zero variance")]
)
def test_hedges_gz_undefined_cases_give_nan_and_reason(d, fragment):
    g, reason = stats.hedges_gz(d)
    assert math.isnan(g) and fragment in reason


# --------------------------------------------------------------------------- paired tests


def test_paired_test_matches_scipy_and_sign_is_b_minus_a():
    rng = np.random.default_rng(0)
    a = pd.Series(100 + rng.normal(size=6), index=range(6))
    b = a + 1.5 + rng.normal(scale=0.5, size=6)
    result = stats.paired_test(a, b, **LEVELS)
    d = (b - a).to_numpy()
    assert result["n"] == 6 and result["mean_diff"] == pytest.approx(d.mean()) and result["mean_diff"] > 0
    ci = sps.ttest_1samp(d, 0).confidence_interval(0.95)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert result["p_ttest"] == pytest.approx(sps.ttest_rel(b, a).pvalue)
    assert result["p_wilcoxon"] == pytest.approx(sps.wilcoxon(d).pvalue)
    assert result["hedges_gz"] == pytest.approx(d.mean() / d.std(ddof=1) * (1 - 3 / 19))
    assert result["note"] == ""


def test_wilcoxon_with_ties_and_zero_differences():
    d = np.array([0.0, 1.0, 1.0, -2.0, 3.0, 0.0, 2.0, 4.0])
    a = pd.Series(np.arange(8, dtype=float))
    result = stats.paired_test(a, a + d, **LEVELS)
    # zeros dropped; |d| ranks 1.5, 1.5, 3.5, 3.5, 5, 6 → W− = 3.5 (the −2), W+ = 17.5
    reference = sps.wilcoxon(d, zero_method="wilcox")
    assert reference.statistic == 3.5
    assert result["p_wilcoxon"] == pytest.approx(reference.pvalue)
    assert "dropped 2 zero" in result["note"]
    assert result["p_ttest"] == pytest.approx(sps.ttest_rel(a + d, a).pvalue)
    # Seven pairs but only five non-zero differences: Wilcoxon could not reject, so it is left out.
    fewer = stats.paired_test(a[:7], a[:7] + d[:7], **LEVELS)
    assert math.isnan(fewer["p_wilcoxon"]) and "5 non-zero differences" in fewer["note"]


def test_all_zero_differences_are_explicit_not_a_crash():
    a = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0])
    result = stats.paired_test(a, a.copy(), **LEVELS)
    assert result["n"] == 5 and result["mean_diff"] == 0.0
    for key in ("p_ttest", "p_wilcoxon", "hedges_gz"):
        assert math.isnan(result[key])
    assert "all differences are zero" in result["note"]


def test_constant_nonzero_differences_give_no_t_test():
    a = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    result = stats.paired_test(a, a + 2, **LEVELS)
    assert math.isnan(result["p_ttest"]) and math.isnan(result["hedges_gz"]) and math.isnan(result["mdd"])
    assert result["p_wilcoxon"] == pytest.approx(2 / 2**6)  # exact two-sided minimum at n = 6
    assert "constant" in result["note"]


def test_fewer_than_six_pairs_have_no_wilcoxon():
    a = pd.Series([1.0, 2.0, 3.0, 4.0])
    result = stats.paired_test(a, a + pd.Series([0.1, 0.3, 0.2, 0.5]), **LEVELS)
    assert math.isnan(result["p_wilcoxon"]) and "n<6" in result["note"]
    assert math.isfinite(result["p_ttest"]) and math.isfinite(result["hedges_gz"])


def test_wilcoxon_is_reported_only_where_it_can_reject():
    """n = 5: all five differences positive, the most extreme data there is, still gives the exact
    two-sided p = 2/32 = 0.0625 > 0.05, so the test is left out; at n = 6 it is reported and rejects."""
    assert stats.wilcoxon_min_n(0.05) == 6
    assert sps.wilcoxon([1.0, 2.0, 3.0, 4.0, 5.0]).pvalue == pytest.approx(0.0625)
    five = pd.Series(np.arange(5.0))
    result = stats.paired_test(five, five + [1.0, 2.0, 3.0, 4.0, 5.0], **LEVELS)
    assert math.isnan(result["p_wilcoxon"]) and "n<6: no Wilcoxon" in result["note"]
    six = pd.Series(np.arange(6.0))
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.5])
    result = stats.paired_test(six, six + d, **LEVELS)
    assert result["p_wilcoxon"] == pytest.approx(sps.wilcoxon(d).pvalue) == pytest.approx(2 / 64)
    assert result["p_wilcoxon"] < 0.05 and "Wilcoxon" not in result["note"]
    # A stricter level needs more pairs: 2 / 2^n <= 0.01 first at n = 8.
    assert stats.wilcoxon_min_n(0.01) == 8
    seven = stats.paired_test(
        pd.Series(np.arange(7.0)), pd.Series(np.arange(7.0) + np.arange(1, 8)), alpha=0.01, power=0.8
    )
    assert math.isnan(seven["p_wilcoxon"]) and "n<8" in seven["note"]


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_pairs_give_nan_with_reason(n):
    a = pd.Series([1.0] * n, dtype=float)
    result = stats.paired_test(a, a + 1, **LEVELS)
    assert result["n"] == n
    for key in ("ci_low", "ci_high", "p_ttest", "p_wilcoxon", "hedges_gz"):
        assert math.isnan(result[key])
    assert result["note"]


def test_paired_comparisons_join_on_common_seeds_and_adjust_per_family():
    tidy = pd.concat(
        [
            tidy_from(
                {
                    "topk": {s: 100.0 + s for s in range(5)},
                    "rdesi": {s: 98.0 + s + 0.3 * (s % 2) for s in range(1, 6)},
                    "switch": {s: 101.0 + s * 1.1 for s in range(5)},
                }
            ),
            tidy_from(
                {
                    "topk": {s: 0.2 for s in range(5)},
                    "rdesi": {s: 0.2 for s in range(1, 6)},
                    "switch": {s: 0.3 + 0.01 * s for s in range(5)},
                },
                "gini",
            ),
        ]
    )
    table = stats.paired_comparisons(
        tidy,
        stats.reference_pairs(["topk", "rdesi", "switch"], "topk"),
        ["ppl", "gini"],
        "test",
        primary=PRIMARY,
        **LEVELS,
    )
    assert list(table.columns) == stats.COMPARISON_COLUMNS
    row = table[(table.variant_b == "rdesi") & (table.metric == "ppl")].iloc[0]
    assert row.n == 4 and row.seeds == "1,2,3,4"
    zero = table[(table.variant_b == "rdesi") & (table.metric == "gini")].iloc[0]
    assert "all differences are zero" in zero.note and math.isnan(zero.p_ttest_holm)
    assert set(table.family) == {"ppl/test", "gini/test"}
    for _, family in table.groupby("family"):
        np.testing.assert_allclose(family.p_ttest_holm, stats.holm_adjust(family.p_ttest))
        np.testing.assert_allclose(family.p_wilcoxon_holm, stats.holm_adjust(family.p_wilcoxon))


def test_pairs():
    variants = ["dense", "topk", "rdesi", "rdesi_no_load", "rdesi_no_bonus"]
    assert stats.reference_pairs(variants, "topk")[0] == ("topk", "dense")
    assert ("topk", "topk") not in stats.reference_pairs(variants, "topk")
    ablations = ["rdesi_no_reputation", "rdesi_no_load", "rdesi_no_bonus"]
    assert stats.ablation_pairs(variants, "rdesi", ablations) == [
        ("rdesi", "rdesi_no_load"),
        ("rdesi", "rdesi_no_bonus"),
    ]
    assert stats.ablation_pairs(["topk", "rdesi_no_load"], "rdesi", ablations) == []
    assert stats.ablation_pairs(variants, None, []) == []  # a study without ablations
    with pytest.raises(ConfigError, match="reference"):
        stats.reference_pairs(variants, "switch")


# --------------------------------------------------------------------------- load metrics


def test_router_balance_curves_mean_over_layers():
    log = make_router_log("topk", 0, n_layers=2, n_experts=4, steps=(0, 10)).assign(variant="topk", seed=0)
    curves = stats.router_balance_curves(log)
    assert len(curves) == 2
    first = log[log.step == 0].sort_values(["layer", "expert"])["load"].to_numpy().reshape(2, 4)
    # Independently: the pairwise Gini and max / mean − 1 of each layer's loads, then the mean over layers.
    pairwise = np.abs(first[:, :, None] - first[:, None, :]).sum(axis=(1, 2)) / (2 * 4 * first.sum(axis=1))
    assert curves.loc[curves.step == 0, "gini"].item() == pytest.approx(pairwise.mean())
    maxvio = first.max(axis=1) / first.mean(axis=1) - 1
    assert curves.loc[curves.step == 0, "maxvio_batch"].item() == pytest.approx(maxvio.mean())
    assert stats.router_balance_curves(log.iloc[0:0]).empty


# --------------------------------------------------------------------------- collect


@pytest.fixture()
def study(tmp_path: Path) -> dict:
    root = tmp_path / "runs"
    dirs = [write_run(root, v, s) for v in ("dense", "topk", "rdesi") for s in (0, 1)]
    diverged = write_run(root, "rdesi", 2, status="diverged")
    no_eval = write_run(root, "topk", 2, splits=("validation",))
    corrupt = write_run(root, "dense", 2)
    (corrupt / "eval_test.json").write_text("{not json")
    absent = root / "topk" / "seed3"  # given but never written
    return dict(root=root, dirs=[*dirs, diverged, no_eval, corrupt, absent])


def test_collect_status_reports_missing_and_failed_runs(study):
    tidy, status = collect.collect_runs(study["dirs"], ["dense", "topk", "rdesi"], [0, 1, 2, 3])
    assert list(status.columns) == collect.STATUS_COLUMNS and len(status) == 12
    by_run = status.set_index(["variant", "seed"])
    assert (by_run.loc[("topk", 0), "status"], by_run.loc[("topk", 0), "detail"]) == (RUN_OK, "")
    assert by_run.loc[("dense", 0), "status"] == RUN_OK  # no router log needed
    assert by_run.loc[("rdesi", 2), "status"] == RUN_FAILED
    assert "status='diverged'" in by_run.loc[("rdesi", 2), "detail"]
    assert by_run.loc[("topk", 2), "status"] == RUN_MISSING
    assert by_run.loc[("topk", 2), "detail"] == "missing eval_test.json"
    assert by_run.loc[("dense", 2), "status"] == RUN_FAILED
    assert "eval_test.json: unreadable" in by_run.loc[("dense", 2), "detail"]
    assert by_run.loc[("topk", 3), "detail"] == "missing run directory"
    assert by_run.loc[("rdesi", 3), "detail"] == "no run directory given"
    # values of non-ok runs are kept (traceable) but flagged, and excluded by usable()
    assert set(tidy.loc[tidy.seed == 2, "run_status"]) == {RUN_FAILED, RUN_MISSING}
    assert set(collect.usable(tidy)["seed"]) == {0, 1}


def test_collect_tidy_layout_and_sources(study):
    tidy, _ = collect.collect_runs(study["dirs"][:6])
    assert list(tidy.columns) == collect.TIDY_COLUMNS
    assert collect.variant_order(tidy) == ["dense", "topk", "rdesi"]
    run = tidy[(tidy.variant == "topk") & (tidy.seed == 0)]
    assert set(run.split) == {"validation", "test", "train"}
    evaluation = json.loads((study["root"] / "topk/seed0/eval_test.json").read_text())
    test = run[run.split == "test"].set_index(["metric", "layer"])
    assert test.loc[("ppl", "all"), "value"] == evaluation["ppl"]
    assert test.loc[("gini", "1"), "value"] == evaluation["per_layer"][1]["gini"]
    assert test.loc[("load_e3", "0"), "value"] == evaluation["per_layer"][0]["load"][3]
    assert test.loc[("load_e3", "0"), "source"].endswith("seed0/eval_test.json#/per_layer/0/load/3")
    # every eval number is reachable through its JSON pointer
    for source, value in test[["source", "value"]].itertuples(index=False):
        file, pointer = source.split("#")
        node = json.loads(Path(file).read_text())
        for part in pointer.strip("/").split("/"):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert (math.isnan(value) and node is None) or node == value
    # null load metrics of dense stay as NaN rows instead of vanishing
    dense = tidy[(tidy.variant == "dense") & (tidy.metric == "gini")]
    assert len(dense) == 4 and dense.value.isna().all()
    assert not ((tidy.variant == "dense") & (tidy.layer != "all")).any()
    train = run[run.split == "train"].set_index("metric")
    log = pd.read_parquet(study["root"] / "topk/seed0/train_log.parquet")
    assert train.loc["final_loss", "value"] == log.loc[log.step.idxmax(), "loss"]
    assert train.loc["final_loss", "source"].endswith("train_log.parquet#loss@step=200")


def test_collect_rejects_configuration_errors(study):
    with pytest.raises(ConfigError, match="outside"):
        collect.collect_runs(study["dirs"], ["topk"], [0])
    with pytest.raises(ConfigError, match="seed"):
        collect.collect_runs([study["root"] / "topk"])
    with pytest.raises(ConfigError, match="two run directories"):
        collect.collect_runs([study["dirs"][0], str(study["dirs"][0]) + "/"])


def test_missing_router_log_of_routed_variant_is_reported(tmp_path):
    run = write_run(tmp_path, "topk", 0, router_log=False)
    _, status = collect.collect_runs([run])
    assert status.loc[0, "status"] == RUN_MISSING and status.loc[0, "detail"] == "missing router_log.parquet"


def test_load_router_logs(study):
    logs = collect.load_router_logs(
        study["dirs"][:6], keep={("rdesi", 0), ("dense", 0)}, variants=["dense", "topk", "rdesi"]
    )
    assert set(zip(logs.variant.astype(str), logs.seed)) == {("rdesi", 0)}
    assert list(logs.variant.cat.categories) == ["dense", "topk", "rdesi"]
    assert collect.load_router_logs([]).empty


# --------------------------------------------------------------------------- Holm families, endpoints


def holm_by_rejection(pvalues: list[float]) -> list[float]:
    """Holm by brute force: the smallest level at which the step-down procedure rejects each hypothesis.

    The procedure at level alpha rejects the j-th smallest p (0-based) while ``p_(j) ≤ alpha / (m − j)``
    and stops at the first failure. Candidate levels are every ``(m − j) · p`` and 1.
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])

    def rejected(alpha: float) -> set[int]:
        out = set()
        for j, i in enumerate(order):
            if pvalues[i] * (m - j) > alpha * (1 + 1e-12):
                break
            out.add(i)
        return out

    levels = sorted({min(1.0, (m - j) * p) for p in pvalues for j in range(m)} | {1.0})
    return [min(level for level in levels if i in rejected(level)) for i in range(m)]


def test_holm_runs_per_metric_family_not_over_the_table():
    rng = np.random.default_rng(7)
    variants = ["topk", "switch", "lossfree", "rdesi", "dense"]
    seeds = range(4)
    frames = []
    for metric, scale in (("ppl", 1.0), ("gini", 0.02), ("load_entropy", 0.01)):
        base = rng.normal(size=len(seeds))
        frames.append(
            tidy_from(
                {
                    v: {s: base[s] + shift * scale + rng.normal(scale=0.3 * scale) for s in seeds}
                    for v, shift in zip(variants, (0.0, 0.3, 1.0, 2.0, -0.6))
                },
                metric,
            )
        )
    table = stats.paired_comparisons(
        pd.concat(frames),
        stats.reference_pairs(variants, "topk"),
        ["ppl", "gini", "load_entropy"],
        "test",
        primary=PRIMARY,
        **LEVELS,
    )
    assert list(table.family.unique()) == ["ppl/test", "gini/test", "load_entropy/test"]
    for _family, rows in table.groupby("family"):
        assert len(rows) == 4  # the four comparisons against topk: one family per metric and split
        assert rows.p_ttest_holm.tolist() == pytest.approx(holm_by_rejection(rows.p_ttest.tolist()))
    # Adjusting over all 12 rows instead would be stricter: the families are what changed.
    assert (table.p_ttest_holm <= stats.holm_adjust(table.p_ttest) + 1e-15).all()
    assert (table.p_ttest_holm < stats.holm_adjust(table.p_ttest)).any()


def test_holm_matches_brute_force_on_random_families():
    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 9):
        p = rng.uniform(0, 0.2, size=m).tolist()
        assert stats.holm_adjust(p).tolist() == pytest.approx(holm_by_rejection(p))


def test_endpoints_are_primary_or_exploratory_as_declared():
    tidy = pd.concat(
        [
            tidy_from({"topk": {s: 10.0 + s for s in range(3)}, "rdesi": {s: 9.0 + s * 1.1 for s in range(3)}}, metric)
            for metric in ("ppl", "gini", "cv")
        ]
    )
    pairs = [("topk", "rdesi")]
    default = stats.paired_comparisons(tidy, pairs, ["ppl", "gini", "cv"], "test", primary=PRIMARY, **LEVELS)
    assert dict(zip(default.metric, default.endpoint)) == {"ppl": "primary", "gini": "primary", "cv": "exploratory"}
    custom = stats.paired_comparisons(tidy, pairs, ["ppl", "gini", "cv"], "test", primary=["cv"], **LEVELS)
    assert dict(zip(custom.metric, custom.endpoint)) == {"ppl": "exploratory", "gini": "exploratory", "cv": "primary"}
    assert list(custom.family) == ["ppl/test", "gini/test", "cv/test"]


# --------------------------------------------------------------------------- minimum detectable difference


def test_mdd_matches_the_published_sample_size_table():
    """G*Power (Faul et al. 2007), paired t-test, d_z = 0.5, two-sided alpha 0.05, power 0.8:
    total sample size 34, actual power 0.8078. So 34 pairs detect d_z = 0.5 and 33 do not."""
    assert stats.paired_t_power(0.5, 34, 0.05) == pytest.approx(0.8078, abs=5e-5)
    assert (
        stats.minimum_detectable_difference(1.0, 34, **LEVELS)
        < 0.5
        < stats.minimum_detectable_difference(1.0, 33, **LEVELS)
    )
    # Large n: the normal approximation (z_0.975 + z_0.8) / sqrt(n), with the quantiles from printed tables.
    assert stats.minimum_detectable_difference(1.0, 40_000, **LEVELS) == pytest.approx(
        (1.959964 + 0.841621) / 200, rel=1e-3
    )


@pytest.mark.parametrize("n, sd", [(2, 1.5), (3, 2.0), (5, 0.7), (10, 3.0)])
def test_mdd_has_the_stated_power_by_simulation(n, sd):
    """Draw many paired samples whose true mean difference is the MDD: the t-test at alpha = 0.05
    must reject in 80% of them (Monte Carlo, 40,000 replicates: standard error 0.002)."""
    mdd = stats.minimum_detectable_difference(sd, n, **LEVELS)
    rng = np.random.default_rng(n)
    d = rng.normal(mdd, sd, size=(40_000, n))
    # The t statistic by hand (only the critical value comes from scipy), not through the noncentral t.
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    rejected = np.abs(t) > sps.t.ppf(0.975, n - 1)
    assert rejected.mean() == pytest.approx(0.8, abs=0.01)
    # Half the MDD is detected far less often; the MDD scales with sd.
    assert stats.paired_t_power(0.5 * mdd / sd, n, 0.05) < 0.5
    assert stats.minimum_detectable_difference(2 * sd, n, **LEVELS) == pytest.approx(2 * mdd)


def test_mdd_is_nan_where_the_t_test_is_undefined_and_checks_its_levels():
    assert math.isnan(stats.minimum_detectable_difference(1.0, 1, **LEVELS))
    assert math.isnan(stats.minimum_detectable_difference(0.0, 5, **LEVELS))
    assert math.isnan(stats.minimum_detectable_difference(math.nan, 5, **LEVELS))
    with pytest.raises(ValueError, match="alpha < power"):
        stats.minimum_detectable_difference(1.0, 5, alpha=0.5, power=0.4)
    # A stricter level or a higher power needs a larger difference.
    assert stats.minimum_detectable_difference(1.0, 5, alpha=0.01, power=0.8) > stats.minimum_detectable_difference(
        1.0, 5, **LEVELS
    )
    assert stats.minimum_detectable_difference(1.0, 5, power=0.9, alpha=0.05) > stats.minimum_detectable_difference(
        1.0, 5, **LEVELS
    )


def test_every_comparison_row_carries_its_mdd():
    a = pd.Series([100.0, 104.0, 98.0])
    d = np.array([2.0, -1.0, 4.0])
    result = stats.paired_test(a, a + d, alpha=0.05, power=0.8)
    assert result["mdd"] == pytest.approx(stats.minimum_detectable_difference(d.std(ddof=1), 3, **LEVELS))
    # Three seeds detect only about 3.3 sd of the differences (the "9-30% of PPL").
    assert result["mdd"] / d.std(ddof=1) == pytest.approx(3.264, abs=1e-3)
    assert math.isnan(stats.paired_test(a[:1], a[:1] + 1, **LEVELS)["mdd"])


# --------------------------------------------------------------------------- n-gram reference rows


def test_baseline_rows_in_the_summary(tmp_path):
    models = {
        "unigram": {
            "params": {"k": 1.0},
            "validation": {"ppl": 700.0, "word_ppl": 9000.0, "nll": 6.5, "tokens": 10, "words": 7},
            "test": {"ppl": 710.0, "word_ppl": 9100.0, "nll": 6.6, "tokens": 12, "words": 8},
        },
        "bigram": {
            "params": {"lambda": 0.9, "k": 1.0},
            "validation": {"ppl": 95.0, "word_ppl": 600.0, "nll": 4.55, "tokens": 10, "words": 7},
            "test": {"ppl": 89.0, "word_ppl": 550.0, "nll": 4.49, "tokens": 12, "words": 8},
        },
    }
    path = tmp_path / "ngram.json"
    path.write_text(json.dumps({"models": models, "vocab_size": 4096, "shards": "x"}))
    baselines = collect.read_baselines(path)
    assert list(baselines.columns) == collect.BASELINE_COLUMNS
    bigram = baselines.set_index(["model", "split", "metric"]).loc[("bigram", "test", "ppl")]
    assert bigram.value == 89.0 and bigram.source == f"{path}#/models/bigram/test/ppl"
    rows = stats.baseline_summary(baselines, ["test"])
    assert list(rows.columns) == stats.SUMMARY_COLUMNS
    assert set(rows.kind) == {stats.REFERENCE_BASELINE} and set(rows.metric) == {"ppl", "word_ppl"}
    assert rows.set_index(["variant", "metric"]).loc[("unigram", "word_ppl"), "mean"] == 9100.0
    assert (rows.n == 1).all() and rows.ci_low.isna().all()
    assert collect.read_baselines(None).empty
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="python -m gtmoe baselines"):
        collect.read_baselines(tmp_path / "bad.json")


# --------------------------------------------------------------------------- each variant's router and options


def test_each_variants_router_and_options_become_columns(tmp_path):
    variants = ["dense", "topk", "rdesi", "rdesi_no_load"]
    record = Record(tmp_path / "study.json", study_record(tmp_path, variants))
    table = collect.variant_columns(record).set_index("variant")
    assert list(table.index) == variants and list(table["router"]) == ["dense", "topk", "rdesi", "rdesi"]
    # Numbers as float, NaN where a router has no such option; strings as they are, None where absent.
    assert table["gamma"].dtype == "float64" and table.loc["rdesi_no_load", "gamma"] == 0.0
    assert table.loc["rdesi", "gamma"] == record.options("rdesi")["gamma"] and math.isnan(table.loc["topk", "gamma"])
    assert table.loc["topk", "aux_loss_coef"] == record.options("topk")["aux_loss_coef"]
    assert table.loc["rdesi", "performance"] == "batch_relative" and table.loc["topk", "performance"] is None
    # Joined to a table by its variant column, rows and order unchanged; a row of no variant gets NaN.
    frame = pd.DataFrame({"variant": ["rdesi", "bigram", "topk"], "value": [1.0, 2.0, 3.0]})
    joined = collect.join_variants(frame, collect.variant_columns(record))
    assert list(joined["value"]) == [1.0, 2.0, 3.0] and joined.loc[0, "gamma"] == table.loc["rdesi", "gamma"]
    assert joined["gamma"][1:].isna().all() and joined["gamma"].dtype == "float64"
    assert pd.isna(joined.loc[1, "router"]) and joined.loc[0, "router"] == "rdesi"


def test_an_option_of_mixed_types_is_a_string_column_and_no_option_clobbers_a_column(tmp_path):
    data = study_record(tmp_path, ["topk", "rdesi"])
    data["variants"]["topk"]["options"]["performance"] = 0.5  # a number here, a string in rdesi
    table = collect.variant_columns(Record(tmp_path / "study.json", data)).set_index("variant")
    assert table["performance"].tolist() == ["0.5", "batch_relative"]
    data["variants"]["rdesi"]["options"]["value"] = 1.0  # would overwrite the tidy table's values
    with pytest.raises(ConfigError, match="router option 'value' of variant 'rdesi'"):
        collect.variant_columns(Record(tmp_path / "study.json", data))
    data["variants"]["rdesi"]["options"] = {"mean": 1.0}  # would overwrite a column of the summary
    with pytest.raises(ConfigError, match="router option 'mean'"):
        collect.variant_columns(Record(tmp_path / "study.json", data), reserved=stats.SUMMARY_COLUMNS)
