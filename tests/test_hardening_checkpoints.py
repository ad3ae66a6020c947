"""Issue 22, items 6 and 8: every checkpoint a run reads is tied to that run, and evaluation's memory.

Each checkpoint records the run that wrote it (variant, seed, step; gtmoe.runfiles.checkpoint_identity) and
its run config; the rolling and finished checkpoints also record the saturation checkpoint's step and sha256
(its manifest entry). `gtmoe evaluate` refuses a missing or foreign saturation checkpoint, and a checkpoint
written before identities, with one error line naming the file and how to retrain. Evaluation reads only
the weights of both checkpoints; its memory estimate covers the count matrices the metrics need.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from gtmoe import evaluate as evaluate_module
from gtmoe import metrics
from gtmoe.__main__ import main
from gtmoe.config import RUNTIME_OVERHEAD_MB, memory_estimate_mb, save_run_config
from gtmoe.contract import CHECKPOINT, RESUME_CHECKPOINT, SATURATION_CHECKPOINT
from gtmoe.errors import ConfigError
from gtmoe.files import file_entry
from gtmoe.runfiles import load_checkpoint, manifest_path, save_checkpoint
from gtmoe.train import train

from conftest import tiny_run
from helpers import check_like_the_snakefile, merged_config, run_module, single_error_line

STEPS = 8  # the saturation checkpoint is written at step 4 (train.saturation_checkpoint 0.5)


def _train(tmp_path, shards, router="topk", seed=0, name=None, **train_options):
    cfg = tiny_run(shards, router, seed, max_steps=STEPS, checkpoint_every=4, **train_options)
    run = tmp_path / (name or f"{router}-seed{seed}")
    save_run_config(cfg, tmp_path / f"{run.name}.yaml")
    train(cfg, run)
    return run


def _evaluate(run, capsys):
    """`gtmoe evaluate` of the test split; returns (exit code, the single error line or None)."""
    out = run / "eval_test.json"
    code = main(["evaluate", "--run", str(run), "--split", "test", "--out", str(out)])
    captured = capsys.readouterr()
    if code == 0:
        assert out.exists()
        return code, None
    assert not out.exists()
    return code, single_error_line(captured.err)


def _copy_checkpoint(source, run, name=SATURATION_CHECKPOINT):
    for path in (source / name, manifest_path(source / name)):
        shutil.copy2(path, run / path.name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards):
    """Three finished runs: topk seeds 0 and 1, rdesi seed 0 (copied per test before any change)."""
    root = tmp_path_factory.mktemp("runs")
    return {
        name: _train(root, tiny_shards, *key)
        for name, key in (("topk0", ("topk", 0)), ("topk1", ("topk", 1)), ("rdesi0", ("rdesi", 0)))
    }


@pytest.fixture
def run_copies(runs, tmp_path):
    return {name: shutil.copytree(run, tmp_path / name) for name, run in runs.items()}


# --------------------------------------------------------------------------- what the checkpoints record


def test_each_checkpoint_records_its_run_and_the_saturation_checkpoint_it_wrote(runs):
    run = runs["topk0"]
    final, saturation = load_checkpoint(run / CHECKPOINT), load_checkpoint(run / SATURATION_CHECKPOINT)
    assert final["run"] == {"variant": "topk", "seed": 0, "step": STEPS}
    assert saturation["run"] == {"variant": "topk", "seed": 0, "step": STEPS // 2}
    assert saturation["config"] == final["config"] and saturation["step"] == STEPS // 2
    entry = file_entry(run / SATURATION_CHECKPOINT)  # the file's own size and sha256, recomputed
    assert final["saturation"] == {"file": SATURATION_CHECKPOINT, "step": STEPS // 2, **entry}


def test_a_resumed_run_still_records_the_saturation_checkpoint_written_before_the_stop(tmp_path, tiny_shards):
    cfg = tiny_run(tiny_shards, "topk", 0, max_steps=STEPS, checkpoint_every=2)
    run = tmp_path / "run"
    train(cfg, run, stop_after=6)  # past the saturation checkpoint (step 4), then a new process resumes
    assert load_checkpoint(run / RESUME_CHECKPOINT)["saturation"]["step"] == STEPS // 2
    train(cfg, run)
    final = load_checkpoint(run / CHECKPOINT)
    assert final["saturation"] == {
        "file": SATURATION_CHECKPOINT,
        "step": STEPS // 2,
        **file_entry(run / SATURATION_CHECKPOINT),
    }
    train(cfg, tmp_path / "uninterrupted")  # the identity changes no computation: the same weights
    uninterrupted = load_checkpoint(tmp_path / "uninterrupted" / CHECKPOINT)["model"]
    assert all(torch.equal(final["model"][key], uninterrupted[key]) for key in uninterrupted)


# --------------------------------------------------------------------------- evaluate refuses what is not the run's


def test_evaluate_refuses_a_missing_saturation_checkpoint_and_its_recovery_works(run_copies, tmp_path, capsys):
    run = run_copies["topk0"]
    config = shutil.copy2(run / "config.yaml", tmp_path / "topk0.yaml")
    for path in (run / SATURATION_CHECKPOINT, manifest_path(run / SATURATION_CHECKPOINT)):
        path.unlink()
    code, error = _evaluate(run, capsys)
    assert code == 2
    assert f"checkpoint {run / SATURATION_CHECKPOINT} is missing" in error and "router saturation" in error
    assert f"retrain the run: delete {run} and rerun snakemake (or `python -m gtmoe train --out {run}`" in error
    shutil.rmtree(run)  # what the message says
    done = run_module("gtmoe", "train", "--config", config, "--out", run)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _evaluate(run, capsys) == (0, None)
    assert json.loads((run / "eval_test.json").read_text())["router_saturation"] is not None


@pytest.mark.parametrize("source", ["topk1", "rdesi0"])
def test_evaluate_refuses_another_runs_saturation_checkpoint(run_copies, source, capsys):
    run = run_copies["topk0"]
    _copy_checkpoint(run_copies[source], run)  # with its manifest: the file verifies, but is not this run's
    code, error = _evaluate(run, capsys)
    assert code == 2
    variant, seed = ("topk", 1) if source == "topk1" else ("rdesi", 0)
    written = f"was written by another run (variant {variant!r}, seed {seed}), not by this one (variant 'topk', seed 0)"
    assert f"checkpoint {run / SATURATION_CHECKPOINT} {written}" in error
    assert f"retrain the run: delete {run}" in error


def test_topk_saturation_checkpoint_in_an_rdesi_run_is_one_error_line_from_the_command(run_copies):
    run = run_copies["rdesi0"]
    _copy_checkpoint(run_copies["topk0"], run)
    done = run_module("gtmoe", "evaluate", "--run", run, "--split", "test", "--out", run / "eval_test.json")
    assert done.returncode == 2
    error = single_error_line(done.stderr)  # no state_dict traceback
    assert str(run / SATURATION_CHECKPOINT) in error and "variant 'topk', seed 0" in error
    assert not (run / "eval_test.json").exists()


def test_a_copied_file_without_its_manifest_is_refused_by_the_manifest(run_copies, capsys):
    run = run_copies["topk0"]
    shutil.copy2(run_copies["topk1"] / SATURATION_CHECKPOINT, run / SATURATION_CHECKPOINT)
    code, error = _evaluate(run, capsys)
    assert code == 2 and str(run / SATURATION_CHECKPOINT) in error and "does not match" in error


def test_a_saturation_checkpoint_of_the_same_run_config_but_other_content_is_refused(run_copies, capsys):
    run = run_copies["topk0"]
    path = run / SATURATION_CHECKPOINT
    state = load_checkpoint(path)
    state["model"] = {
        key: value + 1e-3 if value.is_floating_point() else value for key, value in state["model"].items()
    }
    save_checkpoint({key: value for key, value in state.items() if key != "model_format"}, path)  # identity kept
    code, error = _evaluate(run, capsys)
    assert code == 2
    assert f"checkpoint {path} is not the saturation checkpoint this run wrote: checkpoint.pt records step 4" in error
    assert "(copied from another run, or rewritten)" in error and f"retrain the run: delete {run}" in error


def test_a_saturation_checkpoint_of_another_run_config_names_the_keys(tmp_path, tiny_shards, run_copies, capsys):
    other = _train(tmp_path, tiny_shards, "topk", 0, name="lr", lr=1e-3)  # same variant and seed, another lr
    run = run_copies["topk0"]
    _copy_checkpoint(other, run)
    code, error = _evaluate(run, capsys)
    assert code == 2
    assert f"checkpoint {run / SATURATION_CHECKPOINT} was written by another run: train.lr (0.001 in" in error


def _strip(path, *keys, **replace):
    state = load_checkpoint(path)
    kept = {key: value for key, value in state.items() if key not in (*keys, "model_format")}
    save_checkpoint({**kept, **replace}, path)


@pytest.mark.parametrize(
    "file, keys, replace, expected",
    [
        (
            CHECKPOINT,
            ("run", "saturation"),
            {},
            "records no run identity (variant, seed, step): it was written by an older version",
        ),
        (
            SATURATION_CHECKPOINT,
            ("run", "config"),
            {},
            "records no run identity (variant, seed, step): it was written by an older version",
        ),
        (
            CHECKPOINT,
            (),
            {"saturation": None},
            "records no saturation checkpoint (checkpoint_saturation.pt and its sha256)",
        ),
        (
            CHECKPOINT,
            (),
            {"run": {"variant": "topk", "seed": 0, "step": 3}},
            "records step 3 in its identity but holds step 8",
        ),
    ],
    ids=["final-before-identities", "saturation-before-identities", "no-saturation-record", "step"],
)
def test_a_checkpoint_without_the_identity_fields_asks_to_retrain(run_copies, capsys, file, keys, replace, expected):
    run = run_copies["topk0"]
    _strip(run / file, *keys, **replace)
    code, error = _evaluate(run, capsys)
    assert code == 2
    assert f"checkpoint {run / CHECKPOINT if 'saturation checkpoint (' in expected else run / file}" in error
    assert expected in error and f"retrain the run: delete {run} and rerun snakemake" in error


def test_a_dense_run_needs_no_saturation_checkpoint(tmp_path, tiny_shards, capsys):
    run = _train(tmp_path, tiny_shards, "dense", 0)
    (run / SATURATION_CHECKPOINT).unlink()
    code, _ = _evaluate(run, capsys)
    assert code == 0


# --------------------------------------------------------------------------- evaluation's memory


@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 20])
def test_the_mutual_information_in_row_chunks_is_the_metric_bit_for_bit(monkeypatch, chunk):
    monkeypatch.setattr(evaluate_module, "MI_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(chunk)
    shapes = [(1, 3), (7, 1), (300, 1), (500, 2), (200, 3), (1000, 8), (130, 64), (40, 300)]
    for vocab, experts in shapes:
        counts = (rng.random((vocab, experts + 1)) < rng.random() * 0.4) * rng.integers(0, 40, (vocab, experts + 1))
        counts[rng.random(vocab) < 0.5] = 0  # token ids never seen
        joint = torch.from_numpy(counts)[:, :experts]  # as LayerStats.summary passes it: the overflow slot cut off
        expected = metrics.token_expert_mutual_information(counts[:, :experts])
        got = evaluate_module.token_expert_mutual_information(joint)
        assert got == expected or (np.isnan(got) and np.isnan(expected)), (vocab, experts, chunk)
    assert np.isnan(evaluate_module.token_expert_mutual_information(torch.zeros((5, 4), dtype=torch.long)))


def test_the_evaluation_estimate_counts_the_count_matrices_and_refuses_what_it_cannot_hold():
    # The case: vocabulary 65,536 and 4,096 experts at d_model 8 passed and peaked at 9 GB. The dense
    # variant (no count matrices) fits 3,000 MB; topk's two (65,536 x 4,097) int64 matrices (4.3 GB) do not.
    model = {"vocab_size": 65536, "d_model": 8, "n_heads": 2, "n_experts": 4096, "d_expert": 16}
    override = {
        "data": {"vocab_size": 65536},
        "model": model,
        "resources": {"train": {"mem_mb": 100_000}, "evaluate": {"mem_mb": 3000}},
    }
    with pytest.raises(ConfigError, match=r"'resources.evaluate.mem_mb' = 3000: variant 'topk' needs an estimated"):
        check_like_the_snakefile(merged_config(override))
    cfg = tiny_run("shards", "topk")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    matrices_mb = 2 * 65536 * 4097 * 8 / 2**20  # two MoE layers of (token id, expert) int64 counts
    assert memory_estimate_mb(cfg, 16, "evaluate") > matrices_mb + RUNTIME_OVERHEAD_MB
    # a GPU job keeps them on the device: the host holds the models and the mutual information's chunks
    assert memory_estimate_mb(cfg, 16, "evaluate", activations=False) < RUNTIME_OVERHEAD_MB + 400
