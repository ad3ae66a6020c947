"""Sensitivity analysis (issue 14): design validation, dose-response statistics, best values,
figures, tables and the `sensitivity` command, on synthetic tidy tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import figures, outputs, tables
from analysis.__main__ import main
from analysis.stats import sensitivity
from gtmoe.errors import ConfigError

from helpers import point, run_module, study_record, tidy_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)


def random_values(rng: np.random.Generator, ppl: float, gini: float, seeds=SEEDS) -> dict[str, dict[int, float]]:
    return {
        "ppl": {s: ppl + rng.normal(0, 2) for s in seeds},
        "gini": {s: gini + rng.normal(0, 0.01) for s in seeds},
        "maxvio_global": {s: 2 * gini + rng.normal(0, 0.02) for s in seeds},
        "flip_rate_reputation": {s: 0.05 + rng.normal(0, 0.005) for s in seeds},
    }


def t_interval(values) -> tuple[float, float]:
    """Independent reference: scipy's t.interval on the same values."""
    x = np.asarray(values, dtype=float)
    return sps.t.interval(0.95, df=x.size - 1, loc=x.mean(), scale=sps.sem(x))


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 2_000 and path.read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- design


@pytest.mark.parametrize(
    "design, message",
    [
        ({"sweep": "s"}, "must be a list of records"),
        (["rdesi"], "record 0 must be an object"),
        ([point(), {k: v for k, v in point(value=1).items() if k != "variant"}], "record 1 lacks 'variant'"),
        ([point(value="high")], r"record 0 \(s, beta\): value must be a finite number"),
        ([point(value=True)], "value must be a finite number"),
        ([point(value=float("nan"))], "value must be a finite number"),
        ([point(option="")], "option must be a non-empty string"),
        ([point(term=3)], "term must be a selection term name or null"),
        ([point(fixed=1)], "fixed must be a string"),
        ([point(value=1, variant="a"), point(value=1.0, variant="b")], r"several points at beta=1 .*\['a', 'b'\]"),
    ],
)
def test_read_design_rejects_bad_designs(design, message):
    with pytest.raises(ConfigError, match=message):
        sensitivity.read_design(design)


def test_read_design_defaults_and_grid_duplicates():
    record = {k: v for k, v in point(value=0).items() if k not in ("term", "fixed")}
    design = sensitivity.read_design([record, point(value=1, term=None, fixed=None)])
    assert list(design.columns) == sensitivity.DESIGN_COLUMNS
    assert design["term"].isna().all() and (design["fixed"] == "").all()
    assert design["value"].tolist() == [0.0, 1.0]
    # The same value on two curves of a grid (different `fixed`) is two points, not a clash.
    grid = sensitivity.read_design([point(value=1, fixed="gamma=0.3"), point(value=1, fixed="gamma=1")])
    assert len(grid) == 2


# --------------------------------------------------------------------------- statistics


def test_dose_response_statistics_match_scipy():
    rng = np.random.default_rng(1)
    values = {
        "topk": random_values(rng, 100, 0.2),
        "rdesi": random_values(rng, 98, 0.1),
        "rdesi-beta0": random_values(rng, 101, 0.15),
    }
    design = [point(value=0.3, variant="rdesi"), point(value=0, variant="rdesi-beta0")]
    dose = sensitivity.dose_response(tidy_table(values), design, "test", "topk")
    assert list(dose.columns) == sensitivity.DOSE_COLUMNS
    assert dose["value"].tolist() == [0.0] * 4 + [0.3] * 4  # each curve by increasing value
    for row in dose.itertuples():
        source = "flip_rate_reputation" if row.metric == "flip_rate" else row.metric
        x = list(values[row.variant][source].values())
        assert row.n == 3 and row.mean == pytest.approx(np.mean(x))
        assert (row.ci_low, row.ci_high) == pytest.approx(t_interval(x))
        if row.metric == "flip_rate":  # no reference for a term the reference router lacks
            assert math.isnan(row.ref_mean) and math.isnan(row.delta) and row.n_paired == 0
            continue
        ref = list(values["topk"][row.metric].values())
        assert row.ref_mean == pytest.approx(np.mean(ref))
        assert (row.ref_ci_low, row.ref_ci_high) == pytest.approx(t_interval(ref))
        diff = np.subtract(x, ref)
        assert row.delta == pytest.approx(diff.mean())
        assert (row.delta_ci_low, row.delta_ci_high) == pytest.approx(t_interval(diff))


