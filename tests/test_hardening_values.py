"""Hardening, values (issue 22, items 9 and 10): evaluation metrics are range-checked when the analysis collects
them, float noise is no spread in the paired statistics, and sweep values are unique by value with exact,
reversible variant names."""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.__main__ import main as analysis_main
from analysis.stats import SPREAD_RTOL, paired_differences, paired_test
from gtmoe.config import ConfigError
from gtmoe.contract import EVAL_METRIC_RANGES, MAX_METRIC, UTILISATION_METRICS, metric_range
from gtmoe.study import Study
from gtmoe.sweeps import format_value

from helpers import (
    REPO,
    copy_checkout,
    snakemake,
    write_baselines,
    write_override,
    write_run,
    write_study,
    write_study_record,
)

# --------------------------------------------------------------------------- item 9: metric ranges


def _study(tmp_path: Path, variants=("dense", "topk"), seeds=(0, 1)) -> Path:
    write_study(tmp_path / "runs", variants=variants, seeds=seeds)
    write_baselines(tmp_path / "baselines" / "ngram.json")
    return write_study_record(tmp_path, variants, seeds)


def _edit(evaluation: dict, pointer: str, value) -> None:
    """Set (or, for value ``...``, delete) the entry at a '/'-separated pointer of a parsed eval JSON."""
    *parents, leaf = pointer.split("/")
    node = evaluation
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(leaf)] = value
    elif value is ...:
        del node[leaf]
    else:
        node[leaf] = value


def _damage(tmp_path: Path, variant: str, seed: int, pointer: str, value, split: str = "test") -> Path:
    path = tmp_path / "runs" / variant / f"seed{seed}" / f"eval_{split}.json"
    evaluation = json.loads(path.read_text())
    _edit(evaluation, pointer, value)
    path.write_text(json.dumps(evaluation))
    return path


def _status(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "summary" / "run_status.csv").set_index(["variant", "seed"])


OUT_OF_RANGE = [  # (variant, JSON pointer, value written (... deletes it), text the status detail holds)
    ("topk", "ppl", -5.0, "ppl = -5.0 outside (1, 1e+100]"),
    ("topk", "ppl", 0, "ppl = 0 outside (1, 1e+100]"),
    ("topk", "ppl", 1.0, "ppl = 1.0 outside (1, 1e+100]"),
    ("topk", "ppl", 1.7e308, "ppl = 1.7e+308 outside (1, 1e+100]"),
    ("topk", "ppl", "300", "non-numeric ppl ('300')"),
    ("topk", "word_ppl", ..., "missing word_ppl"),
    ("topk", "word_ppl", "n/a", "non-numeric word_ppl ('n/a')"),
    ("topk", "word_ppl", None, "non-finite word_ppl (None)"),
    ("topk", "word_ppl", 0.5, "word_ppl = 0.5 outside (1, 1e+100]"),
    ("topk", "nll", -0.1, "nll = -0.1 outside (0, 1e+100]"),
    ("topk", "tokens", -1, "tokens = -1 outside [0, 1e+100]"),
    ("topk", "gini", 7.5, "gini = 7.5 outside [0, 1)"),
    ("topk", "gini", 1.0, "gini = 1.0 outside [0, 1)"),
    ("topk", "gini", ..., "missing gini"),
    ("topk", "load_entropy", 1.01, "load_entropy = 1.01 outside [0, 1]"),
    ("topk", "cv", -0.2, "cv = -0.2 outside [0, 1e+100]"),
    ("topk", "maxvio_batch", -1e-3, "maxvio_batch = -0.001 outside [0, 1e+100]"),
    ("topk", "dead_experts", -3, "dead_experts = -3 outside [0, 1e+100]"),
    ("topk", "drop_rate", 1.5, "drop_rate = 1.5 outside [0, 1]"),
    ("topk", "token_expert_mi", True, "non-numeric token_expert_mi (True)"),
    ("topk", "router_saturation", 2.0, "router_saturation = 2.0 outside [0, 1]"),
    ("topk", "router_saturation", float("nan"), "non-finite router_saturation (nan)"),
    ("topk", "n_params", "many", "non-numeric n_params ('many')"),
    ("topk", "peak_mem_mb", -512.0, "peak_mem_mb = -512.0 outside [0, 1e+100]"),
    ("topk", "per_layer/1/gini", 7.5, "per_layer/1/gini = 7.5 outside [0, 1)"),
    ("topk", "per_layer/0/flip_rate_bias", 1.5, "per_layer/0/flip_rate_bias = 1.5 outside [0, 1]"),
    ("topk", "per_layer/0/load/2", -1, "per_layer/0/load/2 = -1 outside [0, 1e+100]"),
    ("dense", "ppl", 1e101, "ppl = 1e+101 outside (1, 1e+100]"),
    ("dense", "word_ppl", ..., "missing word_ppl"),
]


