"""The tuning stage (gtmoe.tuning): seeds disjoint from the confirmation seeds, each router on its declared balance
knob with the same budget, validation only; the presets that split the study into tuning and confirmation."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import yaml

from analysis.collect import RUN_OK
from analysis.stats import tuning as tuning_stats
from analysis.stats.sensitivity import read_design
from gtmoe import routers
from gtmoe.errors import ConfigError
from gtmoe.study import Study

from helpers import REPO, check_like_the_snakefile, copy_checkout, merged_config, snakemake, write_override

TUNE = "workflow/presets/tune.yaml"
CONFIRM = "workflow/presets/confirm.yaml"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the checkout for Snakemake's dry runs (they write the study record)."""
    return copy_checkout(tmp_path_factory.mktemp("tuning") / "study")


TWO_KNOBS = [{"variant": "topk", "values": [0.003, 0.01]}, {"variant": "rdesi", "values": [0.3, 1.0]}]


def tuning_study(**tuning) -> dict:
    """config.yaml as a tuning study of topk and rdesi (its contrast), with `tuning` overrides."""
    return merged_config(
        {
            "stage": "tuning",
            "variants": [{"name": "topk", "router": "topk"}, {"name": "rdesi", "router": "rdesi"}],
            "ablation": {"base": "rdesi", "variants": []},
            "statistics": {"contrasts": [["rdesi", "topk"]]},
            "tuning": {"knobs": TWO_KNOBS, **tuning},
        }
    )


def test_a_tuning_study_runs_every_knob_value_on_the_tuning_seeds_and_scores_validation_only():
    study = Study.from_config(tuning_study())
    assert study.stage == "tuning" and study.seeds == (100, 101) and study.eval_splits == ("validation",)
    assert study.statistics["split"] == "validation"  # config.yaml says test: a tuning study never reads it
    assert dict(study.sweeps) == {
        "tune_topk": ("topk", "topk-aux_loss_coef0.003"),
        "tune_rdesi": ("rdesi", "rdesi-gamma0.3"),
    }
    assert study.variants["rdesi-gamma0.3"].options["gamma"] == 0.3
    record = study.record()
    assert record["stage"] == "tuning" and record["eval_splits"] == ["validation"]
    assert record["tuning"]["pairs"] == [["tune_rdesi", "tune_topk"]]
    assert [k["option"] for k in record["tuning"]["knobs"]] == ["aux_loss_coef", "gamma"]
    assert record["tuning"]["select"] == {
        "minimize": "ppl",
        "subject_to": {"maxvio_global": 0.25, "experts_per_token": 2.1},
    }
    assert dict(study.target_keys)["tune_rdesi"] == "tuning.knobs[1].variant"


def test_a_confirmation_study_ignores_the_knobs_and_scores_both_splits():
    config = tuning_study()
    config["stage"] = "confirmation"
    study = Study.from_config(config)
    assert study.seeds == (0, 1, 2) and study.eval_splits == ("validation", "test") and not study.sweeps
    assert study.statistics["split"] == "test" and study.tuning.seeds == (100, 101)
    config["eval_splits"] = ["test"]  # the confirmation preset's: only the split its contrasts are tested on
    study = Study.from_config(config)
    assert study.eval_splits == ("test",) and study.record()["eval_splits"] == ["test"]