def test_paired_delta_uses_only_common_seeds():
    values = {
        "topk": {"ppl": {0: 100.0, 1: 102.0, 2: 101.0, 3: 99.0}},
        "rdesi": {"ppl": {1: 97.0, 2: 100.5, 3: 96.0, 4: 90.0, 5: float("nan")}},
    }
    dose = sensitivity.dose_response(tidy_table(values), [point(term=None)], "test", "topk")
    ppl = dose[dose["metric"] == "ppl"].iloc[0]
    assert ppl.n == 4 and ppl.ref_n == 4  # each side's own finite seeds
    diff = np.array([97.0 - 102.0, 100.5 - 101.0, 96.0 - 99.0])  # seeds 1, 2, 3 only
    assert ppl.n_paired == 3 and ppl.paired_seeds == "1,2,3"
    assert ppl.delta == pytest.approx(diff.mean())
    assert (ppl.delta_ci_low, ppl.delta_ci_high) == pytest.approx(t_interval(diff))


def test_flip_rate_rows_follow_the_term():
    values = {
        "topk": random_values(np.random.default_rng(2), 100, 0.2),
        "lossfree": {"ppl": {0: 99.0}, "gini": {0: 0.1}, "maxvio_global": {0: 0.3}},
    }
    design = [
        point(
            option="bias_update_rate", value=0.001, variant="lossfree", term="bias", router="lossfree", base="lossfree"
        ),
        point(option="other", value=1, variant="lossfree", term=None, router="lossfree", base="lossfree"),
    ]
    dose = sensitivity.dose_response(tidy_table(values), design, "test", "topk")
    flips = dose[dose["metric"] == "flip_rate"]
    assert flips["option"].tolist() == ["bias_update_rate"]  # none for the option without a term
    assert flips.iloc[0].n == 0 and math.isnan(flips.iloc[0]["mean"])  # flip_rate_bias absent: n = 0
    ppl = dose[(dose["metric"] == "ppl")].iloc[0]
    assert ppl.n == 1 and math.isnan(ppl.ci_low) and ppl.n_paired == 1 and math.isnan(ppl.delta_ci_low)


def test_dose_response_rejects_unknown_variants():
    tidy = tidy_table({"topk": {"ppl": {0: 1.0}}, "rdesi": {"ppl": {0: 1.0}}})
    with pytest.raises(ConfigError, match="reference variant 'switch'"):
        sensitivity.dose_response(tidy, [point()], "test", "switch")
    with pytest.raises(ConfigError, match=r"absent from the table: \['rdesi-beta9'\]"):
        sensitivity.dose_response(tidy, [point(value=9, variant="rdesi-beta9")], "test", "topk")


# --------------------------------------------------------------------------- best values


def brute_force_best(values: dict, design: list[dict], bound: float) -> dict[tuple, tuple[float, bool]]:
    """Per (sweep, option, fixed), from the raw seeds: the value with the lowest mean PPL among those with mean
    MaxVio global <= bound; with none, the lowest mean MaxVio global (flagged False). Ties: the smaller value."""
    curves: dict[tuple, list[tuple[float, float, float]]] = {}
    for p in design:
        ppl = np.mean(list(values[p["variant"]]["ppl"].values()))
        maxvio = np.mean(list(values[p["variant"]]["maxvio_global"].values()))
        curves.setdefault((p["sweep"], p["option"], p["fixed"]), []).append((p["value"], ppl, maxvio))
    best = {}
    for key, points in curves.items():
        eligible = [(ppl, value) for value, ppl, maxvio in points if maxvio <= bound]
        best[key] = (min(eligible)[1], True) if eligible else (min((m, v) for v, _, m in points)[1], False)
    return best


def choose(values: dict, design: list[dict], **rule):
    return sensitivity.best_values(sensitivity.dose_response(tidy_table(values), design, "test", "topk"), **rule)