@pytest.mark.parametrize(
    "variant, pointer, value, detail", OUT_OF_RANGE, ids=[f"{v}-{p}-{x!r}" for v, p, x, _ in OUT_OF_RANGE]
)
def test_an_out_of_range_missing_or_non_numeric_metric_fails_the_run_naming_file_and_key(
    tmp_path, variant, pointer, value, detail
):
    record = _study(tmp_path)
    _damage(tmp_path, variant, 1, pointer, value)
    assert analysis_main(["aggregate", "--study", str(record)]) == 0
    status = _status(tmp_path)
    assert status.loc[(variant, 1), "status"] == "failed"
    assert f"eval_test.json: {detail}" in status.loc[(variant, 1), "detail"], status.loc[(variant, 1), "detail"]
    assert (status.drop(index=(variant, 1))["status"] == "ok").all()
    # The run is out of the statistics: its variant's test PPL has one seed left, not two.
    assert analysis_main(["stats", "--study", str(record)]) == 0
    summary = pd.read_csv(tmp_path / "summary" / "summary.csv")
    ppl = summary[(summary["variant"] == variant) & (summary["metric"] == "ppl") & (summary["split"] == "test")]
    assert ppl["n"].tolist() == [1]


IN_RANGE = [  # values at the edges of their ranges, and nulls where a metric may be undefined
    ("topk", "load_entropy", 1.0000000000000002),  # a uniform load's entropy computes one ulp above 1
    ("topk", "token_expert_mi", 1.0000000000000007),
    ("topk", "gini", 0.0),
    ("topk", "drop_rate", 0.0),
    ("topk", "dead_experts", 4.0),
    ("topk", "ppl", 1.0000001),
    ("topk", "router_saturation", None),
    ("topk", "tokens_per_s", None),
    ("topk", "per_layer/0/maxvio_batch", None),  # a layer without batches: NaN, written as null
    ("dense", "gini", None),  # a dense model has no load metrics
    ("dense", "ppl", MAX_METRIC),
]


@pytest.mark.parametrize("variant, pointer, value", IN_RANGE, ids=[f"{v}-{p}-{x!r}" for v, p, x in IN_RANGE])
def test_values_inside_their_range_and_optional_nulls_keep_the_run_ok(tmp_path, variant, pointer, value):
    record = _study(tmp_path)
    _damage(tmp_path, variant, 1, pointer, value)
    assert analysis_main(["aggregate", "--study", str(record)]) == 0
    status = _status(tmp_path)
    assert (status["status"] == "ok").all(), status["detail"].dropna().tolist()


