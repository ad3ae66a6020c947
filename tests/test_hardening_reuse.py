"""A run is reused only if it is the run the study asks for, and deleted outputs are rebuilt (issue 22, items 2
and 3): on a copy of one finished smoke study, with and without Snakemake's metadata (.snakemake/), through
`snakemake` itself; and every recovery message that says "delete … and rerun snakemake" is followed as
written."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
import yaml

from helpers import SMOKE, copy_study, run_module, single_error_line, snakemake

pytestmark = pytest.mark.integration

ROOT = "results/smoke"
RUNS = f"{ROOT}/runs"
SMOKE_RUNS = 8  # (topk, rdesi and its sweep's two points) x 2 seeds
RDESI_RUNS = 6  # rdesi and its sweep's two points (rdesi with another c) x 2 seeds
ANALYSIS = ("aggregate", "statistics", "figures", "findings", "compute", "sensitivity", "specialisation")


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count} (without the total); {} when nothing is to be done."""
    if "Job stats:" not in output:
        return {}
    counts = {}
    for line in output.split("Job stats:", 1)[1].splitlines()[3:]:
        match = re.match(r"^([\w.-]+)\s+(\d+)$", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    counts.pop("total", None)
    return counts


def plan(study, *args):
    done = snakemake("--dry-run", "--configfile", SMOKE, *args, cwd=study)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return job_counts(done.stdout), done.stdout + done.stderr


def build(study, *args):
    done = snakemake("--cores", "2", "--configfile", SMOKE, *args, cwd=study, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def nothing_to_do(study, *args):
    counts, output = plan(study, *args)
    assert counts == {} and "Nothing to be done" in output, output[-3000:]


def run_statuses(study) -> dict[tuple[str, int], str]:
    import pandas as pd

    table = pd.read_csv(study / ROOT / "summary" / "run_status.csv")
    return {(row.variant, int(row.seed)): row.status for row in table.itertuples()}


@pytest.fixture
def study(finished_smoke, tmp_path):
    """A copy of the finished smoke study (mtimes and Snakemake's records kept)."""
    return copy_study(finished_smoke, tmp_path / "copy")


def test_the_finished_study_has_nothing_to_do(study):
    nothing_to_do(study)


def edited_preset(study, **rdesi) -> str:
    """The smoke preset with rdesi's options changed, written beside it; returns its path in the study."""
    smoke = yaml.safe_load((study / SMOKE).read_text())
    smoke["variants"] = [v if v["name"] != "rdesi" else {**v, **rdesi} for v in smoke["variants"]]
    path = study / "workflow" / "presets" / "smoke_edited.yaml"
    path.write_text(yaml.safe_dump(smoke, sort_keys=False))
    return str(path.relative_to(study))


# --------------------------------------------------------------- item 2: the run the study asks for


def test_a_changed_variant_retrains_its_runs_without_snakemake_metadata(study):
    shutil.rmtree(study / ".snakemake")
    nothing_to_do(study)  # the metadata alone is not a reason to retrain
    edited = edited_preset(study, beta=0.2)
    counts, output = plan(study, "--configfile", edited)
    assert counts["train"] == RDESI_RUNS and counts["evaluate"] == RDESI_RUNS, output[-3000:]
    assert f"{RUNS}/rdesi/seed0 is not the run the study asks for: router.beta (0.1 in config.yaml, 0.2 in" in (
        output
    ), output[-3000:]
    # The variant's two runs (its sweep's four would retrain the same way); targets before --configfile.
    targets = [f"{RUNS}/rdesi/seed{seed}/checkpoint.pt" for seed in (0, 1)]
    done = snakemake("--cores", "2", *targets, "--configfile", SMOKE, edited, cwd=study, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for seed in (0, 1):
        recorded = yaml.safe_load((study / RUNS / "rdesi" / f"seed{seed}" / "config.yaml").read_text())
        assert recorded["router"]["beta"] == 0.2
        topk = yaml.safe_load((study / RUNS / "topk" / f"seed{seed}" / "config.yaml").read_text())
        assert topk["router"]["name"] == "topk"
    counts, output = plan(study, "--configfile", edited)  # without metadata still: only the sweep's runs are left
    assert counts["train"] == RDESI_RUNS - 2 and "rdesi/seed0 is not the run" not in output, output[-3000:]


def test_a_run_directory_copied_over_another_is_retrained_with_or_without_metadata(study):
    for run in ("seed1", "seed0"):
        shutil.rmtree(study / RUNS / "topk" / "seed1")
        shutil.copytree(study / RUNS / "topk" / "seed0", study / RUNS / "topk" / "seed1")  # the wrong seed
        counts, output = plan(study)
        assert counts["train"] == 1 and counts["evaluate"] == 1, output[-3000:]
        assert f"{RUNS}/topk/seed1 is not the run the study asks for: train.seed (0 in config.yaml, 1 in" in output
        if run == "seed1":
            shutil.rmtree(study / ".snakemake")


def test_an_unreadable_run_config_retrains_its_run(study):
    (study / RUNS / "topk" / "seed0" / "config.yaml").write_text("model: [unclosed\n")
    counts, output = plan(study)
    assert counts["train"] == 1 and counts["evaluate"] == 1, output[-3000:]
    assert f"{RUNS}/topk/seed0/config.yaml is unreadable" in output


def test_an_edit_that_cannot_change_the_weights_retrains_nothing_without_metadata(study):
    shutil.rmtree(study / ".snakemake")
    smoke = yaml.safe_load((study / SMOKE).read_text())
    smoke["train"]["log_every"] = 4
    (study / "workflow" / "presets" / "smoke_edited.yaml").write_text(yaml.safe_dump(smoke))
    counts, output = plan(study, "--configfile", "workflow/presets/smoke_edited.yaml")
    assert "train" not in counts and "is not the run" not in output, output[-3000:]


# --------------------------------------------------------------- item 3: deleted outputs are rebuilt

DELETIONS = {
    "an evaluation": ([f"{RUNS}/rdesi/seed1/eval_validation.json"], {"evaluate": 1}),
    "a run file": ([f"{RUNS}/topk/seed0/train_log.parquet"], {"train": 1, "evaluate": 1}),
    "a run directory": ([f"{RUNS}/topk/seed1"], {"train": 1, "evaluate": 1}),
    "the tokenizer": (
        [f"{ROOT}/data/tokenizer.json"],
        {"tokenizer": 1, "shards": 3, "ngram_baselines": 1, "train": SMOKE_RUNS, "evaluate": SMOKE_RUNS},
    ),
    "the corpus": (
        [f"{ROOT}/data/corpus"],
        {"corpus": 1, "tokenizer": 1, "shards": 3, "ngram_baselines": 1, "train": SMOKE_RUNS, "evaluate": SMOKE_RUNS},
    ),
    # (the statistics table shows the baselines; no run reads them)
    "the n-gram baselines": ([f"{ROOT}/baselines/ngram.json"], {"ngram_baselines": 1}, {"statistics", "compute"}),
    # (the smoke preset takes routing snapshots: its runs read the probe from the validation shards)
    "a shard directory": (
        [f"{ROOT}/data/shards/validation"],
        {"shards": 1, "ngram_baselines": 1, "train": SMOKE_RUNS, "evaluate": SMOKE_RUNS},
    ),
}


@pytest.mark.parametrize("metadata", [True, False], ids=["with-metadata", "without-metadata"])
@pytest.mark.parametrize("what", DELETIONS)
def test_a_deleted_output_is_rebuilt_with_exactly_what_is_built_from_it(study, what, metadata):
    paths, rebuilt, *tables = DELETIONS[what]
    tables = tables[0] if tables else {"aggregate", "compute"}  # the tables that must see the rebuilt files
    if not metadata:
        shutil.rmtree(study / ".snakemake")
    for path in paths:
        (shutil.rmtree if (study / path).is_dir() else (study / path).unlink)(study / path)
    counts, output = plan(study)
    assert {rule: n for rule, n in counts.items() if rule not in (*ANALYSIS, "report", "all")} == rebuilt, output
    assert tables <= counts.keys(), output[-3000:]
    assert f"{paths[0]}" in output and "rebuilding" in output


@pytest.mark.parametrize("metadata", [True, False], ids=["with-metadata", "without-metadata"])
def test_a_deleted_benchmark_file_reruns_its_job(study, metadata):
    if not metadata:
        shutil.rmtree(study / ".snakemake")
    for path in ("train/topk/seed0.tsv", "evaluate/rdesi/seed1.tsv", "figures.tsv"):
        (study / ROOT / "benchmarks" / path).unlink()
    counts, output = plan(study)
    # topk seed0 retrains (its timing is gone) and is evaluated again; the figures job reruns anyway.
    assert counts["train"] == 1 and counts["evaluate"] == 2 and counts["figures"] == 1, output[-3000:]
    assert f"{ROOT}/benchmarks/evaluate/rdesi/seed1.tsv" in output


def test_a_deleted_run_is_rebuilt_and_never_left_ok_in_run_status(study):
    shutil.rmtree(study / RUNS / "topk" / "seed1")
    (study / RUNS / "rdesi" / "seed1" / "eval_validation.json").unlink()
    output = build(study)
    assert "Nothing to be done" not in output
    assert (study / RUNS / "topk" / "seed1" / "checkpoint.pt").is_file()
    assert (study / RUNS / "rdesi" / "seed1" / "eval_validation.json").is_file()
    assert set(run_statuses(study).values()) == {"ok"} and len(run_statuses(study)) == SMOKE_RUNS
    nothing_to_do(study)


# --------------------------------------------------------------- recovery messages, followed as written


def command_in(error: str, start: str) -> list[str]:
    """The shell command the message gives between backticks, starting with `start`."""
    return shlex.split(next(c for c in re.findall(r"`([^`]+)`", error) if c.startswith(start)))


def test_evaluate_s_retrain_message_retrains_the_run(study):
    """`evaluate` on a run the study no longer asks for: "retrain it (delete RUN and rerun snakemake)"."""
    edited = edited_preset(study, beta=0.3)
    plan(study, "--configfile", edited)  # rewrites study.json for the edited study
    run = f"{RUNS}/rdesi/seed0"
    out = study / "eval.json"
    done = run_module("gtmoe", "evaluate", "--run", run, "--study", f"{ROOT}/study.json", "--split", "validation",
                      "--out", out, cwd=study)  # fmt: skip
    assert done.returncode == 2
    error = single_error_line(done.stderr)
    assert f"retrain it (delete {run} and rerun snakemake)" in error, error
    shutil.rmtree(study / run)  # as it says
    counts, output = plan(study, "--configfile", edited)
    assert counts["train"] == RDESI_RUNS and counts["evaluate"] == RDESI_RUNS, output[-3000:]


def test_a_damaged_checkpoint_s_message_retrains_the_run(study):
    run = f"{RUNS}/topk/seed1"
    (study / run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    done = run_module("gtmoe", "evaluate", "--run", run, "--split", "validation", "--out", study / "e.json", cwd=study)
    error = single_error_line(done.stderr)
    assert f"delete {run} and rerun snakemake" in error and f"snakemake --forcerun {run}/checkpoint.pt" in error
    forced = snakemake("--dry-run", "--configfile", SMOKE, "--forcerun", f"{run}/checkpoint.pt", cwd=study)
    assert job_counts(forced.stdout)["train"] == 1, forced.stdout[-3000:]
    shutil.rmtree(study / run)  # as it says
    counts, output = plan(study)
    assert counts["train"] == 1 and counts["evaluate"] == 1, output[-3000:]


def test_a_corrupt_tokenizer_s_message_rebuilds_it(study):
    tokenizer = study / ROOT / "data" / "tokenizer.json"
    tokenizer.write_text("{ not json")
    stopped = snakemake("--dry-run", "--configfile", SMOKE, cwd=study)
    assert stopped.returncode != 0 and "Job stats" not in stopped.stdout
    message = stopped.stdout + stopped.stderr
    command = command_in(message, "rm ")
    assert command == ["rm", f"{ROOT}/data/tokenizer.json"], message[-2000:]
    (study / command[1]).unlink()  # as it says
    counts, output = plan(study)
    assert counts["tokenizer"] == 1 and counts["shards"] == 3 and counts["train"] == SMOKE_RUNS, output[-3000:]


def test_a_damaged_shard_s_message_rebuilds_it(study):
    shards = study / ROOT / "data" / "shards" / "test"
    manifest = shards / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"n_blocks": ', '"n_blocks": 1'))
    done = run_module("gtmoe", "evaluate", "--run", f"{RUNS}/topk/seed0", "--split", "test", "--out",
                      study / "e.json", cwd=study)  # fmt: skip
    error = single_error_line(done.stderr)
    assert "delete the directory and rerun snakemake" in error, error
    shutil.rmtree(shards)  # as it says
    counts, output = plan(study)
    assert counts["shards"] == 1 and counts["evaluate"] == SMOKE_RUNS and "train" not in counts, output[-3000:]