@pytest.mark.parametrize("bound", [0.35, 0.45, 0.6])  # few, some and most values within the bound
def test_best_values_match_brute_force_on_a_random_grid(bound):
    rng = np.random.default_rng(3)
    design, values = [], {"topk": random_values(rng, 100, 0.2)}
    for beta in (0, 0.1, 1):
        for gamma in (0, 0.3, 3):
            variant = f"g-b{beta}-g{gamma}"
            values[variant] = random_values(rng, 100 + rng.normal(0, 3), 0.2 + rng.normal(0, 0.05))
            design += [
                point("grid", "beta", beta, variant, "reputation", f"gamma={gamma}"),
                point("grid", "gamma", gamma, variant, "load", f"beta={beta}"),
            ]
    best = choose(values, design, minimize="ppl", subject_to={"maxvio_global": bound})
    expected = brute_force_best(values, design, bound)
    assert len(best) == len(expected) == 6
    for row in best.itertuples():
        value, within = expected[(row.sweep, row.option, row.fixed)]
        assert (row.value, row.within_bounds) == (pytest.approx(value), within)
        assert row.n_values_tried == 3 and row.rule == "lowest mean ppl with mean maxvio_global ≤ " + f"{bound:g}"
    assert best["within_bounds"].any() or bound < 0.4


def test_the_declared_rule_picks_within_its_bounds_or_says_none_is():
    values = {
        "topk": {"ppl": {0: 100.0, 1: 101.0}, "gini": {0: 0.3, 1: 0.3}},
        "rdesi": {"ppl": {0: 99.0, 1: 100.0}, "gini": {0: 0.10, 1: 0.12}},  # base: within, not the lowest PPL
        "rdesi-beta0": {"ppl": {0: 98.0, 1: 99.0}, "gini": {0: 0.20, 1: 0.22}},  # within, lowest PPL
        "rdesi-beta3": {"ppl": {0: 90.0, 1: 91.0}, "gini": {0: 0.50, 1: 0.50}},  # lowest PPL, outside the bound
        "rdesi-c0": {"ppl": {0: 110.0, 1: 111.0}, "gini": {0: 0.4, 1: 0.4}},
        "rdesi-c3": {"ppl": {2: 90.0}, "gini": {2: 0.3}},  # no seed paired with topk
    }
    design = [
        point(value=0, variant="rdesi-beta0"),
        point(value=0.3, variant="rdesi"),
        point(value=3, variant="rdesi-beta3"),
        point(option="c", value=0, variant="rdesi-c0", term="bonus"),
        point(option="c", value=1, variant="rdesi", term="bonus"),  # the base once per option
        point(option="c", value=3, variant="rdesi-c3", term="bonus"),
    ]
    for values_of in values.values():
        values_of["maxvio_global"] = {s: 2 * g for s, g in values_of["gini"].items()}
    best = choose(values, design, minimize="ppl", subject_to={"maxvio_global": 0.5})
    assert list(best.columns) == sensitivity.BEST_COLUMNS
    beta, c = best.iloc[0], best.iloc[1]
    assert (beta.option, c.option) == ("beta", "c")
    # beta: beta3 has the lowest PPL but MaxVio 1.0 > 0.5; of the two within, beta0 has the lower PPL.
    assert beta.value == 0 and beta.variant == "rdesi-beta0" and beta.n_values_eligible == 2 and beta.within_bounds
    assert beta.delta_ppl == pytest.approx(-2.0) and beta.ppl_mean == pytest.approx(98.5) and beta.note == ""
    assert (beta.gini_ci_low, beta.gini_ci_high) == pytest.approx(t_interval([0.20, 0.22]))
    # c: the base (MaxVio 0.22) is the only one within 0.5, though c3 has a lower PPL (and no paired seed).
    assert c.value == 1 and c.within_bounds and "1 value(s) without seeds paired with topk" in c.note

    best = choose(values, design, minimize="ppl", subject_to={"maxvio_global": 0.1})  # nothing within
    beta, c = best.iloc[0], best.iloc[1]
    assert not beta.within_bounds and beta.value == 0.3 and beta.n_values_eligible == 0  # the lowest MaxVio
    assert beta.note.startswith("no value within maxvio_global ≤ 0.1: the lowest maxvio_global")

    best = choose(values, design, minimize="ppl")  # no bounds: the lowest PPL
    assert best.iloc[0].value == 3 and best.iloc[0].within_bounds
    best = choose(values, design, minimize="gini", subject_to={"ppl": 100})  # another rule, same machinery
    assert best.iloc[0].value == 0.3 and best.iloc[0].rule == "lowest mean gini with mean ppl ≤ 100"


