"""Per-variant train settings and model sizes (`variants[].train`, `variants[].model`: a longer run, a FLOP-matched
top-1), and training adequacy judged by a longer run (config findings.horizon)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import findings
from gtmoe.errors import ConfigError
from gtmoe.study import Study, run_config_from_record

from helpers import merged_config, tidy_table

LONGER = {"name": "topk_long", "router": "topk", "train": {"max_steps": 3000}}
HORIZON = {"variant": "topk", "longer": "topk_long", "max_gain": 0.05}


def config_with(*variants: dict, **sections) -> dict:
    return merged_config(
        {
            "variants": [
                {"name": "topk", "router": "topk"},
                {"name": "lossfree", "router": "lossfree"},
                {"name": "rdesi", "router": "rdesi"},  # config.yaml's ablation base
                *variants,
            ],
            "ablation": {"variants": []},
            "statistics": {"contrasts": []},
            **sections,
        }
    )


def test_a_variant_trains_with_its_own_train_settings_and_the_record_carries_them():
    logit = {"name": "lf_long", "router": "lossfree", "bias_on": "logits", "train": {"max_steps": 3000}}
    study = Study.from_config(config_with(LONGER, logit, findings={"horizon": HORIZON}))
    assert (
        study.run_config("topk_long", 0).train.max_steps == 3000 and study.run_config("topk", 0).train.max_steps == 1500
    )
    assert study.run_config("topk_long", 0).train.lr == study.run_config("topk", 0).train.lr  # the rest shared
    # Horizon-dependent router options resolve for the variant's own horizon: the logit form's u = travel / steps.
    from gtmoe.routers.lossfree import DEFAULT_BIAS_TRAVEL

    assert study.variants["lf_long"].resolve().bias_update_rate == pytest.approx(DEFAULT_BIAS_TRAVEL / 3000)
    record = study.record()
    assert record["variants"]["topk_long"]["train"] == {"max_steps": 3000} and "train" not in record["variants"]["topk"]
    for variant in ("topk", "topk_long"):
        assert run_config_from_record(record, variant, 1).to_dict() == study.run_config(variant, 1).to_dict()
    assert record["findings"]["horizon"] == HORIZON


def test_a_variant_sets_its_own_model_sizes_and_the_router_is_checked_against_them():
    wide = {"name": "switch_wide", "router": "switch", "model": {"d_expert": 256}}
    study = Study.from_config(config_with(wide))
    assert (
        study.run_config("switch_wide", 0).model.d_expert == 256 and study.run_config("topk", 0).model.d_expert == 128
    )
    record = study.record()
    assert record["variants"]["switch_wide"]["model"] == {"d_expert": 256} and record["run"]["model"]["d_expert"] == 128
    assert run_config_from_record(record, "switch_wide", 2).to_dict() == study.run_config("switch_wide", 2).to_dict()
    # The router's model checks see the variant's own sizes: group-limited routing needs groups that divide E.
    grouped = {"name": "g", "router": "group_limited", "n_groups": 4, "model": {"n_experts": 6}}
    with pytest.raises(ConfigError, match=r"n_groups"):
        Study.from_config(config_with(grouped))


@pytest.mark.parametrize(
    "extra, sections, key, why",
    [
        ({**LONGER, "train": {"seed": 3}}, {}, "variants[3].train.seed", "the seed comes from `seeds`"),
        ({**LONGER, "train": {"max_step": 3}}, {}, "variants[3].train.max_step", "unknown key"),
        ({**LONGER, "train": {"max_steps": 0}}, {}, "variants[3].train.max_steps", ""),
        ({**LONGER, "train": {}}, {}, "variants[3].train", "non-empty mapping"),
        ({**LONGER, "model": {"vocab_size": 512}}, {}, "variants[3].model.vocab_size", "is the study's"),
        ({**LONGER, "model": {"d_exprt": 512}}, {}, "variants[3].model.d_exprt", "unknown key"),
        ({**LONGER, "model": {"top_k": 9}}, {}, "variants[3].model.top_k", "must be <= model.n_experts = 8"),
        (
            LONGER,
            {"sweeps": [{"name": "s", "base": "topk_long", "grid": {"aux_loss_coef": [0.1]}}]},
            "sweeps[0].base",
            "has train or model settings of its own",
        ),
        (
            LONGER,
            {"findings": {"horizon": {**HORIZON, "longer": "lossfree"}}},
            "findings.horizon.longer",
            "trained longer",
        ),
        (LONGER, {"findings": {"horizon": {**HORIZON, "longer": "topk"}}}, "findings.horizon.longer", "not more than"),
        (LONGER, {"findings": {"horizon": {**HORIZON, "max_gain": 1.5}}}, "findings.horizon.max_gain", "between 0"),
        (LONGER, {"findings": {"horizon": {**HORIZON, "variant": "top"}}}, "findings.horizon.variant", "one of"),
        (LONGER, {"findings": {"horizon": {"variant": "topk"}}}, "findings.horizon", "variant, longer and max_gain"),
        (
            {**LONGER, "train": {"max_steps": 3000, "lr": 0.01}},
            {"findings": {"horizon": HORIZON}},
            "findings.horizon.longer",
            "must differ from 'topk' in train.max_steps",
        ),
    ],
)
def test_bad_train_settings_and_horizons_are_refused_naming_the_key(extra, sections, key, why):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*" + re.escape(why)):
        Study.from_config(config_with(extra, **sections))


def test_the_horizon_gain_is_the_paired_difference_and_its_share():
    short = {0: 50.0, 1: 52.0, 2: 49.0, 3: 51.0}
    long = {0: 47.0, 1: 48.5, 2: 47.0, 4: 40.0}  # seed 4 has no short run, seed 3 no long one: not paired
    tidy = tidy_table({"topk": {"ppl": short}, "topk_long": {"ppl": long}}, split="validation")
    result = findings.horizon_gain(tidy, HORIZON, "validation")
    gains = np.array([3.0, 3.5, 2.0])  # short − long on seeds 0, 1, 2
    assert result["n"] == 3 and result["gain"] == pytest.approx(gains.mean())
    low, high = sps.t.interval(0.95, df=2, loc=gains.mean(), scale=sps.sem(gains))
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high))
    assert result["relative"] == pytest.approx(gains.mean() / np.mean([50.0, 52.0, 49.0]))
    assert result["flagged"]  # 5.8% > 5%
    text = findings.plain(findings.horizon_sentence(result, "validation"))
    assert "more steps still gain 2.833 PPL" in text and "more than the declared 5%" in text
    assert not findings.horizon_gain(tidy, {**HORIZON, "max_gain": 0.1}, "validation")["flagged"]
    assert findings.horizon_gain(tidy, None, "validation") is None
    assert "No horizon check declared" in findings.plain(findings.horizon_sentence(None, "validation"))
    other_split = findings.horizon_gain(tidy, HORIZON, "test")
    assert other_split["n"] == 0 and math.isnan(other_split["gain"])
    assert "not checked" in findings.plain(findings.horizon_sentence(other_split, "test"))


def test_the_findings_page_states_the_horizon(tmp_path):
    tidy = tidy_table({"topk": {"ppl": {0: 50.0, 1: 51.0}}, "topk_long": {"ppl": {0: 49.9, 1: 50.95}}})
    result = findings.horizon_gain(tidy, HORIZON, "test")
    assert not result["flagged"]
    assert "Within the declared 5%" in findings.plain(findings.horizon_sentence(result, "test"))
    assert isinstance(pd.DataFrame([result]), pd.DataFrame)
