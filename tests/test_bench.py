"""The benchmark CLI end to end at a tiny size: it runs and writes the documented JSON (timings are not checked),
and reads a study config exactly as the workflow does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.common.configfile import load_configfile
from snakemake.utils import update_config

from gtmoe import routers
from gtmoe.bench import ReplayRouter
from gtmoe.bench.__main__ import build_parser, main, parse_args
from gtmoe.config import RouterConfig
from gtmoe.moe import MoELayer
from gtmoe.study import Study

from helpers import run_module

ROOT = Path(__file__).resolve().parents[1]
SMOKE = [ROOT / "config.yaml", ROOT / "workflow/presets/smoke.yaml"]
TINY = [
    "--device",
    "cpu",
    "--d-model",
    "32",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--tokens",
    "64",
    "--seq-len",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--vocab",
    "300",
    "--repeats",
    "2",
    "--warmup",
    "1",
    "--gemm-size",
    "256",
]
STEP_KEYS = {
    "step_s",
    "ratio_to_reference",
    "tokens_per_s",
    "flops_per_step",
    "flops_per_s",
    "gemm_fraction",
    "mfu",
    "eval_s",
    "eval_tokens_per_s",
    "eval_to_train",
    "matmul_share",  # CPU only, as these tests run
    "matmul_only_gemm_fraction",
}
COMPILED_KEYS = {
    "compiled_step_s",
    "compiled_tokens_per_s",
    "compile_speedup",
    "compiled_gemm_fraction",
    "compiled_mfu",
}
TOP_KEYS = {
    "device",
    "device_name",
    "torch",
    "threads",
    "load_average",
    "config",
    "run_configs",
    "gemm",
    "moe_layer",
    "train_step",
}


def run_cli(tmp_path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    done = run_module("gtmoe.bench", *TINY, *extra, "--json", out, check=True)
    return json.loads(out.read_text()), done.stdout


def test_cli_times_every_router_and_writes_json(tmp_path):
    result, stdout = run_cli(tmp_path)
    assert TOP_KEYS <= result.keys()
    layer = result["moe_layer"]
    assert layer.keys() == {"moe_s", "dense_s", "ratio", "d_expert", "dense_hidden"} | {
        f"{part}_{unit}" for part in ("experts", "fixed_routing") for unit in ("s", "ratio")
    }
    for part in ("experts", "fixed_routing"):  # ratios of the medians the JSON holds
        assert layer[f"{part}_ratio"] == pytest.approx(layer[f"{part}_s"] / layer["dense_s"])
    assert "its experts alone (rows sorted by expert)" in stdout and "with a routing replayed" in stdout
    assert result["moe_layer"]["dense_hidden"] == 2 * result["moe_layer"]["d_expert"] == 2 * 64  # k * (4 d / k)
    variants = result["train_step"]["variants"]
    assert set(variants) == set(routers.known())
    for name, row in variants.items():
        assert row.keys() == STEP_KEYS | {"ratio_to_topk"}, name
        assert row["mfu"] is None  # no bf16 peak on CPU
        assert row["tokens_per_s"] > 0 and row["eval_tokens_per_s"] > 0 and row["gemm_fraction"] > 0
        # The step's matmuls are part of it, and alone would reach a larger fraction of the peak.
        assert 0 < row["matmul_share"] < 1
        assert row["matmul_only_gemm_fraction"] == pytest.approx(row["gemm_fraction"] / row["matmul_share"])
    assert variants["topk"]["ratio_to_topk"] == 1.0
    assert "n/a" in stdout and all(name in stdout for name in variants)


def test_compile_flag_adds_compiled_columns(tmp_path):
    """The compiled columns, through the graph that inductor would receive (aot_eager: no code generation, seconds
    instead of a minute of C++ compiles; inductor's kernels are checked against eager in test_compile.py)."""
    result, stdout = run_cli(tmp_path, "--compile", "--compile-backend", "aot_eager", "--routers", "topk")
    assert result["train_step"]["variants"]["topk"].keys() == STEP_KEYS | {"ratio_to_topk"} | COMPILED_KEYS
    assert result["config"]["compile_backend"] == "aot_eager"
    assert "speedup" in stdout and "torch.compile backend aot_eager" in stdout


def test_every_option_is_documented():
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_sync_debug_needs_cuda(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cpu", "--sync-debug"])
    assert exit_info.value.code == 2
    assert "--sync-debug needs a CUDA device" in capsys.readouterr().err


def test_config_measures_every_variant_at_the_study_size(tmp_path):
    """config.yaml + the smoke preset + an overlay with a horizon-dependent router option, merged as Snakemake does."""
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "variants": [
                    {"name": "topk", "router": "topk"},
                    {"name": "lossfree", "router": "lossfree", "bias_on": "logits", "bias_travel": 10.0},
                ],
                "ablation": {"base": "topk"},
                "sweeps": [],  # the smoke preset sweeps rdesi, which this overlay leaves out
                "statistics": {"contrasts": []},  # the smoke preset's contrast names rdesi too
            }
        )
    )
    out = tmp_path / "bench.json"
    done = run_module(
        "gtmoe.bench",
        "--device",
        "cpu",
        "--config",
        ROOT / "config.yaml",
        ROOT / "workflow/presets/smoke.yaml",
        overlay,
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--gemm-size",
        "512",
        "--json",
        out,
        check=True,
    )
    result = json.loads(out.read_text())
    assert TOP_KEYS <= result.keys()
    assert result["threads"] == 1  # as the study's jobs run
    smoke = yaml.safe_load((ROOT / "workflow/presets/smoke.yaml").read_text())
    config = result["config"]
    assert (config["d_model"], config["vocab"], config["seq_len"]) == (32, 512, smoke["data"]["seq_len"])
    assert config["tokens"] == smoke["train"]["batch_size"] * smoke["data"]["seq_len"]
    runs = result["run_configs"]
    assert set(runs) == {"topk", "lossfree"}  # the overlay's list replaced the preset's
    assert runs["lossfree"]["model"]["positional"] == "rope"  # config.yaml's key, kept under the preset's mapping
    # The horizon option is resolved as in the workflow: bias_travel / max_steps (the logit-bias form).
    assert runs["lossfree"]["router"]["bias_update_rate"] == pytest.approx(10.0 / smoke["train"]["max_steps"])

    assert result["gemm"]["size"] == 512 and result["gemm"]["flops_per_s"] > 0
    layer = result["moe_layer"]
    assert layer["d_expert"] == smoke["model"]["d_expert"] and layer["ratio"] > 0
    train = result["train_step"]
    assert train["reference"] == "topk" and train["tokens_per_step"] == config["tokens"]
    assert set(train["variants"]) == {"topk", "lossfree"}
    for name, row in train["variants"].items():
        assert row.keys() >= STEP_KEYS, name
        assert row["tokens_per_s"] > 0 and row["eval_tokens_per_s"] > 0, name
        assert 0 < row["gemm_fraction"] < 1.5, name
    assert all(name in done.stdout for name in ("topk", "lossfree", "eval tok/s", "GEMM"))


