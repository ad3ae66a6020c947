"""Confirmatory contrasts: declared in config.yaml, Holm over contrasts × primary endpoints (ablations apart),
TOST against declared margins, one verdict per row, constant-by-construction metrics untested, and the table's
files (parquet, CSV, HTML, LaTeX)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as scipy_stats

from analysis import stats, tables
from analysis.stats import confirmatory
from gtmoe.config import ConfigError
from gtmoe.study import STATISTICS_DEFAULTS, Study, statistics_settings

from helpers import REPO, merged_config, tidy_table

ALPHA, POWER = 0.05, 0.8
MARGINS = {"ppl": {"relative": 0.02}, "gini": {"absolute": 0.01}}
SEEDS = range(8)


def holm_by_hand(pvalues: list[float]) -> list[float]:
    """Holm's adjusted p-values from the definition, with loops: sorted ascending, p_(i) · (m − i) (0-based),
    made monotone by a running maximum and capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def shifted(base: np.ndarray, shift: float, noise: float, seed: int) -> dict[int, float]:
    values = base + shift + noise * np.random.default_rng(seed).standard_normal(base.size)
    return dict(zip(SEEDS, values.tolist()))


def study_values() -> dict:
    """Four variants on 8 seeds: a clearly worse PPL (x), one within a tight margin (y), one noisy (z)."""
    base_ppl = 50 + np.random.default_rng(1).standard_normal(8)
    base_gini = 0.05 + 0.005 * np.random.default_rng(2).standard_normal(8)
    return {
        "ref": {"ppl": dict(zip(SEEDS, base_ppl.tolist())), "gini": dict(zip(SEEDS, base_gini.tolist()))},
        "x": {"ppl": shifted(base_ppl, 5.0, 0.2, 3), "gini": shifted(base_gini, 0.0, 0.001, 4)},
        "y": {"ppl": shifted(base_ppl, 0.05, 0.05, 5), "gini": shifted(base_gini, 0.0, 0.0005, 6)},
        "z": {"ppl": shifted(base_ppl, 0.3, 3.0, 7), "gini": shifted(base_gini, 0.0, 0.02, 8)},
    }


def table_of(values: dict, contrasts, base=None, ablations=(), by_construction=(), primary=("ppl", "gini")):
    return confirmatory.confirmatory_comparisons(
        tidy_table(values),
        contrasts,
        base,
        ablations,
        "test",
        primary=primary,
        margins=MARGINS,
        alpha=ALPHA,
        power=POWER,
        by_construction=by_construction,
    )


# --------------------------------------------------------------------------- TOST


@pytest.mark.parametrize("shift, margin", [(0.1, 1.0), (0.9, 1.0), (-0.4, 0.5), (2.0, 0.5)])
def test_tost_is_the_larger_of_two_one_sided_paired_t_tests(shift, margin):
    rng = np.random.default_rng(11)
    b = 40 + rng.standard_normal(10)
    a = b + shift + 0.3 * rng.standard_normal(10)
    # H0 mean(a − b) ≤ −m: a against b − m, alternative greater; H0 mean(a − b) ≥ m: a against b + m, less.
    lower = scipy_stats.ttest_rel(a, b - margin, alternative="greater").pvalue
    upper = scipy_stats.ttest_rel(a, b + margin, alternative="less").pvalue
    assert confirmatory.tost_paired(a - b, margin) == pytest.approx(max(lower, upper), rel=1e-10)


def test_tost_is_undefined_without_two_differences_spread_or_a_margin():
    assert math.isnan(confirmatory.tost_paired([0.1], 1.0))
    assert math.isnan(confirmatory.tost_paired([0.1, 0.1, 0.1], 1.0))  # no spread: t is infinite
    assert math.isnan(confirmatory.tost_paired([0.1, 0.2, 0.3], 0.0))
    assert math.isnan(confirmatory.tost_paired([0.1, 0.2, 0.3], math.nan))


def test_a_relative_margin_is_a_share_of_b_and_an_absolute_one_is_itself():
    assert confirmatory.equivalence_margin({"relative": 0.02}, -50.0) == ("relative", 0.02, 1.0)
    assert confirmatory.equivalence_margin({"absolute": 0.01}, 50.0) == ("absolute", 0.01, 0.01)
    assert math.isnan(confirmatory.equivalence_margin({"relative": 0.02}, math.nan)[2])


# --------------------------------------------------------------------------- families and Holm