def test_every_metric_gtmoe_writes_has_a_range_that_holds_its_own_values():
    """The smoke study's real evaluation JSONs, where present, are all in range; every key with a range is one
    gtmoe writes (a typo in the table would check nothing)."""
    source = "".join((REPO / "gtmoe" / name).read_text() for name in ("evaluate.py", "metrics.py", "stability.py"))
    for key in EVAL_METRIC_RANGES:
        # the utilisation percentiles are written under the names of gtmoe.contract's tuple, which evaluate reads
        assert f'"{key}"' in source or (key in UTILISATION_METRICS and "UTILISATION_METRICS" in source), key
    assert metric_range("flip_rate_anything") is not None and metric_range("variant") is None
    for path in sorted((REPO / "results").glob("*/runs/*/seed*/eval_*.json")):
        evaluation = json.loads(path.read_text())
        for key, value in evaluation.items():
            limits = metric_range(key)
            assert limits is None or value is None or value in limits, (path, key, value)


def test_a_huge_ppl_fails_its_runs_and_the_stats_and_figures_still_run(tmp_path):
    """PPL 1.7e308 is finite, but the mean of two overflows to inf: out of range, so it never reaches a mean."""
    record = _study(tmp_path)
    for seed in (0, 1):
        _damage(tmp_path, "topk", seed, "ppl", 1.7e308)
    assert analysis_main(["aggregate", "--study", str(record)]) == 0
    status = _status(tmp_path)
    assert (status.loc["topk", "status"] == "failed").all()
    assert status.loc["topk", "detail"].str.contains("eval_test.json: ppl = 1.7e+308 outside", regex=False).all()
    assert analysis_main(["stats", "--study", str(record)]) == 0
    summary = pd.read_csv(tmp_path / "summary" / "summary.csv")
    assert np.isfinite(summary["mean"].dropna()).all()
    assert analysis_main(["figures", "--study", str(record)]) == 0
    assert any((tmp_path / "figures").iterdir())


# --------------------------------------------------------------------------- item 9: float noise is no spread


def test_float_noise_in_constant_differences_is_no_spread_through_stats_and_findings(tmp_path):
    """topk 300.1 / 300.2 against rdesi 300.2 / 300.3: the differences are 0.1 twice, up to 4.5e-14 of noise."""
    variants, seeds = ("topk", "rdesi"), (0, 1)
    for variant, values in (("topk", (300.1, 300.2)), ("rdesi", (300.2, 300.3))):
        for seed, ppl in zip(seeds, values):
            write_run(tmp_path / "runs", variant, seed, ppl=ppl)
    diffs = [300.2 - 300.1, 300.3 - 300.2]
    assert diffs[0] != diffs[1]  # the premise: float subtraction leaves noise
    record = write_study_record(tmp_path, variants, seeds)
    write_baselines(tmp_path / "baselines" / "ngram.json")
    assert analysis_main(["aggregate", "--study", str(record)]) == 0
    assert analysis_main(["stats", "--study", str(record)]) == 0
    table = pd.read_csv(tmp_path / "summary" / "comparisons.csv")
    row = table[(table["variant_b"] == "rdesi") & (table["metric"] == "ppl") & (table["split"] == "test")].iloc[0]
    assert math.isnan(row["p_ttest"]) and math.isnan(row["p_ttest_holm"]) and math.isnan(row["mdd"])
    assert "differences are constant" in row["note"]
    assert row["ci_low"] == row["ci_high"] == row["mean_diff"] == pytest.approx(0.1, rel=1e-12)
    assert analysis_main(["specialisation", "--study", str(record)]) == 0  # the findings read its agreement table
    assert analysis_main(["findings", "--study", str(record)]) == 0
    findings = (tmp_path / "summary" / "findings.html").read_text()
    assert "&lt;0.001" not in findings and "<0.001" not in findings


def _exact_spread_is_zero(a: list[str], b: list[str]) -> bool:
    """Brute force: whether the decimal values' differences are all equal, in exact rational arithmetic."""
    diffs = {Fraction(Decimal(y)) - Fraction(Decimal(x)) for x, y in zip(a, b)}
    return len(diffs) == 1