@pytest.mark.parametrize(
    "override, key, why",
    [
        ({"tuning": {"seeds": [2, 100]}}, "tuning.seeds", "shares seed(s) 2 with the confirmation seeds"),
        ({"seeds": [101, 7]}, "tuning.seeds", "shares seed(s) 101 with the confirmation seeds"),
        ({"tuning": {"seeds": []}}, "tuning.seeds", "must be a non-empty list"),
        ({"tuning": {"knobs": []}}, "tuning.knobs", "a tuning study tunes at least one variant"),
        (
            {
                "variants": [*({"name": v, "router": v} for v in ("topk", "rdesi", "dense"))],
                "tuning": {"knobs": [*TWO_KNOBS, {"variant": "dense", "values": [1]}]},
            },
            "tuning.knobs[2].variant",
            "router 'dense' declares no balance knob",
        ),
        (
            {
                "tuning": {
                    "knobs": [{"variant": "topk", "values": [0.003, 0.01]}, {"variant": "rdesi", "values": [1.0]}]
                }
            },
            "tuning.knobs[1].values",
            "has 1 values; every router gets the same budget: 2",
        ),
        (
            {"tuning": {"knobs": [{"variant": "topk", "values": [0.003, 0.03]}, TWO_KNOBS[1]]}},
            "tuning.knobs[0].values",
            "must hold the variant's own aux_loss_coef = 0.01",
        ),
        (
            {"tuning": {"knobs": [{"variant": "topk", "values": [0.01, 0.01]}, TWO_KNOBS[1]]}},
            "tuning.knobs[0].values",
            "values must be unique",
        ),
        ({"tuning": {"knobs": [{"variant": "rdesi", "values": [1.0, 3.0]}]}}, "tuning.knobs", "leaves out 'topk'"),
        ({"tuning": {"knobs": [{"variant": "top", "values": [0.01]}]}}, "tuning.knobs[0].variant", "must be one of"),
        ({"tuning": {"knobs": [*TWO_KNOBS, TWO_KNOBS[0]]}}, "tuning.knobs[2].variant", "tuned already"),
        (
            {"tuning": {"select": {"minimize": "ppl", "subject_to": {"gini": 0}}}},
            "tuning.select.subject_to.gini",
            "> 0",
        ),
        ({"tuning": {"select": {"minimize": "bleu"}}}, "tuning.select.minimize", "must be one of"),
        ({"tuning": {"select": {"subject_to": {"ppl": 50}}}}, "tuning.select.subject_to.ppl", "bounds the metric"),
        ({"stage": "final"}, "stage", "must be one of confirmation, tuning"),
        ({"stage": "confirmation", "eval_splits": ["validation"]}, "eval_splits", "must include statistics.split"),
        ({"stage": "confirmation", "eval_splits": ["test", "test"]}, "eval_splits", "distinct splits"),
        ({"stage": "confirmation", "eval_splits": []}, "eval_splits", "must be a non-empty list"),
        ({"stage": "confirmation", "eval_splits": ["train", "test"]}, "eval_splits", "from validation, test"),
        (
            {
                "stage": "confirmation",
                "eval_splits": ["test"],
                "sweeps": [{"name": "c", "base": "rdesi", "grid": {"c": [0.0, 3.0]}}],
            },
            "eval_splits",
            "must include validation: the study's sweeps choose their best values there",
        ),
        (
            {"variants": [{"name": "topk", "router": "topk", "seeds": [0, 1]}, {"name": "rdesi", "router": "rdesi"}]},
            "variants[0].seeds",
            "a tuning study runs every variant on tuning.seeds alike",
        ),
        (
            {
                "stage": "confirmation",
                "variants": [
                    {"name": "topk", "router": "topk"},
                    {"name": "rdesi", "router": "rdesi", "seeds": [3, 101]},
                ],
            },
            "variants[1].seeds",
            "shares seed(s) 101 with tuning.seeds",
        ),
        (
            {
                "stage": "confirmation",
                "variants": [{"name": "topk", "router": "topk"}, {"name": "rdesi", "router": "rdesi", "seeds": [3, 3]}],
            },
            "variants[1].seeds",
            "seeds must be unique",
        ),
    ],
)
def test_bad_tuning_input_is_refused_naming_the_key(override, key, why):
    config = tuning_study()
    for section, value in override.items():
        config[section] = {**config[section], **value} if isinstance(value, dict) and section == "tuning" else value
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*" + re.escape(why)):
        Study.from_config(config)