def test_holm_runs_over_contrasts_times_endpoints_and_the_ablations_apart():
    values = study_values()
    table = table_of(values, [["x", "ref"], ["y", "ref"], ["z", "x"]], base="ref", ablations=["z", "y"])
    # Declaration order, every contrast × every primary endpoint, then the ablations (ablation − base).
    assert list(zip(table["family"], table["contrast"], table["metric"])) == [
        ("contrasts", "x − ref", "ppl"),
        ("contrasts", "x − ref", "gini"),
        ("contrasts", "y − ref", "ppl"),
        ("contrasts", "y − ref", "gini"),
        ("contrasts", "z − x", "ppl"),
        ("contrasts", "z − x", "gini"),
        ("ablations", "z − ref", "ppl"),
        ("ablations", "z − ref", "gini"),
        ("ablations", "y − ref", "ppl"),
        ("ablations", "y − ref", "gini"),
    ]
    for family, size in (("contrasts", 6), ("ablations", 4)):
        part = table[table["family"] == family]
        assert len(part) == size and part["p_ttest"].notna().all()
        # Raw p: the paired t-test of a against b, computed here from the values.
        for r in part.itertuples():
            a = [values[r.variant_a][r.metric][s] for s in SEEDS]
            b = [values[r.variant_b][r.metric][s] for s in SEEDS]
            assert r.p_ttest == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue, rel=1e-10)
            assert r.mean_diff == pytest.approx(np.mean(np.subtract(a, b)))
        # Adjusted over the whole family at once (not per endpoint, not pooled with the other family).
        assert part["p_ttest_holm"].tolist() == pytest.approx(holm_by_hand(part["p_ttest"].tolist()))
        assert part["p_tost_holm"].tolist() == pytest.approx(holm_by_hand(part["p_tost"].tolist()))
        per_endpoint = [stats.holm_adjust(g["p_ttest"].to_numpy()) for _, g in part.groupby("metric")]
        assert not np.allclose(np.sort(np.concatenate(per_endpoint)), np.sort(part["p_ttest_holm"].to_numpy()))


def test_holm_matches_statsmodels_where_it_is_installed():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    weightstats = pytest.importorskip("statsmodels.stats.weightstats")
    values = study_values()
    table = table_of(values, [["x", "ref"], ["y", "ref"], ["z", "x"]])
    expected = multitest.multipletests(table["p_ttest"], method="holm")[1]
    assert table["p_ttest_holm"].tolist() == pytest.approx(expected.tolist())
    for r in table.itertuples():
        a = np.array([values[r.variant_a][r.metric][s] for s in SEEDS])
        b = np.array([values[r.variant_b][r.metric][s] for s in SEEDS])
        assert r.p_tost == pytest.approx(weightstats.ttost_paired(a, b, -r.margin, r.margin)[0], rel=1e-8)


# --------------------------------------------------------------------------- verdicts


def test_each_verdict_is_reached_and_follows_the_adjusted_p_values():
    table = table_of(study_values(), [["x", "ref"], ["y", "ref"], ["z", "ref"]]).set_index(["contrast", "metric"])
    assert table.loc[("x − ref", "ppl"), "verdict"] == "different"  # +5 PPL, sd 0.2
    equivalent = table.loc[("y − ref", "ppl")]  # +0.05 PPL within ±2% of ~50 = ±1
    assert equivalent["margin"] == pytest.approx(0.02 * equivalent["mean_b"])
    assert equivalent["verdict"] == f"equivalent within ±{equivalent['margin']:.4g}"
    assert table.loc[("z − ref", "ppl"), "verdict"] == "inconclusive"  # sd 3: neither
    for r in table.itertuples():
        if r.p_ttest_holm < ALPHA:
            assert r.verdict == "different"
        elif r.p_tost_holm < ALPHA:
            assert r.verdict.startswith("equivalent within ±")
        else:
            assert r.verdict == "inconclusive"
    # The verdict function on its own: "different" wins over an equivalence at the same time.
    assert confirmatory.verdict(0.01, 0.01, 1.0, ALPHA) == "different"
    assert confirmatory.verdict(0.5, 0.01, 1.0, ALPHA) == "equivalent within ±1"
    assert confirmatory.verdict(math.nan, math.nan, 1.0, ALPHA) == "inconclusive"
    assert confirmatory.verdict(0.5, 0.2, 1.0, ALPHA) == "inconclusive"