def test_config_rejects_size_flags_and_unknown_variants(capsys):
    smoke = list(map(str, SMOKE))
    for extra, message in (
        (["--d-model", "64"], "--d-model: the sizes come from --config"),
        (["--routers", "nope"], "unknown variant(s) nope"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--device", "cpu", "--config", *smoke, *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    args = parse_args(["--device", "cpu", "--config", *smoke, "--routers", "rdesi"])
    assert list(args.runs) == ["topk", "rdesi"] and args.threads == 1  # the reference is always added


def test_config_gives_the_workflows_run_configs():
    """`--config FILES` resolves to the run configs the workflow's jobs get from `snakemake --configfile FILES`:
    Snakemake's loader and merge, then the study resolver."""
    config: dict = {}
    for path in SMOKE:
        update_config(config, load_configfile(str(path)))
    study = Study.from_config(config)
    args = parse_args(["--device", "cpu", "--seed", "3", "--config", *map(str, SMOKE)])
    assert set(args.runs) == set(study.variant_names) and args.reference == study.reference
    for name, cfg in args.runs.items():
        assert cfg == study.run_config(name, 3), name
    assert args.seq_len == config["data"]["seq_len"] and args.d_model == config["model"]["d_model"]


@pytest.mark.parametrize(
    ("content", "message"),
    (
        ({"reference": "nope"}, "config key 'reference' = 'nope': must be one of the variants"),
        (["not", "a", "mapping"], "must be a mapping of config sections"),
        ("seeds: [0]\nseeds: [1]\n", "duplicate key"),  # strict, as the workflow re-reads every file
        (None, "does not exist"),
    ),
)
def test_bad_config_is_one_error_line(tmp_path, capsys, content, message):
    """A config problem is one `error:` line and exit status 2, not a traceback or argparse's usage."""
    overlay = tmp_path / "overlay.yaml"
    if content is not None:
        overlay.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--config", *map(str, SMOKE), str(overlay)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_replayed_routing_computes_the_layer_the_router_computed():
    """The benchmark's fixed-routing candidate is the same layer, less the router's work."""
    torch.manual_seed(0)
    router = routers.get("topk")(RouterConfig.from_mapping({"name": "topk"}).resolve(), 32, 4, 2)
    layer = MoELayer(router, 32, 16, 4).train()
    x = torch.randn(64, 32)
    routed = layer(x)
    replay = MoELayer(ReplayRouter(layer.last_routing, 4), 32, 16, 4)
    replay.experts = layer.experts
    assert torch.equal(replay(x), routed)