def test_a_variant_with_seeds_of_its_own_runs_on_them_and_its_record_says_so(tmp_path):
    from analysis.collect import expected_runs
    from analysis.record import load
    from gtmoe.study import run_config_from_record

    config = tuning_study()
    config["stage"] = "confirmation"
    config["variants"][1]["seeds"] = [0, 1, 2, 3, 4]  # rdesi: more seeds for the key contrast
    study = Study.from_config(config)
    assert study.variant_seeds("topk") == (0, 1, 2) and study.variant_seeds("rdesi") == (0, 1, 2, 3, 4)
    assert study.runs() == [("topk", s) for s in (0, 1, 2)] + [("rdesi", s) for s in range(5)]
    record = study.record()
    assert record["seeds"] == [0, 1, 2] and record["variants"]["rdesi"]["seeds"] == [0, 1, 2, 3, 4]
    assert "seeds" not in record["variants"]["topk"]
    assert run_config_from_record(record, "rdesi", 4).train.seed == 4
    with pytest.raises(ConfigError, match="'--seed' = 4: not a seed of variant 'topk'"):
        run_config_from_record(record, "topk", 4)
    path = tmp_path / "study.json"
    path.write_text(__import__("json").dumps(record))
    read = load(path)
    assert [d.rsplit("/", 2)[-2:] for d in read.run_dirs()] == [[v, f"seed{s}"] for v, s in study.runs()]
    grid = expected_runs(read.run_dirs()[:4], read.variants, read.seeds_by_variant())
    assert [(v, s) for v, s, _ in grid] == study.runs()  # the runs not given are expected, with no directory
    with pytest.raises(ConfigError, match="outside the variants x seeds grid"):
        expected_runs([f"{tmp_path}/runs/topk/seed4"], read.variants, read.seeds_by_variant())


def test_overlapping_seeds_stop_snakemake_before_any_job_naming_the_key(tmp_path, checkout):
    override = write_override(tmp_path, {"tuning": {"seeds": [0, 100]}})
    done = snakemake("--dry-run", "--configfile", override, cwd=checkout, timeout=120)
    assert done.returncode != 0 and "Job stats" not in done.stdout
    assert "'tuning.seeds' = [0, 100]: shares seed(s) 0 with the confirmation seeds" in done.stdout + done.stderr


@pytest.mark.parametrize("name", [n for n in routers.known() if routers.get(n).balance_knob is not None])
def test_every_router_with_a_balance_knob_can_be_tuned_on_it(name):
    from gtmoe.sweeps import resolved_options

    knob = routers.get(name).balance_knob
    own = getattr(resolved_options(name, {}, 1500, "v"), knob)
    config = merged_config(
        {
            "stage": "tuning",
            "variants": [{"name": "v", "router": name}],
            "reference": "v",
            "ablation": {"base": "v", "variants": []},
            "statistics": {"contrasts": []},
            "tuning": {"knobs": [{"variant": "v", "values": [own, 2 * own]}]},
        }
    )
    study = Study.from_config(config)
    assert study.tuning.knobs[0].option == knob and study.sweeps["tune_v"] == ("v", f"v-{knob}{2 * own:g}")
    assert getattr(study.variants[f"v-{knob}{2 * own:g}"].resolve(), knob) == 2 * own