def test_a_metric_constant_by_construction_gets_no_p_value():
    values = study_values()
    values["ec"] = {"ppl": shifted(np.full(8, 52.0), 0.0, 1.0, 9), "gini": dict.fromkeys(SEEDS, 0.0)}
    table = table_of(values, [["ec", "ref"]], by_construction=["ec"]).set_index("metric")
    gini = table.loc["gini"]
    assert gini["verdict"] == "not tested: constant by construction" and "constant by construction" in gini["note"]
    for key in ("p_ttest", "p_ttest_holm", "p_tost", "p_tost_holm", "hedges_gz", "mdd"):
        assert math.isnan(gini[key]), key
    assert gini["mean_diff"] == pytest.approx(-np.mean(list(values["ref"]["gini"].values())))  # still reported
    assert math.isfinite(table.loc["ppl", "p_ttest"])  # perplexity varies: tested
    # Undeclared, the same zero Gini is tested like any value; declared but varying, too.
    assert math.isfinite(table_of(values, [["ec", "ref"]]).set_index("metric").loc["gini", "p_ttest"])
    assert math.isfinite(
        table_of(values, [["x", "ref"]], by_construction=["x"]).set_index("metric").loc["gini", "p_ttest"]
    )
    # The exploratory tables apply the same rule.
    compared = stats.paired_comparisons(
        tidy_table(values),
        [("ref", "ec")],
        ["gini"],
        "test",
        primary=[],
        alpha=ALPHA,
        power=POWER,
        by_construction=["ec"],
    )
    assert math.isnan(compared["p_ttest"].iloc[0]) and "constant by construction" in compared["note"].iloc[0]
    assert (compared["label"] == "exploratory").all()


def test_without_a_declared_margin_there_is_no_tost_and_a_difference_is_still_found():
    # A study record written before margins were declared: no equivalence can be claimed.
    table = confirmatory.confirmatory_comparisons(
        tidy_table(study_values()),
        [["x", "ref"], ["z", "ref"]],
        None,
        [],
        "test",
        primary=["ppl"],
        margins={},
        alpha=ALPHA,
        power=POWER,
    ).set_index("contrast")
    assert table["p_tost"].isna().all() and table["note"].str.contains("no equivalence margin declared").all()
    assert table.loc["x − ref", "verdict"] == "different" and table.loc["z − ref", "verdict"] == "inconclusive"


def test_too_few_seeds_is_inconclusive_with_a_note():
    values = {v: {m: {0: by_seed[0]} for m, by_seed in metrics.items()} for v, metrics in study_values().items()}
    table = table_of(values, [["x", "ref"]])
    assert (table["verdict"] == "inconclusive").all() and table["note"].str.contains("n=1").all()


# --------------------------------------------------------------------------- files


