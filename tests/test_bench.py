"""The benchmark CLI end to end at a tiny size: it runs and writes the documented JSON (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gtmoe import routers
from gtmoe.bench import build_parser, parse_args

TINY = ["--device", "cpu", "--d-model", "32", "--experts", "4", "--top-k", "2", "--tokens", "64", "--seq-len", "16",
        "--layers", "1", "--heads", "2", "--vocab", "300", "--repeats", "2", "--warmup", "1"]
STEP_KEYS = {"step_s", "ratio_to_topk", "tokens_per_s", "flops_per_step", "mfu"}
COMPILED_KEYS = {"compiled_step_s", "compiled_tokens_per_s", "compile_speedup", "compiled_mfu"}


def run_cli(tmp_path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "gtmoe.bench", *TINY, *extra, "--json", str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(out.read_text()), done.stdout


def test_cli_times_every_router_and_writes_json(tmp_path):
    result, stdout = run_cli(tmp_path)
    assert {"device", "device_name", "torch", "threads", "load_average", "config", "moe_layer", "train_step"} <= result.keys()
    assert result["moe_layer"].keys() == {"moe_s", "dense_s", "ratio", "d_expert", "dense_hidden"}
    assert result["moe_layer"]["dense_hidden"] == 2 * result["moe_layer"]["d_expert"] == 2 * 64  # k * (4 d / k)
    variants = result["train_step"]["variants"]
    assert set(variants) == set(routers.known())
    for name, row in variants.items():
        assert row.keys() == STEP_KEYS, name
        assert row["mfu"] is None  # no bf16 peak on CPU
    assert variants["topk"]["ratio_to_topk"] == 1.0
    assert "n/a" in stdout and all(name in stdout for name in variants)


@pytest.mark.slow
def test_compile_flag_adds_compiled_columns(tmp_path):
    result, stdout = run_cli(tmp_path, "--compile", "--routers", "topk")
    assert result["train_step"]["variants"]["topk"].keys() == STEP_KEYS | COMPILED_KEYS
    assert "speedup" in stdout


def test_every_option_is_documented():
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_sync_debug_needs_cuda(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cpu", "--sync-debug"])
    assert exit_info.value.code == 2
    assert "--sync-debug needs a CUDA device" in capsys.readouterr().err