def test_the_rule_needs_its_metrics_and_a_curve_without_them_chooses_nothing():
    values = {
        "topk": {"ppl": {0: 100.0}, "gini": {0: 0.3}, "maxvio_global": {0: 1.0}},
        "a": {"ppl": {0: 99.0}, "gini": {0: 0.1}},  # no MaxVio: not within any bound
    }
    best = choose(values, [point(value=1, variant="a")], minimize="ppl", subject_to={"maxvio_global": 5})
    assert math.isnan(best.iloc[0].value) and not best.iloc[0].within_bounds and "no value has" in best.iloc[0].note
    dose = sensitivity.dose_response(tidy_table(values), [point(value=1, variant="a")], "test", "topk")
    with pytest.raises(ConfigError, match=r"needs the metrics \['word_ppl'\]"):
        sensitivity.best_values(dose, "word_ppl")


def test_best_value_ties_go_to_the_smaller_value():
    values = {
        "topk": {"ppl": {0: 100.0}, "gini": {0: 0.3}, "maxvio_global": {0: 1.0}},
        "a": {"ppl": {0: 99.0}, "gini": {0: 0.1}, "maxvio_global": {0: 1.0}},
        "b": {"ppl": {0: 99.0}, "gini": {0: 0.1}, "maxvio_global": {0: 1.0}},
    }
    design = [point(value=3, variant="b"), point(value=1, variant="a")]
    best = choose(values, design, minimize="ppl", subject_to={"maxvio_global": 2})
    assert best.iloc[0].value == 1 and best.iloc[0].variant == "a"


# --------------------------------------------------------------------------- figure, tables, command line


def sweep_study() -> tuple[pd.DataFrame, list[dict]]:
    """A one-at-a-time sweep (beta, and c with no term) and a 2 x 2 full grid (beta x gamma)."""
    rng = np.random.default_rng(4)
    design = [point("oat", "beta", v, "rdesi" if v == 0.3 else f"rdesi-beta{v:g}") for v in (0, 0.1, 0.3, 1)]
    design += [point("oat", "c", v, "rdesi" if v == 1 else f"rdesi-c{v:g}", term=None) for v in (0, 1, 10)]
    for beta in (0, 1):
        for gamma in (0.3, 3):
            variant = f"rdesi-beta{beta}-gamma{gamma:g}"
            design += [
                point("grid", "beta", beta, variant, "reputation", f"gamma={gamma:g}"),
                point("grid", "gamma", gamma, variant, "load", f"beta={beta}"),
            ]
    variants = ["topk", *dict.fromkeys(p["variant"] for p in design)]
    values = {v: random_values(rng, 100 + rng.normal(0, 3), 0.2 + rng.normal(0, 0.05)) for v in variants}
    for v in variants:
        values[v]["flip_rate_load"] = {s: 0.1 for s in SEEDS}
    return tidy_table(values), design


def test_figures_one_at_a_time_and_grid(tmp_path):
    tidy, design = sweep_study()
    dose = sensitivity.dose_response(tidy, design, "test", "topk")
    for sweep in ("oat", "grid"):
        assert is_png(figures.plot_sensitivity(dose, tmp_path / f"{sweep}.png", sweep))
    # Nothing to show: a message figure, not an exception.
    assert is_png(figures.plot_sensitivity(dose, tmp_path / "absent.png", "absent"))
    empty = dose.assign(mean=np.nan, ci_low=np.nan, ci_high=np.nan)
    assert is_png(figures.plot_sensitivity(empty, tmp_path / "empty.png", "oat"))