def test_the_table_is_written_as_parquet_csv_html_and_latex(tmp_path):
    values = study_values()
    values["ec_1"] = {"ppl": shifted(np.full(8, 52.0), 0.0, 1.0, 9), "gini": dict.fromkeys(SEEDS, 0.0)}
    table = table_of(
        values, [["x", "ref"], ["y", "ref"], ["ec_1", "ref"]], base="ref", ablations=["z"], by_construction=["ec_1"]
    )
    paths = tables.write_confirmatory(table, tmp_path / "confirmatory", alpha=ALPHA, power=POWER)
    assert sorted(p.name for p in paths) == [f"confirmatory.{s}" for s in ("csv", "html", "parquet", "tex")]
    assert list(pd.read_parquet(tmp_path / "confirmatory.parquet").columns) == confirmatory.CONFIRMATORY_COLUMNS
    page = (tmp_path / "confirmatory.html").read_text()
    assert "Declared contrasts × primary endpoints" in page and "Ablations × primary endpoints" in page
    assert "equivalent within ±" in page and "not tested: constant by construction" in page
    tex = (tmp_path / "confirmatory.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex and tex.count("\\\\\n") == len(table) + 1
    assert "x $-$ ref" in tex and "equivalent within $\\pm$" in tex and "MDD (80\\% power)" in tex
    assert "ec\\_1 $-$ ref" in tex and "ec_1" not in tex  # LaTeX's specials escaped


# --------------------------------------------------------------------------- config


def config_with(statistics: dict) -> dict:
    return merged_config({"statistics": statistics})


def test_config_yaml_declares_the_contrasts_and_margins_and_the_record_carries_them():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    study = Study.from_config(config)
    record = study.record()["statistics"]
    assert record["contrasts"] == [["rdesi", "lossfree"], ["rdesi", "topk"], ["lossfree", "topk"]]
    assert record["margins"] == {
        "ppl": {"relative": 0.02},
        "gini": {"absolute": 0.01},
        "maxvio_global": {"absolute": 0.05},
    }
    assert STATISTICS_DEFAULTS["contrasts"] == []  # the code names no variant
    # A margin given for one endpoint keeps the defaults of the others.
    settings = statistics_settings({"statistics": {"margins": {"ppl": {"absolute": 1.5}}}})
    assert settings["margins"]["ppl"] == {"absolute": 1.5} and settings["margins"]["gini"] == {"absolute": 0.01}


BAD_STATISTICS = [
    ({"contrasts": [["rdesi", "nope"]]}, "config key 'statistics.contrasts[0]'", "'nope' is not a variant"),
    ({"contrasts": [["topk", "topk"]]}, "config key 'statistics.contrasts[0]'", "with itself"),
    ({"contrasts": [["rdesi", "topk"], ["topk", "rdesi"]]}, "config key 'statistics.contrasts[1]'", "duplicates"),
    ({"contrasts": [["rdesi", "topk"], ["rdesi", "topk"]]}, "config key 'statistics.contrasts[1]'", "duplicates"),
    ({"contrasts": [["rdesi_no_load", "rdesi"]]}, "config key 'statistics.contrasts[0]'", "ablation family"),
    ({"contrasts": [["rdesi", "topk", "switch"]]}, "config key 'statistics.contrasts[0]'", "pair [a, b]"),
    ({"contrasts": "rdesi"}, "config key 'statistics.contrasts'", "list of [a, b]"),
    ({"margins": {"ppl": {"relative": 0}}}, "config key 'statistics.margins.ppl.relative'", "> 0"),
    ({"margins": {"gini": {"absolute": -0.01}}}, "config key 'statistics.margins.gini.absolute'", "> 0"),
    ({"margins": {"ppl": {"relative": 1.5}}}, "config key 'statistics.margins.ppl.relative'", "< 1"),
    ({"margins": {"ppl": {"relative": 0.1, "absolute": 1}}}, "config key 'statistics.margins.ppl'", "{relative"),
    ({"margins": {"perplexity": {"absolute": 1}}}, "config key 'statistics.margins.perplexity'", "unknown metric"),
    ({"primary": ["ppl", "cv"]}, "config key 'statistics.margins.cv'", "needs an equivalence margin"),
]


@pytest.mark.parametrize("statistics, key, why", BAD_STATISTICS)
def test_bad_contrasts_and_margins_are_refused_naming_the_key(statistics, key, why):
    with pytest.raises(ConfigError) as caught:
        Study.from_config(config_with(statistics))
    message = str(caught.value)
    assert message.startswith(key) and why in message and "\n" not in message


def test_a_margin_for_a_new_primary_endpoint_makes_it_valid():
    study = Study.from_config(config_with({"primary": ["ppl", "cv"], "margins": {"cv": {"absolute": 0.02}}}))
    assert study.record()["statistics"]["margins"]["cv"] == {"absolute": 0.02}


# --------------------------------------------------------------------------- findings


def test_the_findings_page_leads_with_the_confirmatory_verdicts(tmp_path):
    from test_analysis_findings import inputs_for, text_of

    from analysis import findings

    values = study_values()
    values["ec_1"] = {"ppl": shifted(np.full(8, 52.0), 0.0, 1.0, 9), "gini": dict.fromkeys(SEEDS, 0.0)}
    table = table_of(values, [["x", "ref"], ["y", "ref"], ["z", "ref"], ["ec_1", "ref"]], by_construction=["ec_1"])
    page = findings.render(inputs_for(tmp_path, confirmatory=table))
    text = text_of(page)
    # First on the page, before the checks and the exploratory comparisons.
    assert text.index("Confirmatory contrasts") < text.index("Checks") < text.index("Exploratory: every variant")
    y = table.set_index(["contrast", "metric"]).loc[("y − ref", "ppl")]
    assert f"equivalent within ±{y['margin']:.4g}" in text
    assert "Holm family of 7 tests: 2 different, 3 equivalent within their margins (TOST), 2 inconclusive" in text
    assert "1 not tested (constant by construction)" in text
    # Words of sameness only where a verdict says "equivalent": nowhere else on the page.
    for word in (" same ", " equal ", "no difference", "identical"):
        assert word not in text.lower(), word
    assert "equivalen" not in text.split("Exploratory: every variant")[1].replace("equivalence needs a TOST", "")
    # No confirmatory table (a stats step older than it) or an empty one: said so, nothing claimed.
    assert "rerun the statistics step" in text_of(findings.render(inputs_for(tmp_path)))
    empty = findings.render(inputs_for(tmp_path, confirmatory=table.iloc[0:0]))
    assert "this study makes no confirmatory claim" in text_of(empty)