def test_the_presets_split_the_study_into_tuning_and_confirmation():
    tune = Study.from_config(merged_config(yaml.safe_load((REPO / TUNE).read_text())))
    check_like_the_snakefile(merged_config(yaml.safe_load((REPO / TUNE).read_text())))
    budgets = {k.variant: len(k.values) for k in tune.tuning.knobs}
    assert len(set(budgets.values())) == 1 and set(budgets) == {"topk", "switch", "expert_choice", "lossfree", "rdesi"}
    pairs = tune.record()["tuning"]["pairs"]
    assert sorted(map(sorted, pairs)) == [
        ["tune_lossfree", "tune_rdesi"],
        ["tune_lossfree", "tune_topk"],
        ["tune_rdesi", "tune_topk"],
    ]
    # 5 routers x 6 values, topk_long (the horizon check), RD-ESI's beta and c beside their base value, and its
    # two other performance signals
    assert len(tune.variants) * len(tune.seeds) == (5 * 6 + 1 + 2 * 4 + 2) * 2
    assert set(tune.sweeps["rdesi_terms"]) == {"rdesi"} | {f"rdesi-beta{v:g}" for v in (0, 0.03, 0.3, 1)} | {
        f"rdesi-c{v:g}" for v in (0, 1, 10, 30)
    }
    confirm = Study.from_config(merged_config(yaml.safe_load((REPO / CONFIRM).read_text())))
    assert confirm.stage == "confirmation" and len(confirm.seeds) >= 12
    assert not set(confirm.seeds) & set(tune.seeds) and not set(confirm.seeds) & {0, 1, 2}  # fresh seeds


def jobs(dry_run: str, rule: str) -> set[tuple[str, str]]:
    """(variant, seed) of every job of `rule` in a dry run's listing."""
    found = re.findall(rf"^rule {rule}:\n(?:    .*\n)*?    wildcards: variant=(\S+), seed=(\d+)$", dry_run, flags=re.M)
    return set(found)


def test_a_dry_run_of_the_confirmation_preset_builds_exactly_its_runs(checkout):
    done = snakemake("--dry-run", "--configfile", CONFIRM, cwd=checkout, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    confirm = Study.from_config(merged_config(yaml.safe_load((REPO / CONFIRM).read_text())))
    runs = {(v, str(s)) for v, s in confirm.runs()}
    # the key contrast (rdesi vs lossfree) on 18 seeds, topk and the ablations on the first 12 of them
    assert {v: len(confirm.variant_seeds(v)) for v in confirm.variants} == {
        "topk": 12,
        "lossfree": 18,
        "rdesi": 18,
        "rdesi_no_reputation": 12,
        "rdesi_no_load": 12,
        "rdesi_no_bonus": 12,
    }
    assert jobs(done.stdout, "train") == jobs(done.stdout, "evaluate") == runs and len(runs) == 2 * 18 + 4 * 12
    assert "eval_test.json" in done.stdout and "results/confirm/runs/" in done.stdout
    assert "eval_validation.json" not in done.stdout  # scored on the split its contrasts are tested on, only


def test_a_dry_run_of_the_tuning_preset_never_evaluates_the_test_split(checkout):
    done = snakemake("--dry-run", "--configfile", TUNE, cwd=checkout, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eval_validation.json" in done.stdout and "eval_test.json" not in done.stdout
    assert re.search(r"^tuning\s+1$", done.stdout, flags=re.M) and len(jobs(done.stdout, "train")) == 82


def test_the_budget_table_counts_values_seeds_and_ok_runs():
    study = Study.from_config(tuning_study())
    record = study.record()
    design = read_design(record["sweeps"])
    status = pd.DataFrame(
        [(v, s, RUN_OK) for v in study.variants for s in study.seeds if (v, s) != ("rdesi-gamma0.3", 101)]
        + [("rdesi-gamma0.3", 101, "failed")],
        columns=["variant", "seed", "status"],
    )
    budget = tuning_stats.budget_table(record["tuning"], design, study.seeds, status, 1500)
    assert list(budget["variant"]) == ["topk", "rdesi"] and set(budget["kind"]) == {tuning_stats.TUNED}
    assert list(budget["n_values"]) == [2, 2] and list(budget["runs_planned"]) == [4, 4]
    assert list(budget["runs_ok"]) == [4, 3] and list(budget["training_steps"]) == [6000, 6000]
    assert list(budget["values"]) == ["0.003, 0.01", "0.3, 1"]