def test_write_tables(tmp_path):
    tidy, design = sweep_study()
    dose = sensitivity.dose_response(tidy, design, "test", "topk")
    best = sensitivity.best_values(dose)
    written = tables.write_sensitivity(dose, best, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"{name}.{suffix}" for name in outputs.SENSITIVITY for suffix in ("parquet", "csv", "html")
    )
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "sensitivity.parquet"), dose)
    page = (tmp_path / "sensitivity.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and 'class="reference"' in page
    assert "Sweep: oat" in page and "Sweep: grid" in page and "other options" in page
    assert "lowest mean ppl" in (tmp_path / "sensitivity_best.html").read_text()
    assert len(pd.read_csv(tmp_path / "sensitivity.csv")) == len(dose)


def sweep_record(tmp_path: Path, tidy: pd.DataFrame, design: list[dict]) -> Path:
    """The study record of `sweep_study` under tmp_path, its tidy table written as aggregate does."""
    data = study_record(tmp_path, ["topk", "rdesi"], SEEDS, sweeps=design)
    for variant in dict.fromkeys(p["variant"] for p in design):
        data["variants"].setdefault(variant, dict(data["variants"]["rdesi"], sweep=design[0]["sweep"]))
    variants = list(data["variants"])
    tidy = tidy.assign(variant=pd.Categorical(tidy["variant"], categories=variants, ordered=True))
    (tmp_path / "summary").mkdir(parents=True, exist_ok=True)
    tidy.to_parquet(tmp_path / "summary" / outputs.TIDY, index=False)
    path = tmp_path / "study.json"
    path.write_text(json.dumps(data))
    return path


def test_cli_end_to_end(tmp_path):
    tidy, design = sweep_study()
    # The tuning runs on validation and (other numbers) on test: choices read validation.
    tidy = pd.concat([tidy.assign(split="validation"), tidy.assign(value=tidy["value"] * 1.5)])
    failed = tidy[tidy["variant"] == "rdesi-beta0"].assign(seed=9, value=1e9, run_status="failed")
    record = sweep_record(tmp_path, pd.concat([tidy, failed]), design)
    result = run_module("analysis", "sensitivity", "--study", str(record), timeout=120)
    assert result.returncode == 0, result.stderr
    summary, figures_dir = tmp_path / "summary", tmp_path / "figures"
    assert sorted(p.name for p in summary.iterdir()) == sorted(
        [outputs.TIDY, *(f"{name}.{suffix}" for name in outputs.SENSITIVITY for suffix in ("parquet", "csv", "html"))]
    )
    assert sorted(p.name for p in figures_dir.iterdir()) == ["sensitivity_grid.png", "sensitivity_oat.png"]
    assert all(is_png(p) for p in figures_dir.iterdir())
    dose = pd.read_parquet(summary / "sensitivity.parquet")
    assert dose["n"].max() == 3 and dose["mean"].max() < 1e9  # the failed run is left out
    assert (dose["reference"] == "topk").all() and (dose["split"] == "validation").all()
    best = pd.read_parquet(summary / "sensitivity_best.parquet")
    assert len(best) == 2 + 4  # oat: beta, c; grid: two curves per option


def test_changing_the_test_split_of_the_tuning_runs_changes_no_chosen_value(tmp_path):
    tidy, design = sweep_study()
    rng = np.random.default_rng(11)
    chosen = []
    validation = tidy.assign(split="validation")
    for scrambled in (False, True):  # the test split as the validation split, then scrambled
        test = tidy.assign(split="test")
        if scrambled:
            test = test.assign(value=rng.permutation(test["value"].to_numpy()) * rng.uniform(0.1, 10, len(test)))
        root = tmp_path / f"study{len(chosen)}"
        record = sweep_record(root, pd.concat([validation, test]), design)
        assert main(["sensitivity", "--study", str(record)]) == 0  # in process: test_cli_end_to_end runs the CLI
        best = pd.read_parquet(root / "summary" / "sensitivity_best.parquet")
        chosen.append(best[["sweep", "option", "fixed", "value", "variant"]])
    pd.testing.assert_frame_equal(chosen[0], chosen[1])
    assert chosen[0]["value"].notna().any()  # something was chosen


@pytest.mark.parametrize(
    "design, message",
    [([{"sweep": "oat", "option": "beta"}], "sweep design record 0 lacks"), ([point(value="high")], "finite number")],
)
def test_a_bad_design_in_the_record_is_one_error_line(tmp_path, capsys, design, message):
    record = sweep_record(tmp_path, *sweep_study())
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "sweeps": design}))
    assert main(["sensitivity", "--study", str(record)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: python -m analysis sensitivity: study record ")
    assert message in lines[0] and str(record) in lines[0]
    assert not (tmp_path / "figures").exists()
