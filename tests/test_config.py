"""Config loading: unknown keys, wrong types and out-of-range values are errors naming key and value."""

from __future__ import annotations

import pytest
import yaml

from gtmoe.config import ConfigError, RunConfig, from_dict, load_run_config, save_run_config


def load(tmp_path, raw):
    """A run config file of `raw` over an explicit variant and router (which a run file must name)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"variant": "v", "router": {"name": "topk"}, **raw}))
    return load_run_config(path)


@pytest.mark.parametrize(
    "raw, pattern",
    [
        ({"model": {"top_k": 9, "n_experts": 8}}, r"'model.top_k' = 9: must be <= model.n_experts = 8"),
        ({"train": {"lr": 0}}, r"'train.lr' = 0.0: must be > 0"),
        ({"train": {"lr": -1e-3}}, r"'train.lr' = -0.001"),
        ({"router": {"name": "switch", "capacity_factor": -1}}, r"'router.capacity_factor' = -1"),
        ({"router": {"name": "expert_choice", "capacity_factor": 0}}, r"'router.capacity_factor' = 0"),
        ({"model": {"vocab_size": 100}}, r"'model.vocab_size' = 100: must be >= 258"),
        ({"model": {"d_model": 100, "n_heads": 3}}, r"'model.d_model' = 100: must be divisible"),
        ({"model": {"dmodel": 64}}, r"'model.dmodel' = 64: unknown key"),
        ({"colour": "blue"}, r"'colour' = 'blue': unknown key"),
        ({"train": {"max_steps": "many"}}, r"'train.max_steps' = 'many': must be of type int"),
        ({"train": {"compile": "yes"}}, r"'train.compile' = 'yes': must be of type bool"),
        ({"router": {"name": "rdesi", "performance": "vibes"}}, r"'router.performance' = 'vibes'"),
        ({"router": {"name": "nope"}}, r"'router.name' = 'nope': unknown router; known routers:"),
        ({"train": {"warmup_steps": 600, "max_steps": 500}}, r"'train.warmup_steps' = 600"),
    ],
)
def test_bad_values_name_the_key_and_value(tmp_path, raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load(tmp_path, raw)


def test_ints_are_accepted_where_floats_are_expected(tmp_path):
    cfg = load(tmp_path, {"train": {"lr": 1}, "router": {"name": "rdesi", "beta": 1}})
    assert cfg.train.lr == 1.0 and cfg.router.resolve().beta == 1.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load(tmp_path, {"variant": "rdesi_no_load", "router": {"name": "rdesi", "gamma": 0.0}})
    save_run_config(cfg, tmp_path / "resolved.yaml")
    again = load_run_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert again.to_dict()["router"]["beta"] == 0.1  # defaults are written out, not implied


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "absent.yaml")


def test_from_dict_rejects_non_mappings():
    with pytest.raises(ConfigError, match="'model' = 3"):
        from_dict(RunConfig, {"model": 3}, "")
