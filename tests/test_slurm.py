"""`snakemake --profile slurm` against a real single-node SLURM, with a training job preempted by scancel.

Needs the daemons of tests/slurm/start_slurm.sh (`.ci/run` installs and starts them); skips with the
reason where SLURM is not there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import RUN_FILES, SMOKE, SUMMARY_FILES, copy_checkout, copy_data_stage, run_module

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

PREEMPTED = ("topk", 0)  # the (variant, seed) whose training is cancelled mid-run
TIMING_FIELDS = {"tokens_per_s", "wall_s", "peak_mem_mb"}
# Long enough to cancel in the middle; checkpoints often enough to resume from one. The smoke preset's two
# variants with one seed and without its sweep: two runs show every job going through sbatch (more seeds and the
# sweep add only more of the same jobs, each paying two Snakemake start-ups on the node).
LONGER_TRAINING = {
    "train": {"max_steps": 200, "checkpoint_every": 10, "log_every": 10, "router_log_every": 10},
    "seeds": [0],
    "sweeps": [],
}


def slurm_problem() -> str | None:
    try:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except FileNotFoundError:
        return "SLURM is not installed (tests/slurm/install_slurm.sh; .ci/run installs it)"
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s: is slurmctld running? (tests/slurm/start_slurm.sh)"
    if state.returncode != 0:
        return f"sinfo failed: {state.stderr.strip()} (start SLURM with tests/slurm/start_slurm.sh)"
    if not {"idle", "mixed", "allocated"} & set(state.stdout.split()):
        return f"no usable SLURM node (states: {state.stdout.split()}); see tests/slurm/start_slurm.sh"
    return None


def job_id_of_training(variant: str, seed: int) -> str | None:
    """The SLURM id of the running train job of (variant, seed), from the plugin's job comment."""
    queue = subprocess.run(["squeue", "-h", "-o", "%i %k %T"], capture_output=True, text=True).stdout
    for line in queue.splitlines():
        job_id, comment, state = line.split()
        if comment == f"rule_train_wildcards_{variant}_{seed}" and state == "RUNNING":
            return job_id
    return None


@pytest.fixture(scope="module")
def slurm_study(finished_smoke, tmp_path_factory):
    if reason := slurm_problem():
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    study = copy_checkout(root / "study")
    # The finished smoke study's data stage: the jobs sent through SLURM are training and evaluation, the jobs a
    # cluster is for, without first waiting on five more links of sbatch polling.
    copy_data_stage(finished_smoke, study)
    override = root / "longer.yaml"
    override.write_text(yaml.safe_dump(LONGER_TRAINING))
    # Short status polls (the profile's first after 10 s and Snakemake's every 10 s suit real clusters; here they
    # would dominate).
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--profile",
        "slurm",
        "--configfile",
        SMOKE,
        str(override),
        "--slurm-keep-successful-logs",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--seconds-between-status-checks",
        "2",
    ]
    log = open(root / "snakemake.log", "w")
    process = subprocess.Popen(command, cwd=study, stdout=log, stderr=subprocess.STDOUT, text=True)

    variant, seed = PREEMPTED
    run = study / "results" / "smoke" / "runs" / variant / f"seed{seed}"
    cancelled = None
    deadline = time.monotonic() + 600
    while cancelled is None and process.poll() is None and time.monotonic() < deadline:
        job_id = job_id_of_training(variant, seed)
        if job_id and (run / "checkpoint_last.pt").exists() and not (run / "checkpoint.pt").exists():
            subprocess.run(["scancel", job_id], check=True)
            cancelled = job_id
        time.sleep(0.2)
    try:
        process.wait(timeout=max(60.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    output = (root / "snakemake.log").read_text()
    assert process.returncode == 0, output[-4000:]
    assert cancelled, "the training job finished before it could be cancelled"
    return study, cancelled, output


def test_smoke_study_runs_through_sbatch(slurm_study):
    study, _, output = slurm_study
    smoke = yaml.safe_load((study / SMOKE).read_text())
    variants, seeds = [v["name"] for v in smoke["variants"]], LONGER_TRAINING["seeds"]
    for variant in variants:
        for seed in seeds:
            for name in RUN_FILES:
                assert (study / "results" / "smoke" / "runs" / variant / f"seed{seed}" / name).stat().st_size > 0
    for name in SUMMARY_FILES:
        if not name.startswith("sensitivity"):  # no sweep here
            assert (study / "results" / "smoke" / "summary" / name).stat().st_size > 0
    assert (study / "results" / "smoke" / "report.html").stat().st_size > 0
    # Every training and evaluation job was a SLURM job: the plugin keeps one log per SLURM job id.
    for rule in ("train", "evaluate"):
        job_logs = list((study / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob("*.log"))
        assert len(job_logs) >= len(variants) * len(seeds), (rule, job_logs)
        assert all(log.stem.isdigit() for log in job_logs)
    assert "Job" in output and "has been submitted with SLURM jobid" in output
    assert "rule corpus" not in output and "rule shards" not in output  # the data stage was there already


def test_preempted_training_resumes_and_matches_an_uninterrupted_run(slurm_study, tmp_path):
    study, cancelled, output = slurm_study
    variant, seed = PREEMPTED
    run = study / "results" / "smoke" / "runs" / variant / f"seed{seed}"
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in output
    train_log = (study / "results" / "smoke" / "logs" / "train" / variant / f"seed{seed}.log").read_text()
    assert f"resuming {Path('results/smoke/runs') / variant / f'seed{seed}'} from step" in train_log

    # The same run, uninterrupted, through the engine's CLI on the same inputs and thread count
    # (float reductions, so bitwise results, depend on the number of threads).
    reference = tmp_path / "uninterrupted"
    resources = yaml.safe_load((study / SMOKE).read_text())["resources"]
    for args in (
        [
            "train",
            "--config",
            str(run / "config.yaml"),
            "--out",
            str(reference),
            "--threads",
            str(resources["train"]["threads"]),
        ],
        [
            "evaluate",
            "--run",
            str(reference),
            "--split",
            "test",
            "--out",
            str(reference / "eval_test.json"),
            "--threads",
            str(resources["evaluate"]["threads"]),
        ],
    ):
        run_module("gtmoe", *args, cwd=study, check=True)
    resumed = json.loads((run / "eval_test.json").read_text())
    expected = json.loads((reference / "eval_test.json").read_text())
    assert {k: v for k, v in resumed.items() if k not in TIMING_FIELDS} == {
        k: v for k, v in expected.items() if k not in TIMING_FIELDS
    }
    final, uninterrupted = (
        torch.load(path / "checkpoint.pt", weights_only=False)["model"] for path in (run, reference)
    )
    assert all(torch.equal(final[key], uninterrupted[key]) for key in final)