def test_the_spread_tolerance_matches_exact_arithmetic_on_a_brute_force_grid():
    """Every pair of decimal series whose exact differences are constant has no spread after float rounding,
    and every one whose exact differences spread by 1e-7 of the values or more keeps its spread."""
    rng = random.Random(22)
    checked = 0
    for magnitude in (1e-3, 0.3, 1.0, 7.0, 300.0, 1e4, 1e6, 1e9):
        for _ in range(150):
            n = rng.randint(2, 8)
            digits = rng.randint(1, 9)
            a = [f"{magnitude * (1 + rng.random()):.{digits}g}" for _ in range(n)]
            shift = Decimal(f"{magnitude * rng.uniform(-0.5, 0.5):.{digits}g}")
            b_constant = [str(Decimal(x) + shift) for x in a]
            # a real spread: one pair moved by 1e-7 of the magnitude (far above float noise, far below any seed)
            b_spread = list(b_constant)
            b_spread[rng.randrange(n)] = str(Decimal(b_spread[0]) + Decimal(f"{magnitude * 1e-7:.3g}"))
            for b in (b_constant, b_spread):
                exact = _exact_spread_is_zero(a, b)
                diff, constant = paired_differences(np.array(a, dtype=float), np.array(b, dtype=float))
                assert constant == exact, (a, b)
                if constant:
                    assert np.all(diff == diff[0])
                    assert diff[0] == pytest.approx(float(shift), rel=1e-9, abs=SPREAD_RTOL * 2 * magnitude)
                checked += 1
    assert checked == 8 * 150 * 2


def test_the_tolerance_is_relative_to_the_values_and_zero_within_it_is_zero():
    a = pd.Series([300.1, 300.2, 300.4], index=[0, 1, 2])
    same = pd.Series([300.1 + 1e-13, 300.2 - 1e-13, 300.4], index=[0, 1, 2])  # noise around 0 differences
    result = paired_test(a, same, alpha=0.05, power=0.8)
    assert result["note"].startswith("all differences are zero") and result["mean_diff"] == 0
    # The same absolute spread among values near 3e-6 is real: 2e-13 is 7e-8 of them, above the 1e-9 tolerance.
    small = pd.Series([1e-6, 2e-6, 3e-6], index=[0, 1, 2])
    moved = small + pd.Series([1e-13, -1e-13, 0.0], index=[0, 1, 2]) + 1e-7
    result = paired_test(small, moved, alpha=0.05, power=0.8)
    assert "constant" not in result["note"] and math.isfinite(result["p_ttest"])


# --------------------------------------------------------------------------- item 10: sweep values and names


def _sweep_study(grid: dict) -> Study:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["sweeps"] = [{"name": "s", "base": "rdesi", "grid": grid}]
    return Study.from_config(config)


DUPLICATES = [
    ({"c": [0, 30, 30.0]}, "'sweeps[0].grid.c' = [0, 30, 30.0]: values must be unique: 30 and 30.0"),
    ({"beta": [0.0, -0.0]}, "'sweeps[0].grid.beta' = [0.0, -0.0]: values must be unique: 0.0 and -0.0"),
    ({"c": [1, 2, 1.0]}, "values must be unique: 1 and 1.0 are the same number"),
]


@pytest.mark.parametrize("grid, message", DUPLICATES)
def test_sweep_values_are_unique_by_value(grid, message):
    with pytest.raises(ConfigError) as caught:
        _sweep_study(grid)
    assert message in str(caught.value)


def test_close_values_get_distinct_names_that_read_back_as_their_values():
    # None of these is the base's own value (config.yaml's rdesi), which would be the base itself, not a new point.
    study = _sweep_study({"c": [1.0000001, 1.0000002], "beta": [0.2 + 0.4, 0.6]})
    generated = [name for name in study.variant_names if name.startswith("rdesi-")]
    assert generated == ["rdesi-c1.0000001", "rdesi-c1.0000002", "rdesi-beta0.6000000000000001", "rdesi-beta0.6"]
    for name in generated:
        option = "c" if name.startswith("rdesi-c") else "beta"
        text = name.removeprefix(f"rdesi-{option}")
        assert float(text) == study.run_config(name, 0).router.options[option]


