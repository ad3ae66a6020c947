"""Sweeps (gtmoe.sweeps): expansion into ordinary variants, names, reuse of equal variants, the design
rows the sensitivity analysis reads, and errors that name the config key."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from gtmoe.config import ConfigError
from gtmoe.study import Study
from gtmoe.sweeps import format_value

from helpers import merged_config

REPO = Path(__file__).resolve().parents[1]


def study_with(sweeps, variants=None, **extra) -> Study:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    if variants is not None:
        config["variants"] = variants
        config["ablation"] = {"base": None, "variants": []}
        config["statistics"]["contrasts"] = []
    config["sweeps"] = sweeps
    config.update(extra)
    return Study.from_config(config)


RDESI = {"name": "rdesi", "router": "rdesi", "beta": 0.1, "gamma": 0.3, "c": 3.0}
TOPK = {"name": "topk", "router": "topk"}


@pytest.mark.parametrize(
    "value, text", [(0, "0"), (0.0, "0"), (0.3, "0.3"), (3.0, "3"), (1e-5, "1e-05"), (0.0001, "0.0001"), (30.0, "30")]
)
def test_values_format_readably(value, text):
    assert format_value(value) == text


def test_one_at_a_time_expands_each_option_around_the_base():
    study = study_with(
        [{"name": "terms", "base": "rdesi", "grid": {"beta": [0, 0.1, 1], "c": [0.3, 3, 30]}}], variants=[TOPK, RDESI]
    )
    assert study.variant_names == ["topk", "rdesi", "rdesi-beta0", "rdesi-beta1", "rdesi-c0.3", "rdesi-c30"]
    assert study.sweeps == {"terms": ("rdesi", "rdesi-beta0", "rdesi-beta1", "rdesi-c0.3", "rdesi-c30")}
    # A generated variant is the base with one option changed, and runs like any other.
    cfg = study.run_config("rdesi-beta1", 0)
    assert (cfg.router.name, cfg.router.options) == ("rdesi", {"beta": 1, "gamma": 0.3, "c": 3.0})
    curves = {(row["option"], row["value"]): row["variant"] for row in study.sweep_design}
    assert curves == {
        ("beta", 0): "rdesi-beta0",
        ("beta", 0.1): "rdesi",
        ("beta", 1): "rdesi-beta1",
        ("c", 0.3): "rdesi-c0.3",
        ("c", 3): "rdesi",
        ("c", 30): "rdesi-c30",
    }
    terms = {row["option"]: row["term"] for row in study.sweep_design}
    assert terms == {"beta": "reputation", "c": "bonus"}  # RDESIRouter.option_terms
    assert all(row["fixed"] == "" and row["sweep"] == "terms" for row in study.sweep_design)


def test_the_base_is_on_every_curve_even_when_its_value_is_not_listed():
    study = study_with([{"name": "rate", "base": "lossfree", "grid": {"bias_update_rate": [0, 0.01]}}])
    rows = [(row["value"], row["variant"]) for row in study.sweep_design]
    # config.yaml's lossfree has the tuned u = 3e-4 (score units), not among the listed values.
    assert rows == [(0, "lossfree-bias_update_rate0"), (0.0003, "lossfree"), (0.01, "lossfree-bias_update_rate0.01")]


def test_a_point_equal_to_an_existing_variant_reuses_it():
    # config.yaml has rdesi_no_reputation = rdesi with beta 0: nothing is trained twice.
    study = study_with(
        [
            {"name": "terms", "base": "rdesi", "grid": {"beta": [0, 1.0]}},
            {"name": "again", "base": "rdesi", "grid": {"beta": [1]}},
        ]
    )
    assert study.sweeps["terms"] == ("rdesi", "rdesi_no_reputation", "rdesi-beta1")
    assert study.sweeps["again"] == ("rdesi", "rdesi-beta1")
    assert study.variant_names.count("rdesi-beta1") == 1


def test_a_full_grid_is_every_combination():
    grid = {"beta": [0, 1], "gamma": [0.3, 3], "c": [3, 30]}
    study = study_with([{"name": "cube", "base": "rdesi", "mode": "full", "grid": grid}], variants=[TOPK, RDESI])
    members = study.sweeps["cube"]
    # 8 points; the base (beta 0.1) is not one of them but is listed first, as in every sweep.
    assert len(members) == 9 and members[0] == "rdesi"
    assert "rdesi-beta1-gamma3-c30" in members and "rdesi-beta0" in members  # named by what differs
    for beta, gamma, c in itertools.product(*grid.values()):
        rows = [
            row
            for row in study.sweep_design
            if row["option"] == "beta"
            and row["value"] == beta
            and row["fixed"] == f"gamma={format_value(gamma)}, c={format_value(c)}"
        ]
        assert len(rows) == 1
        options = study.run_config(rows[0]["variant"], 0).router.options
        assert (options["beta"], options["gamma"], options["c"]) == (beta, gamma, c)
    assert len(study.sweep_design) == 3 * 8  # one row per option and point


def test_sweep_variants_can_be_ablations_and_the_reference():
    study = study_with(
        [{"name": "terms", "base": "rdesi", "grid": {"beta": [0]}}],
        variants=[TOPK, RDESI],
        ablation={"base": "rdesi", "variants": ["rdesi-beta0"]},
        reference="rdesi-beta0",
    )
    assert study.ablations == ("rdesi-beta0",) and study.reference == "rdesi-beta0"


def test_the_preset_is_large_enough_and_sweeps_every_term():
    preset = yaml.safe_load((REPO / "workflow/presets/sensitivity.yaml").read_text())
    config = merged_config(preset)  # as Snakemake merges a --configfile
    study = Study.from_config(config)
    assert len(study.variant_names) >= 18 and study.stage == "tuning"
    assert study.seeds == tuple(config["tuning"]["seeds"])
    grids = {option: values for sweep in preset["sweeps"] for option, values in sweep["grid"].items()}
    knobs = {k.option: list(k.values) for k in study.tuning.knobs}
    assert set(grids) == {"beta", "c"} and set(knobs) == {"aux_loss_coef", "gamma", "bias_update_rate"}
    grids.update(knobs)
    for option, values in grids.items():
        assert len(values) >= 5 and sorted(values) == values and values[0] == 0, option
        # log-spaced: consecutive positive values a factor 2 to 10 apart
        ratios = [b / a for a, b in zip(values[1:], values[2:])]
        assert all(2 <= r <= 10 for r in ratios), (option, values)
    assert {row["term"] for row in study.sweep_design} == {"reputation", "load", "bonus", "bias", None}


BAD_SWEEPS = [
    (
        [{"name": "s", "base": "rdesi", "grid": {"betta": [1]}}],
        "'sweeps[0].grid.betta' = [1]: not an option of router 'rdesi'",
    ),
    ([{"name": "s", "base": "nope", "grid": {"beta": [1]}}], "'sweeps[0].base' = 'nope': must be one of the variants"),
    ([{"name": "s", "base": "rdesi", "mode": "random", "grid": {"beta": [1]}}], "'sweeps[0].mode' = 'random'"),
    ([{"name": "s", "base": "rdesi", "grid": {"beta": -1}}], "'sweeps[0].grid.beta' = -1: must be a list"),
    ([{"name": "s", "base": "rdesi", "grid": {"beta": []}}], "'sweeps[0].grid.beta' = []: must be a list of 1 to 32"),
    ([{"name": "s", "base": "rdesi", "grid": {"beta": [1, 1]}}], "values must be unique"),
    (
        [{"name": "s", "base": "rdesi", "grid": {"beta": [-1]}}],
        "'sweeps[0].grid.beta.beta' = -1.0: must be >= 0 (in sweep 's', point beta=-1)",
    ),
    (
        [{"name": "s", "base": "rdesi", "grid": {"beta": [float("nan")]}}],
        "'sweeps[0].grid.beta' = nan: must be a finite number",
    ),
    (
        [{"name": "s", "base": "rdesi", "grid": {"performance": ["a b; rm -rf /"]}}],
        "'sweeps[0].grid.performance' = 'a b; rm -rf /': must be a finite number",
    ),
    (
        [{"name": "s", "base": "rdesi", "grid": {"beta": [True]}}],
        "'sweeps[0].grid.beta' = True: must be a finite number",
    ),
    (
        [{"name": "rdesi", "base": "rdesi", "grid": {"beta": [1]}}],
        "'sweeps[0].name' = 'rdesi': is already the name of a variant",
    ),
    ([{"name": "s-1", "base": "rdesi", "grid": {"beta": [1]}}], "'sweeps[0].name' = 's-1': must start with a letter"),
    ([{"name": "s", "base": "rdesi", "grid": {"beta": [1]}, "seeds": [3]}], "'sweeps[0].seeds' = [3]: unknown key"),
    (
        [{"name": "s", "base": "dense", "grid": {"aux_loss_coef": [1]}}],
        "'sweeps[0].grid.aux_loss_coef' = [1]: not an option of router 'dense'",
    ),
    (
        [
            {
                "name": "s",
                "base": "rdesi",
                "mode": "full",
                "grid": {o: list(range(1, 9)) for o in ("beta", "gamma", "c", "alpha")},
            }
        ],
        "'sweeps[0].grid' = '4096 points': more than 512 points",
    ),
    ("rdesi", "'sweeps' = 'rdesi': must be a list of sweeps"),
]


@pytest.mark.parametrize("sweeps, message", BAD_SWEEPS)
def test_a_bad_sweep_is_rejected_naming_the_key(sweeps, message):
    with pytest.raises(ConfigError) as caught:
        study_with(sweeps)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 500


def test_a_generated_name_taken_by_a_different_variant_is_an_error():
    taken = {"name": "rdesi-beta1", "router": "topk"}
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["variants"] = [TOPK, RDESI]
    config["ablation"] = {"base": None, "variants": []}
    config["statistics"]["contrasts"] = []
    config["sweeps"] = [{"name": "s", "base": "rdesi", "grid": {"beta": [1]}}]
    study = Study.from_config(config)  # fine: no clash
    assert "rdesi-beta1" in study.variant_names
    # User variant names cannot hold '-', so only a second sweep point could clash; equal points are merged.
    config["sweeps"].append({"name": "t", "base": "rdesi", "grid": {"beta": [1.0]}})
    assert Study.from_config(config).sweeps["t"] == ("rdesi", "rdesi-beta1")
    with pytest.raises(ConfigError, match="must start with a letter"):
        Study.from_config({**config, "variants": [TOPK, RDESI, taken]})