def test_format_value_is_exact_and_injective_on_a_brute_force_sample():
    rng = random.Random(10)
    values = [0, 1, 30, 30.0, -0.0, 1e-5, 0.3, 0.1 + 0.2, 10**16 + 1, 1e20, 1.0000001, 1.0000002, 2.5e-310]
    values += [rng.uniform(-1e3, 1e3) for _ in range(2000)]
    values += [float(f"{rng.uniform(0, 10):.{rng.randint(1, 8)}g}") for _ in range(2000)]
    values += [rng.randint(-(10**18), 10**18) for _ in range(500)]
    names: dict[str, float] = {}
    for value in values:
        text = format_value(value)
        assert (int(text) if text.lstrip("-").isdigit() else float(text)) == value, (value, text)
        assert names.setdefault(text, value) == value, (text, names[text], value)
    # Readable where that is exact: the short forms the sweeps have always used.
    assert [format_value(v) for v in (0, 3.0, 0.3, 1e-05, 0.0001, 30.0)] == ["0", "3", "0.3", "1e-05", "0.0001", "30"]


def test_two_points_that_would_share_a_generated_name_stop_the_study_naming_both(monkeypatch):
    """Options c and c1 give 'c10' for c=10 and for c1=0: the name would not map back to one value."""
    from dataclasses import dataclass

    from gtmoe.routers import registry
    from gtmoe.routers.topk import TopKOptions, TopKRouter

    @dataclass
    class Options(TopKOptions):
        c: float = 1.0
        c1: float = 1.0

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("prefixed")(type("PrefixedRouter", (TopKRouter,), {"Config": Options, "__module__": __name__}))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["variants"] = [{"name": "topk", "router": "topk"}, {"name": "pre", "router": "prefixed"}]
    config["ablation"] = {"base": None, "variants": []}
    config["reference"] = "topk"
    config["sweeps"] = [
        {"name": "s", "base": "pre", "grid": {"c": [10]}},
        {"name": "t", "base": "pre", "grid": {"c1": [0]}},
    ]
    with pytest.raises(ConfigError) as caught:
        Study.from_config(config)
    message = str(caught.value)
    assert "'sweeps[1].grid' = 'pre-c10'" in message
    assert "c=10 (sweep 's')" in message and "c1=0 (sweep 't')" in message


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return copy_checkout(tmp_path_factory.mktemp("values") / "study")


def test_a_duplicate_sweep_value_stops_snakemake_before_any_job(checkout, tmp_path):
    override = write_override(
        tmp_path, {"name": "dup", "sweeps": [{"name": "s", "base": "rdesi", "grid": {"c": [0, 30, 30.0]}}]}
    )
    done = snakemake("-n", "--configfile", override, cwd=checkout, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "'sweeps[0].grid.c' = [0, 30, 30.0]: values must be unique: 30 and 30.0 are the same number" in output
    assert "Traceback" not in output and "Job stats" not in output
    assert not (checkout / "results" / "dup").exists()


def test_close_sweep_values_run_as_two_variants_in_the_workflow(checkout, tmp_path):
    override = write_override(
        tmp_path, {"name": "close", "sweeps": [{"name": "s", "base": "rdesi", "grid": {"c": [1.0000001, 1.0000002]}}]}
    )
    done = snakemake("-n", "s", "--configfile", override, cwd=checkout, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    record = json.loads((checkout / "results" / "close" / "study.json").read_text())
    for value in (1.0000001, 1.0000002):
        name = f"rdesi-c{value!r}"
        assert record["variants"][name]["options"]["c"] == value
        assert f"results/close/runs/{name}/seed" in output
