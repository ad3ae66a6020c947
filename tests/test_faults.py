"""Reliability (issue #7): faults and bad input lose nothing and explain themselves.

Every test injects one fault or one bad input and checks both halves of the promise: no finished
work is lost (a checkpoint survives, a resumed run equals an uninterrupted one), and the failure
is reported as one `error: ...` line naming the file or config key and how to recover, before
any job runs where the problem is visible at parse time. Run alone with `pytest -m faults`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from gtmoe import runfiles
from gtmoe import train as train_module
from gtmoe.__main__ import main
from gtmoe.config import save_run_config
from gtmoe.contract import CHECKPOINT, RESUME_CHECKPOINT, SATURATION_CHECKPOINT
from gtmoe.data import SPLITS, write_corpus
from gtmoe.runfiles import MANIFEST_SUFFIX, RunError, load_checkpoint, manifest_path
from gtmoe.train import train

from conftest import tiny_run
from helpers import (
    ALIAS_BOMB,
    REPO,
    SMOKE,
    WIKITEXT,
    check_like_the_snakefile,
    copy_checkout,
    copy_data_stage,
    merged_config,
    run_module,
    single_error_line,
    snakemake,
    write_override,
)

pytestmark = pytest.mark.faults

TIMING_FIELDS = {"tokens_per_s", "wall_s", "peak_mem_mb"}
# Files `train` writes into its run directory beside its declared workflow outputs.
UNDECLARED_RUN_FILES = {
    RESUME_CHECKPOINT,
    SATURATION_CHECKPOINT,
    *(name + MANIFEST_SUFFIX for name in (CHECKPOINT, RESUME_CHECKPOINT, SATURATION_CHECKPOINT)),
}
TRAIN_OUTPUTS = {CHECKPOINT, "config.yaml", "train_log.parquet", "router_log.parquet", "train_summary.json"}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a busy machine they stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gtmoe_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    """`python -m gtmoe ...` in a fresh interpreter, importing this checkout's engine."""
    return run_module("gtmoe", *args, cwd=cwd, env=env, timeout=timeout)


def without_timing(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in TIMING_FIELDS}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_config(cfg, path: Path) -> str:
    save_run_config(cfg, path)
    return str(path)


def assert_same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a / CHECKPOINT, weights_only=False)["model"]
    wb = torch.load(b / CHECKPOINT, weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# --------------------------------------------------------------------------- a node dies mid-run


def descendants(pid: int) -> dict[int, str]:
    """Every live (not zombie) process below `pid` with its command line, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if state != "Z":
            children.setdefault(int(parent), []).append(int(stat.parent.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:  # gone meanwhile
                continue
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkilled_study_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path, finished_smoke):
    study = copy_checkout(tmp_path / "study")
    copy_data_stage(finished_smoke, study)  # the kill is in training: the study starts there
    steps, every = 200, 10
    override = write_override(tmp_path, {"train": {"max_steps": steps, "checkpoint_every": every}})
    target = "results/smoke/runs/topk/seed0/eval_test.json"
    command = [sys.executable, "-m", "snakemake", target, "--cores", "2", "--configfile", SMOKE, override]
    run_dir = study / "results" / "smoke" / "runs" / "topk" / "seed0"
    rolling = run_dir / RESUME_CHECKPOINT

    # Snakemake runs the training job as a child in its process group: SIGKILL to the group is a node dying.
    with open(tmp_path / "killed.log", "w") as out:
        node = subprocess.Popen(command, cwd=study, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not rolling.exists():  # written at step `every` at the earliest: past step 0
            assert node.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no rolling checkpoint within 240 s"
            time.sleep(0.02)
        training = [pid for pid, cmdline in descendants(node.pid).items() if "gtmoe train" in cmdline]
        os.killpg(node.pid, signal.SIGKILL)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    assert training, "the training job was not running when the node died"
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in training):
        assert time.monotonic() < deadline, "the training job survived the kill"
        time.sleep(0.05)
    killed_at = load_checkpoint(rolling)["step"]
    assert every <= killed_at < steps and killed_at % every == 0
    assert not (run_dir / CHECKPOINT).exists()  # the run was really interrupted

    # The same run, never interrupted, with the commands the workflow runs; alongside the recovery.
    reference = study / "reference"
    run_config = shutil.copy(run_dir / "config.yaml", study / "reference_config.yaml")  # what the job was given
    python = shlex.join([sys.executable, "-m", "gtmoe"])
    uninterrupted = subprocess.Popen(
        [
            "bash",
            "-c",
            f"{python} train --config {shlex.quote(str(run_config))} --out {shlex.quote(str(reference))} "
            f"--threads 1 && {python} evaluate --run {shlex.quote(str(reference))} --split test "
            f"--out {shlex.quote(str(reference / 'eval_test.json'))} --threads 1",
        ],
        cwd=study,
        env={**os.environ, "PYTHONPATH": str(study)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Recovery as an operator does it after a crash: release the dead run's lock, rerun the same target
        # (the job's outputs are marked incomplete, so Snakemake asks for --rerun-incomplete).
        unlock = snakemake(target, "--unlock", "--configfile", SMOKE, override, cwd=study)
        assert unlock.returncode == 0, unlock.stderr[-3000:]
        resumed = snakemake(*command[3:], "--rerun-incomplete", cwd=study)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        reference_output = uninterrupted.communicate(timeout=300)[0]
        assert uninterrupted.returncode == 0, reference_output[-3000:]
    finally:
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()
    train_log = (study / "results" / "smoke" / "logs" / "train" / "topk" / "seed0.log").read_text()
    resumed = re.search(rf"resuming \S*results/smoke/runs/topk/seed0 from step {killed_at}\b", train_log)
    assert resumed, train_log[-3000:]
    assert not rolling.exists()  # removed once the finished run's outputs are written

    got = json.loads((run_dir / "eval_test.json").read_text())
    want = json.loads((reference / "eval_test.json").read_text())
    assert got["train_step"] == steps
    assert without_timing(got) == without_timing(want)
    assert_same_weights(run_dir, reference)
    logs = [
        pd.read_parquet(d / "train_log.parquet").drop(columns=["tokens_per_s", "elapsed_s"])
        for d in (run_dir, reference)
    ]
    pd.testing.assert_frame_equal(*logs)


# --------------------------------------------------------------------------- a kill during a checkpoint write

DIE_DURING_CHECKPOINT = r"""
import io, os, sys
from pathlib import Path
import torch
from gtmoe.config import load_run_config
from gtmoe.contract import RESUME_CHECKPOINT
from gtmoe.train import train

config, out, where, die_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real_save, real_replace = torch.save, os.replace

def dying_save(obj, f, *args, **kwargs):
    # The resumable checkpoint of step `die_at`: write half of its bytes, then die as SIGKILL would.
    if where == "write" and "optimizer" in obj and obj["step"] == die_at:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os._exit(137)
    return real_save(obj, f, *args, **kwargs)

renames = {"n": 0}

def dying_replace(src, dst):
    # The rename of the rolling checkpoint into place, after its manifest was renamed into place.
    if where == "rename" and Path(dst).name == RESUME_CHECKPOINT:
        renames["n"] += 1
        if renames["n"] == die_at:
            os._exit(137)
    return real_replace(src, dst)

torch.set_num_threads(1)
torch.save, os.replace = dying_save, dying_replace
train(load_run_config(config), out)
raise SystemExit("the injected fault did not fire")
"""


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_shards, caplog, where):
    """`write`: killed halfway through the bytes of step 8's checkpoint. `rename`: killed between the
    manifest's rename and the checkpoint's (the manifest already names step 8, the file is step 4's)."""
    cfg = tiny_run(tiny_shards, "rdesi", max_steps=12, checkpoint_every=4)
    run = tmp_path / "run"
    die_at = 8 if where == "write" else 2  # the step, or the number of the rename (the 2nd = step 8)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            DIE_DURING_CHECKPOINT,
            write_config(cfg, tmp_path / "run.yaml"),
            str(run),
            where,
            str(die_at),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 137, done.stderr[-3000:]
    rolling = run / RESUME_CHECKPOINT
    assert load_checkpoint(rolling)["step"] == 4  # verified against its manifest, then loaded
    manifest = json.loads(manifest_path(rolling).read_text())
    if where == "write":
        partial = list(run.glob(f".{RESUME_CHECKPOINT}.tmp-*"))
        assert len(partial) == 1 and 0 < partial[0].stat().st_size < rolling.stat().st_size  # half of step 8's
        assert manifest["sha256"] == sha256(rolling)
    else:  # the new manifest is in place, the new checkpoint is not: the file is the one it replaces
        assert manifest["sha256"] != sha256(rolling) and manifest["replaces"]["sha256"] == sha256(rolling)
        load_checkpoint(rolling, repair_manifest=True)  # what training does before it writes again
        repaired = json.loads(manifest_path(rolling).read_text())
        assert repaired["sha256"] == sha256(rolling) and repaired["replaces"] is None

    with caplog.at_level(logging.INFO, logger="gtmoe.train"):
        train(cfg, run)
    assert f"resuming {run} from step 4" in caplog.text
    assert not list(run.glob(".*.tmp-*"))  # the dead writer's temporary file was cleared
    train(cfg, tmp_path / "uninterrupted")
    assert_same_weights(run, tmp_path / "uninterrupted")


# --------------------------------------------------------------------------- corrupted files


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size; torch.load would read such a checkpoint without complaint
    path.write_bytes(bytes(data))


def garble(path: Path) -> None:
    path.write_text("{not json")


@pytest.mark.parametrize(
    "damage, file, expected",
    [
        (truncate, "shard-00000.arrow", "bytes but its manifest manifest.json says"),
        (flip_a_byte, "shard-00000.arrow", "does not match the sha256 in its manifest manifest.json (corrupted"),
        (garble, "manifest.json", "is unreadable (JSONDecodeError"),
    ],
)
def test_a_damaged_token_shard_is_named_with_how_to_rebuild_it(tmp_path, tiny_shards, capsys, damage, file, expected):
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    damage(shards / "train" / file)
    config = write_config(tiny_run(shards, "topk", max_steps=4), tmp_path / "run.yaml")
    assert main(["train", "--config", config, "--out", str(tmp_path / "run")]) == 2
    error = single_error_line(capsys.readouterr().err)
    assert str(shards / "train" / file) in error and expected in error
    assert f"rerun `python -m gtmoe prepare shards ... --out {shards / 'train'}`" in error
    assert "delete the directory and rerun snakemake" in error
    assert not (tmp_path / "run" / CHECKPOINT).exists()


@pytest.fixture
def finished_run(tmp_path, tiny_shards):
    cfg = tiny_run(tiny_shards, "topk", max_steps=8, checkpoint_every=4)
    train(cfg, tmp_path / "run")
    return tmp_path / "run", write_config(cfg, tmp_path / "run.yaml")


@pytest.mark.parametrize(
    "damage, file, expected",
    [
        (truncate, CHECKPOINT, "bytes but its manifest checkpoint.pt.manifest.json says"),
        (flip_a_byte, CHECKPOINT, "does not match the sha256 in its manifest checkpoint.pt.manifest.json (corrupted"),
        (flip_a_byte, SATURATION_CHECKPOINT, "(corrupted"),
        (garble, CHECKPOINT + MANIFEST_SUFFIX, "checkpoint manifest"),
    ],
)
def test_a_damaged_final_checkpoint_is_named_with_how_to_retrain(finished_run, capsys, damage, file, expected):
    run, _ = finished_run
    damage(run / file)
    out = run / "eval_test.json"
    assert main(["evaluate", "--run", str(run), "--split", "test", "--out", str(out)]) == 2
    error = single_error_line(capsys.readouterr().err)
    assert str(run / file) in error and expected in error
    assert f"retrain the run: delete {run} and rerun snakemake" in error
    assert not out.exists()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (truncate, "bytes but its manifest checkpoint_last.pt.manifest.json says"),
        (flip_a_byte, "does not match the sha256 in its manifest checkpoint_last.pt.manifest.json (corrupted"),
    ],
)
def test_a_damaged_rolling_checkpoint_stops_the_resume_and_its_recovery_works(
    tmp_path, tiny_shards, capsys, damage, expected
):
    cfg = tiny_run(tiny_shards, "topk", max_steps=8, checkpoint_every=4)
    config, run = write_config(cfg, tmp_path / "run.yaml"), tmp_path / "run"
    train(cfg, run, stop_after=4)
    damage(run / RESUME_CHECKPOINT)
    assert main(["train", "--config", config, "--out", str(run)]) == 2
    error = single_error_line(capsys.readouterr().err)
    remove = f"rm {run / RESUME_CHECKPOINT} {manifest_path(run / RESUME_CHECKPOINT)}"
    assert str(run / RESUME_CHECKPOINT) in error and expected in error and remove in error
    for name in remove.split()[1:]:  # do what the message says
        Path(name).unlink()
    assert main(["train", "--config", config, "--out", str(run)]) == 0
    train(cfg, tmp_path / "uninterrupted")
    assert_same_weights(run, tmp_path / "uninterrupted")


def test_a_checkpoint_without_a_manifest_loads_unverified_with_a_warning(finished_run, caplog):
    run, _ = finished_run
    manifest_path(run / CHECKPOINT).unlink()  # as written by gtmoe before checkpoints had manifests
    with caplog.at_level(logging.WARNING, logger="gtmoe.train"):
        assert load_checkpoint(run / CHECKPOINT)["complete"]
    assert "has no manifest checkpoint.pt.manifest.json" in caplog.text and "unverified" in caplog.text
    truncate(run / CHECKPOINT)  # unverifiable, but torch's own error is still reported with the recovery
    with pytest.raises(RunError, match=r"is unreadable .*retrain the run: delete"):
        load_checkpoint(run / CHECKPOINT)


def test_a_checkpoint_of_an_older_model_format_is_refused_with_how_to_retrain(finished_run, capsys, monkeypatch):
    # Format 1 (rotary over the two halves of a head) would load into today's model without error and
    # evaluate as a different function.
    run, _ = finished_run
    state = load_checkpoint(run / CHECKPOINT)
    monkeypatch.setattr(runfiles, "MODEL_FORMAT", 1)
    runfiles.save_checkpoint({key: value for key, value in state.items() if key != "model_format"}, run / CHECKPOINT)
    monkeypatch.undo()
    out = run / "eval_test.json"
    assert main(["evaluate", "--run", str(run), "--split", "test", "--out", str(out)]) == 2
    error = single_error_line(capsys.readouterr().err)
    assert f"checkpoint {run / CHECKPOINT} holds a model of format 1" in error and "reads format 2" in error
    assert f"retrain the run: delete {run} and rerun snakemake" in error
    assert not out.exists()


# --------------------------------------------------------------------------- unwritable results


def test_an_unwritable_run_directory_is_one_error_line_naming_it(tmp_path, tiny_shards):
    config = write_config(tiny_run(tiny_shards, "topk", max_steps=4), tmp_path / "run.yaml")
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results directory should be\n")  # fails for root too
    out = blocker / "runs" / "topk" / "seed0"
    done = gtmoe_cli("train", "--config", config, "--out", str(out), "--threads", "1")
    assert done.returncode == 2, done.stderr
    error = single_error_line(done.stderr)
    assert error.startswith(f"error: cannot write the run directory {out} ({blocker} is a file, not a directory)")
    assert "pass another --out" in error


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_run_directory_under_proc_is_refused(tmp_path, tiny_shards, capsys):
    config = write_config(tiny_run(tiny_shards, "topk", max_steps=4), tmp_path / "run.yaml")
    assert main(["train", "--config", config, "--out", "/proc/gtmoe-results/run"]) == 2
    assert single_error_line(capsys.readouterr().err).startswith(
        "error: cannot write the run directory /proc/gtmoe-results/run ("
    )


def test_a_bad_evaluation_output_stops_the_cli_before_it_evaluates(finished_run, tmp_path, capsys, monkeypatch):
    # `python -m gtmoe evaluate` evaluates through gtmoe.evaluate.evaluate_splits, looked up when the command
    # runs: a stand-in that fails the test makes any evaluation before the --out checks a failure.
    run, _ = finished_run
    evaluated = []

    def no_evaluation(*args, **kwargs):
        evaluated.append(args)
        pytest.fail("gtmoe evaluate evaluated before refusing its --out")

    monkeypatch.setattr("gtmoe.evaluate.evaluate_splits", no_evaluation)
    with pytest.raises(pytest.fail.Exception, match="evaluated before"):  # the stand-in is what the CLI calls
        main(["evaluate", "--run", str(run), "--split", "test", "--out", str(tmp_path / "good" / "e.json")])
    assert len(evaluated) == 1
    evaluated.clear()
    capsys.readouterr()

    (tmp_path / "evals").write_text("")  # a file where the output's directory should be
    unwritable = tmp_path / "evals" / "e.json"
    for out, expected in (
        (unwritable, f"error: cannot write the evaluation output {unwritable} ({tmp_path / 'evals'} is a file"),
        (run, f"error: --out {run} is a directory"),
    ):
        assert main(["evaluate", "--run", str(run), "--split", "test", "--out", str(out)]) == 2
        assert single_error_line(capsys.readouterr().err).startswith(expected)
    assert evaluated == []
    assert not list(run.glob("eval_*.json"))


# --------------------------------------------------------------------------- bad input


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_setting(finished_run, tiny_shards, tmp_path, capsys):
    run, _ = finished_run
    assert (
        main(["evaluate", "--run", str(run), "--split", "test", "--out", str(run / "e.json"), "--device", "cuda"]) == 2
    )
    assert "error: --device = 'cuda': no CUDA device is available here" in capsys.readouterr().err
    config = write_config(tiny_run(tiny_shards, "topk", max_steps=4, device="cuda"), tmp_path / "cuda.yaml")
    assert main(["train", "--config", config, "--out", str(tmp_path / "cuda")]) == 2
    assert single_error_line(capsys.readouterr().err).startswith(
        "error: config key 'train.device' = 'cuda': no CUDA device is available here"
    )


DROP = object()  # in BAD_RUN_CONFIGS: remove this key from the valid run config
BAD_RUN_CONFIGS = {  # `train --config FILE`: FILE's YAML text, None for a directory, or edits of a valid run config
    "directory": (None, "run.yaml is a directory, not a YAML file"),
    "malformed YAML": ("variant: topk\nrouter: {name: topk\n", "run.yaml line 3: invalid YAML: expected ',' or '}'"),
    "empty YAML": ("", "config key 'variant' is missing in run config"),
    "no router": ({"router": DROP}, "config key 'router' is missing in run config"),
    "no variant": ({"variant": DROP}, "config key 'variant' is missing in run config"),
    "duplicate key": (
        "variant: topk\nrouter: {name: topk}\nvariant: rdesi\n",
        "run.yaml line 3: invalid YAML: duplicate key 'variant' (first on line 1)",
    ),
    "alias bomb": (
        "variant: topk\nrouter: {name: topk}\n" + ALIAS_BOMB.replace("colour", "junk"),
        "run.yaml line 4: invalid YAML: YAML anchor &a is not accepted",
    ),
    "binary file": (b"\x80\x81PK\x03\x04", "is not UTF-8 text"),
    "duplicate JSON key": (
        '{"variant": "topk", "router": {"name": "topk"}, "variant": "x"}',
        "run.yaml: duplicate key 'variant' in a JSON object",
    ),
    "seed >= 2**63": ({"train": {"seed": 2**64}}, "'train.seed' = 18446744073709551616: must be an integer"),
    "inf lr": ({"train": {"lr": float("inf")}}, "'train.lr' = inf: must be a finite number"),
    "nan router option": (
        {"router": {"name": "rdesi", "gamma": float("nan")}},
        "'router.gamma' = nan: must be a finite",
    ),
    "100k experts": ({"model": {"n_experts": 100_000}}, "'model.n_experts' = 100000: must be <= 4096"),
    "1e9 learned positions": (
        {"model": {"max_seq_len": 10**9, "positional": "learned"}},
        "'model.max_seq_len' = 1000000000: must be <= 1048576",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RUN_CONFIGS))
def test_a_bad_run_config_is_one_error_line_and_trains_nothing(tiny_shards, tmp_path, capsys, case):
    content, expected = BAD_RUN_CONFIGS[case]
    path = tmp_path / "run.yaml"
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        raw = tiny_run(tiny_shards, "topk", max_steps=4).to_dict()
        for section, value in content.items():
            if value is DROP:
                del raw[section]
            elif section == "router":
                raw[section] = value
            else:
                raw[section].update(value)
        path.write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert expected in single_error_line(capsys.readouterr().err)
    assert time.monotonic() - started < 5  # refused before anything is built or allocated
    assert not (tmp_path / "run").exists()


def test_a_run_config_must_name_its_variant_and_router(tmp_path, capsys):
    for text, missing in (("{}", "variant"), ('{"variant": "rdesi"}', "router")):
        (tmp_path / "run.yaml").write_text(text)
        assert main(["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 2
        assert f"config key '{missing}' is missing in run config" in single_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_train_from_a_study_record_needs_a_run_of_that_study(tmp_path, capsys, monkeypatch):
    """`train --study` (how the workflow calls it): the variant and seed must be the study's, the record a
    study record; each mistake is one error line, before anything is built."""
    from gtmoe.study import Study, write_record

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    record = str(write_record(Study.from_config(config)))
    for args, expected in (
        (["--variant", "topk"], "--study needs --variant and --seed"),
        (["--variant", "nope", "--seed", "0"], "config key '--variant' = 'nope': not a variant of study 'default'"),
        (
            ["--variant", "topk", "--seed", "7"],
            "config key '--seed' = 7: not a seed of variant 'topk' in study 'default'",
        ),
    ):
        assert main(["train", "--study", record, *args, "--out", "run"]) == 2
        assert expected in single_error_line(capsys.readouterr().err)
    Path(record).write_text('{"format": 0}')
    assert main(["train", "--study", record, "--variant", "topk", "--seed", "0", "--out", "run"]) == 2
    assert "is not a study record of format 1" in single_error_line(capsys.readouterr().err)
    assert not Path("run").exists()


def local_corpus(tmp_path: Path, split_file: str, content: str) -> Path:
    """A local WikiText-2 directory: the real files, except `split_file` with `content`."""
    local = tmp_path / "wikitext"
    local.mkdir()
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (local / name).symlink_to(WIKITEXT / name)
    (local / split_file).unlink()
    (local / split_file).write_text(content)
    return local


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"needs the WikiText-2 files in {WIKITEXT}")
@pytest.mark.parametrize("source", ["local", "auto"])
@pytest.mark.parametrize("content", ["", "\n \n\t\n"], ids=["size-0", "blank-lines"])
def test_an_empty_corpus_split_is_rejected_at_parse_time(tmp_path, source, content):
    local = local_corpus(tmp_path, "wiki.valid.tokens", content)
    with pytest.raises(ValueError) as caught:
        check_like_the_snakefile(merged_config({"data": {"source": source, "local_dir": str(local)}}))
    message = str(caught.value)
    assert f"'data.local_dir' = '{local}'" in message
    assert f"the validation split {(local / 'wiki.valid.tokens').resolve()} is empty" in message


def test_a_missing_corpus_names_the_local_directory_and_the_hub(tmp_path):
    nowhere = tmp_path / "no-wikitext"
    hermetic = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no cache
    # Parse time lets source auto through (the hub may serve it); the corpus job fails naming both sources.
    check_like_the_snakefile(merged_config({"data": {"source": "auto", "local_dir": str(nowhere)}}))
    done = gtmoe_cli(
        "prepare",
        "corpus",
        "--source",
        "auto",
        "--local-dir",
        str(nowhere),
        "--out",
        str(tmp_path / "corpus"),
        env=hermetic,
    )
    assert done.returncode == 2, done.stderr
    error = single_error_line(done.stderr)
    assert f"tried the local directory {nowhere}" in error and "the hub dataset Salesforce/wikitext" in error
    assert "Point --local-dir at ../shared/data/wikitext-2 or make the hub reachable" in error
    assert not (tmp_path / "corpus" / "corpus.json").exists()


def test_a_too_small_vocabulary_is_refused_by_the_tokenizer_stage(tmp_path, capsys):
    from gtmoe.data import train_tokenizer
    from gtmoe.errors import DataError

    write_corpus({split: [" = Title = ", " some words here"] for split in SPLITS}, tmp_path / "corpus")
    out = tmp_path / "tokenizer.json"
    # The command line refuses it as an argument, before reading the corpus ...
    with pytest.raises(SystemExit) as stop:
        main(["prepare", "tokenizer", "--corpus", str(tmp_path / "corpus"), "--vocab-size", "100", "--out", str(out)])
    assert stop.value.code == 2
    assert "--vocab-size: must be an integer in [258, " in capsys.readouterr().err
    # ... and the stage itself, for any other caller.
    with pytest.raises(DataError, match="vocab_size=100 is too small: a byte-level BPE needs at least 258"):
        train_tokenizer([" some words here"] * 3, 100, out)
    assert not out.exists()


BAD_INPUTS_AT_PARSE_TIME = {  # rows the table of tests/test_workflow.py checks less strictly or not at all
    "empty seeds": ({"seeds": []}, ["[] should be non-empty", "On instance['seeds']"]),
    "vocabulary too small": (
        {"data": {"vocab_size": 100}},
        ["100 is less than the minimum of 258", "On instance['data']['vocab_size']"],
    ),
    "empty corpus split": (None, ["'data.local_dir' = ", "the test split", "wiki.test.tokens is empty"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS_AT_PARSE_TIME))
def test_bad_input_stops_snakemake_before_any_job_naming_key_and_value(tmp_path, case):
    override, expected = BAD_INPUTS_AT_PARSE_TIME[case]
    if override is None:
        if not WIKITEXT.is_dir():
            pytest.skip(f"needs the WikiText-2 files in {WIKITEXT}")
        override = {"data": {"source": "local", "local_dir": str(local_corpus(tmp_path, "wiki.test.tokens", ""))}}
    done = snakemake("--dry-run", "--configfile", write_override(tmp_path, override))
    assert done.returncode != 0
    for text in expected:
        assert text in done.stdout + done.stderr
    assert "Job stats" not in done.stdout  # nothing was scheduled


# --------------------------------------------------------------------------- non-finite loss


def poison(monkeypatch, micro_batches: set[int], factor: float) -> None:
    """Multiply the loss of the given forward passes (1-based, counted from now) by NaN or inf."""
    real_forward = train_module.MoETransformer.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        out = real_forward(self, idx, targets)
        calls["n"] += 1
        if calls["n"] in micro_batches:
            out.loss = out.loss * factor
        return out

    monkeypatch.setattr(train_module.MoETransformer, "forward", poisoned)


def test_cli_stops_on_a_nan_loss_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_shards, monkeypatch, capsys
):
    cfg = tiny_run(tiny_shards, "rdesi", max_steps=12, checkpoint_every=4, log_every=2)
    config, run = write_config(cfg, tmp_path / "run.yaml"), tmp_path / "run"
    poison(monkeypatch, {6}, float("nan"))  # the 6th micro-batch is step 5 (0-based)
    assert main(["train", "--config", config, "--out", str(run)]) == 1
    error = single_error_line(capsys.readouterr().err)
    assert error.startswith(
        f"error: non-finite loss at step 5 in {run}; the last good checkpoint "
        f"{run / RESUME_CHECKPOINT} (step 4) was kept"
    )
    assert "train.nonfinite: skip" in error
    kept = load_checkpoint(run / RESUME_CHECKPOINT)  # verified against its manifest
    assert kept["step"] == 4 and all(torch.isfinite(v.float()).all() for v in kept["model"].values())
    assert not (run / CHECKPOINT).exists() and not (run / "train_summary.json").exists()


def test_cli_skip_policy_drops_an_inf_step_and_finishes(tmp_path, tiny_shards, monkeypatch, capsys):
    cfg = tiny_run(tiny_shards, "topk", max_steps=8, nonfinite="skip", max_skipped_steps=1)
    config, run = write_config(cfg, tmp_path / "run.yaml"), tmp_path / "run"
    poison(monkeypatch, {3}, float("inf"))
    assert main(["train", "--config", config, "--out", str(run)]) == 0
    assert json.loads((run / "train_summary.json").read_text())["skipped_steps"] == 1
    assert main(["evaluate", "--run", str(run), "--split", "test", "--out", str(run / "eval_test.json")]) == 0
    assert json.loads((run / "eval_test.json").read_text())["ppl"] is not None
    # One more bad step than allowed: the skip policy stops too, naming the step and the limit.
    monkeypatch.undo()
    poison(monkeypatch, {3, 5}, float("nan"))
    assert main(["train", "--config", config, "--out", str(tmp_path / "run2")]) == 1
    assert "more than train.max_skipped_steps = 1" in single_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- concurrency: no shared outputs


def planned_jobs(dry_run: str) -> list[dict]:
    """The jobs of `snakemake --dry-run --printshellcmds`: rule, declared paths and shell command."""
    jobs = []
    for line in dry_run.splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append({"rule": match[1], "output": [], "log": [], "benchmark": [], "shell": None})
        elif jobs and (match := re.match(r"^    (output|log|benchmark): (.*)$", line)):
            jobs[-1][match[1]] = match[2].split(", ")
        elif jobs and line.startswith("Shell command: "):
            shell = line.removeprefix("Shell command: ")
            jobs[-1]["shell"] = None if shell == "None" else shell
    return jobs


def written_paths(shell: str) -> list[str]:
    """The paths a job's command line writes: each `--out*` value and each `>`/`>>` target."""
    words = shell.split()
    return [after for before, after in zip(words, words[1:]) if before.startswith("--out") or before in (">", ">>")]


def test_no_two_jobs_of_the_default_study_write_the_same_path():
    done = snakemake("--dry-run", "--forceall", "--printshellcmds")
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = planned_jobs(done.stdout)
    counts = Counter(job["rule"] for job in jobs)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    runs = len(config["variants"]) * len(config["seeds"])
    assert counts["corpus"] == counts["tokenizer"] == 1 and counts["shards"] == 3
    assert counts["train"] == runs and counts["evaluate"] == runs  # one evaluation job per run, both splits

    declared = Counter(path for job in jobs for kind in ("output", "log", "benchmark") for path in job[kind])
    assert declared and max(declared.values()) == 1, [p for p, n in declared.items() if n > 1]

    writers: dict[str, str] = {}
    run_dirs = []
    for job in jobs:
        if job["shell"] is None:  # script rules, if any, write their declared outputs only
            continue
        own = set(job["output"] + job["log"])
        for path in written_paths(job["shell"]):
            assert path not in writers, f"{path} is written by {writers[path]} and {job['rule']}"
            writers[path] = job["rule"]
            # A file it declares, or the directory holding (only) its declared outputs.
            assert path in own or {str(Path(p).parent) for p in job["output"]} == {path}, (job["rule"], path)
        if job["rule"] == "evaluate":
            assert written_paths(job["shell"])[0] == job["output"][0]  # its JSONs, nothing else
        if job["rule"] == "train":
            run_dir = Path(job["output"][0]).parent
            run_dirs.append(str(run_dir))
            assert str(run_dir) in written_paths(job["shell"])
            assert {Path(p).name for p in job["output"]} == TRAIN_OUTPUTS
            # What train writes undeclared lives in its own run directory, and no job declares it.
            assert not {str(run_dir / name) for name in UNDECLARED_RUN_FILES} & set(declared)
    assert len(set(run_dirs)) == runs  # one run directory per run


def files_below(root: Path) -> dict[Path, str]:
    return {path: sha256(path) for path in root.rglob("*") if path.is_file()}


def test_train_and_evaluate_write_only_into_their_own_run_directory_and_json(tmp_path, tiny_shards, monkeypatch):
    shards = shutil.copytree(tiny_shards, tmp_path / "shards")
    config = write_config(tiny_run(shards, "rdesi", max_steps=8, checkpoint_every=4), tmp_path / "run.yaml")
    monkeypatch.chdir(tmp_path)
    run = Path("results/runs/rdesi/seed0")
    before = files_below(tmp_path)
    assert main(["train", "--config", config, "--out", str(run), "--stop-after", "4"]) == 0
    stopped = files_below(tmp_path)
    assert main(["train", "--config", config, "--out", str(run)]) == 0
    trained = files_below(tmp_path)
    for state in (stopped, trained):
        changed = {path for path, digest in state.items() if before.get(path) != digest}
        assert all(path.parent == tmp_path / run for path in changed), changed
        assert {path.name for path in changed} <= TRAIN_OUTPUTS | UNDECLARED_RUN_FILES
    assert {p.name for p in stopped} >= {RESUME_CHECKPOINT, SATURATION_CHECKPOINT}

    assert main(["evaluate", "--run", str(run), "--split", "test", "--out", str(run / "eval_test.json")]) == 0
    evaluated = files_below(tmp_path)
    assert {path for path, digest in evaluated.items() if trained.get(path) != digest} == {
        tmp_path / run / "eval_test.json"
    }
    assert set(trained) <= set(evaluated)


# --------------------------------------------------------------------------- full disk, leftovers, corrupt data
# Each command of the pipeline as (CLI main, argv, the directory it writes into), for the tables of cases below.


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny corpus, tokenizer and shards built by `python -m gtmoe prepare` from local files."""
    from gtmoe.data import LOCAL_FILES

    root = tmp_path_factory.mktemp("prepared")
    article = [
        " = Title = ",
        "",
        " the cat sat on the mat , and the dog sat on the log .",
        "",
        " = = Part = = ",
        "",
        " a cat and a dog ; 1 @,@ 000 words of text @-@ like this .",
        "",
    ]
    (root / "local").mkdir()
    for split, name in LOCAL_FILES.items():
        (root / "local" / name).write_text("\n".join(article * (40 if split == "train" else 8)) + "\n")
    assert (
        main(
            [
                "prepare",
                "corpus",
                "--source",
                "local",
                "--local-dir",
                str(root / "local"),
                "--no-verify",
                "--out",
                str(root / "corpus"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "prepare",
                "tokenizer",
                "--corpus",
                str(root / "corpus"),
                "--vocab-size",
                "300",
                "--out",
                str(root / "tokenizer.json"),
            ]
        )
        == 0
    )
    for split in SPLITS:
        assert (
            main(
                [
                    "prepare",
                    "shards",
                    "--corpus",
                    str(root / "corpus"),
                    "--tokenizer",
                    str(root / "tokenizer.json"),
                    "--split",
                    split,
                    "--seq-len",
                    "16",
                    "--out",
                    str(root / "shards" / split),
                ]
            )
            == 0
        )
    return root


def _train_command(request, tmp_path):
    shards = request.getfixturevalue("tiny_shards")
    config = write_config(tiny_run(shards, "topk", max_steps=8, checkpoint_every=4), tmp_path / "run.yaml")
    return main, ["train", "--config", config, "--out", str(tmp_path / "run")], tmp_path / "run"


def _evaluate_command(request, tmp_path):
    run, _ = request.getfixturevalue("finished_run")
    (run / "eval_test.json").write_text("{}\n")  # re-evaluating over an existing result
    return main, ["evaluate", "--run", str(run), "--split", "test", "--out", str(run / "eval_test.json")], run


def _baselines_command(request, tmp_path):
    shards = request.getfixturevalue("prepared") / "shards"
    return (
        main,
        ["baselines", "--shards", str(shards), "--out", str(tmp_path / "base" / "ngram.json")],
        tmp_path / "base",
    )


def _corpus_command(request, tmp_path):
    local = request.getfixturevalue("prepared") / "local"
    return (
        main,
        [
            "prepare",
            "corpus",
            "--source",
            "local",
            "--local-dir",
            str(local),
            "--no-verify",
            "--out",
            str(tmp_path / "corpus"),
        ],
        tmp_path / "corpus",
    )


def _tokenizer_command(request, tmp_path):
    corpus = request.getfixturevalue("prepared") / "corpus"
    return (
        main,
        [
            "prepare",
            "tokenizer",
            "--corpus",
            str(corpus),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path / "data" / "tokenizer.json"),
        ],
        tmp_path / "data",
    )


def _shards_command(request, tmp_path):
    prepared = request.getfixturevalue("prepared")
    return (
        main,
        [
            "prepare",
            "shards",
            "--corpus",
            str(prepared / "corpus"),
            "--tokenizer",
            str(prepared / "tokenizer.json"),
            "--split",
            "validation",
            "--seq-len",
            "16",
            "--out",
            str(tmp_path / "shards" / "validation"),
        ],
        tmp_path / "shards" / "validation",
    )


def _analysis_study(tmp_path) -> Path:
    """Runs of dense and topk (seeds 0, 1) under tmp_path/runs and their study record; returns the record."""
    from helpers import write_study, write_study_record

    write_study(tmp_path / "runs", variants=("dense", "topk"), seeds=(0, 1))
    return write_study_record(tmp_path, ("dense", "topk"), (0, 1))


def _aggregate_argv(record: Path) -> list[str]:
    """`python -m analysis aggregate` of the study `record`: tidy table and run status under its summary/."""
    return ["aggregate", "--study", str(record)]


def _aggregate_command(request, tmp_path):
    from analysis.__main__ import main as analysis_main

    return analysis_main, _aggregate_argv(_analysis_study(tmp_path)), tmp_path / "summary"


def _figures_command(request, tmp_path):
    from analysis.__main__ import main as analysis_main

    from helpers import write_baselines

    record = _analysis_study(tmp_path)
    write_baselines(tmp_path / "baselines" / "ngram.json")
    assert analysis_main(_aggregate_argv(record)) == 0
    assert analysis_main(["stats", "--study", str(record)]) == 0
    return analysis_main, ["figures", "--study", str(record)], tmp_path / "figures"


COMMANDS = {
    "train": _train_command,
    "evaluate": _evaluate_command,
    "baselines": _baselines_command,
    "corpus": _corpus_command,
    "tokenizer": _tokenizer_command,
    "shards": _shards_command,
    "aggregate": _aggregate_command,
    "figures": _figures_command,
}


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def rename_fails(monkeypatch, file: Path) -> None:
    """The rename of a finished temporary onto `file` fails: the disk filled up meanwhile."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == file:
            raise no_space()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def write_fails(monkeypatch, file: Path) -> None:
    """Writing the temporary sibling of `file` (`.{name}.tmp-PID`) fails for lack of space."""
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.parent == file.parent and self.name.startswith(f".{file.name}.tmp-"):
            raise no_space()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def torch_save_fails(error: Exception):
    """torch.save of a resumable checkpoint raises `error` (torch wraps some failed writes in a RuntimeError)."""

    def inject(monkeypatch, file: Path) -> None:
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "optimizer" in obj:
                raise error
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)

    return inject


def to_csv_fails(monkeypatch, file: Path) -> None:
    real = pd.DataFrame.to_csv

    def to_csv(self, path=None, *args, **kwargs):
        if path is not None and Path(path) == file:
            raise no_space()
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)


def savefig_fails(monkeypatch, file: Path) -> None:
    from matplotlib.figure import Figure

    real = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        if Path(fname) == file:
            raise no_space()
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)


FULL_DISK = [  # (command, the file whose write fails, how, what the error says about why)
    ("train", RESUME_CHECKPOINT, torch_save_fails(no_space()), "No space left on device"),
    (
        "train",
        RESUME_CHECKPOINT,
        torch_save_fails(RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")),
        "unexpected pos 64 vs 0",
    ),
    ("train", "train_summary.json", rename_fails, "No space left on device"),
    ("evaluate", "eval_test.json", write_fails, "No space left on device"),
    ("baselines", "ngram.json", rename_fails, "No space left on device"),
    ("corpus", "train.txt", rename_fails, "No space left on device"),
    ("tokenizer", "tokenizer.json", rename_fails, "No space left on device"),
    ("shards", "shard-00000.arrow", rename_fails, "No space left on device"),
    ("shards", "manifest.json", rename_fails, "No space left on device"),
    ("aggregate", "run_status.csv", to_csv_fails, "No space left on device"),
    ("figures", "perplexity.png", savefig_fails, "No space left on device"),
]


@pytest.mark.parametrize(
    "command, name, inject, reason", FULL_DISK, ids=[f"{c}-{n}-{r.split()[0]}" for c, n, _, r in FULL_DISK]
)
def test_a_full_disk_is_one_error_line_naming_the_file(
    request, tmp_path, monkeypatch, capsys, command, name, inject, reason
):
    cli, argv, where = COMMANDS[command](request, tmp_path)
    capsys.readouterr()
    inject(monkeypatch, where / name)
    assert cli(argv) == 2
    error = single_error_line(capsys.readouterr().err)
    assert "cannot write" in error and str(where / name) in error and reason in error, error
    assert "free space" in error and "rerun" in error
    assert "is a file, not a directory" not in error  # what a full disk over an existing JSON used to say
    assert not list(where.glob(".*.tmp-*"))  # the failed write left no temporary behind


STALE_TEMPORARIES = [  # (command, a temporary left by a process killed mid-write) -- cleared when it starts
    ("train", f".{RESUME_CHECKPOINT}.tmp-999999"),
    ("train", f".{CHECKPOINT}{MANIFEST_SUFFIX}.tmp-999999"),
    ("train", ".config.yaml.tmp-999999"),
    ("train", ".train_log.parquet.tmp-999999"),
    ("train", ".router_log.parquet.tmp-999999"),
    ("train", ".train_summary.json.tmp-999999"),
    ("evaluate", ".eval_test.json.tmp-999999"),
    ("baselines", ".ngram.json.tmp-999999"),
    ("corpus", ".train.txt.tmp-999999"),
    ("corpus", ".corpus.json.tmp-999999"),
    ("tokenizer", ".tokenizer.json.tmp-999999"),
    ("shards", ".shard-00000.arrow.tmp-999999"),
    ("shards", ".shard-00007.arrow.tmp-999999"),
    ("shards", ".manifest.json.tmp-999999"),
]


@pytest.mark.parametrize("command, leftover", STALE_TEMPORARIES, ids=[f"{c}-{n}" for c, n in STALE_TEMPORARIES])
def test_a_leftover_temporary_file_is_cleared_when_its_command_starts(request, tmp_path, command, leftover):
    cli, argv, where = COMMANDS[command](request, tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    (where / leftover).write_bytes(b"half of a file")
    (where / ".unrelated.tmp-999999").write_bytes(b"not ours")
    assert cli(argv) == 0
    assert not (where / leftover).exists()
    assert (where / ".unrelated.tmp-999999").exists()  # only the command's own temporaries


def make_a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "damage, expected",
    [
        (truncate, "is unreadable or corrupt"),
        (garble, "is unreadable or corrupt"),
        (lambda path: path.write_text('{"version": "1.0"}'), "is unreadable or corrupt"),
        (make_a_directory, "is a directory, not a tokenizer file"),
    ],
    ids=["truncated", "garbled", "not-a-tokenizer", "directory"],
)
def test_a_corrupt_tokenizer_is_named_with_how_to_rebuild_it(prepared, tmp_path, capsys, damage, expected):
    tokenizer = Path(shutil.copy(prepared / "tokenizer.json", tmp_path / "tokenizer.json"))
    damage(tokenizer)
    out = tmp_path / "shards" / "validation"
    assert (
        main(
            [
                "prepare",
                "shards",
                "--corpus",
                str(prepared / "corpus"),
                "--tokenizer",
                str(tokenizer),
                "--split",
                "validation",
                "--seq-len",
                "16",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    error = single_error_line(capsys.readouterr().err)
    assert str(tokenizer) in error and expected in error and "rerun snakemake" in error, error
    assert f"rm {tokenizer}" in error or f"rm -r {tokenizer}" in error
    assert not out.exists()


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"needs the WikiText-2 files in {WIKITEXT}")
def test_a_corrupt_tokenizer_stops_snakemake_before_it_deletes_the_shards(tmp_path):
    """Snakemake would rerun the shards jobs (their input is newer) and delete the good shards first."""
    checkout = copy_checkout(tmp_path / "checkout")
    data = checkout / "results" / "default" / "data"
    corpus = [data / "corpus" / name for name in ("train.txt", "validation.txt", "test.txt", "corpus.json")]
    shard = data / "shards" / "validation" / "shard-00000.arrow"
    tokenizer = data / "tokenizer.json"
    for path in (*corpus, shard, tokenizer):
        path.parent.mkdir(parents=True, exist_ok=True)
    for path in corpus:
        path.write_text("the corpus\n")
    shard.write_bytes(b"good shards, built from the tokenizer before it was damaged")
    tokenizer.write_text('{"model": {"type": "BPE", "vocab": {')  # truncated
    for age, paths in ((300, corpus), (200, [shard, shard.parent]), (100, [tokenizer])):  # damaged last
        for path in paths:
            os.utime(path, (time.time() - age, time.time() - age))
    done = snakemake("--cores", "1", "results/default/data/shards/validation", cwd=checkout, timeout=300)
    assert done.returncode != 0
    assert shard.is_file()  # nothing ran: no job deleted the shards to rebuild them
    output = done.stdout + done.stderr
    assert "results/default/data/tokenizer.json is unreadable or corrupt" in output, output[-3000:]
    assert "rm results/default/data/tokenizer.json" in output


CONFIG_EDITS = [  # (dotted key edited in the run's config.yaml after training, new value, refused?)
    ("model.n_experts", 2, True),
    ("train.lr", 0.5, True),
    ("router.name", "switch", True),
    ("variant", "rdesi", True),
    ("eval.saturation_blocks", 3, False),  # evaluation-only settings cannot change the trained weights
    ("train.log_every", 1, False),
]


@pytest.mark.parametrize("key, value, refused", CONFIG_EDITS, ids=[key for key, _, _ in CONFIG_EDITS])
def test_evaluate_checks_the_run_config_against_the_checkpoints(finished_run, capsys, key, value, refused):
    run, _ = finished_run
    original = (run / "config.yaml").read_text()
    config = yaml.safe_load(original)
    *parents, leaf = key.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    trained = section[leaf]
    assert trained != value
    section[leaf] = value
    if key == "router.name":  # a complete router section of another router
        config["router"] = {"name": "switch"}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = run / "eval_test.json"
    code = main(["evaluate", "--run", str(run), "--split", "test", "--out", str(out)])
    if not refused:
        assert code == 0 and out.exists()
        return
    assert code == 2
    error = single_error_line(capsys.readouterr().err)
    assert f"{run / 'config.yaml'} differs from the config {run / CHECKPOINT} was trained with: " in error
    assert f" {key} ({trained!r} in the checkpoint, {value!r} in config.yaml)" in error
    assert "restore config.yaml to the trained values, or retrain" in error and f"delete {run}" in error
    assert not out.exists()
    (run / "config.yaml").write_text(original)  # the recovery the message gives
    assert main(["evaluate", "--run", str(run), "--split", "test", "--out", str(out)]) == 0


NON_FINITE_EVALUATIONS = [  # (variant, eval JSON key, value written, expected run status)
    ("topk", "gini", None, "failed"),
    ("topk", "maxvio_global", float("nan"), "failed"),
    ("topk", "load_entropy", float("inf"), "failed"),
    ("topk", "ppl", None, "failed"),
    ("dense", "gini", None, "ok"),  # a dense model has no load metrics: null is correct there
]


@pytest.mark.parametrize(
    "variant, key, value, status", NON_FINITE_EVALUATIONS, ids=[f"{v}-{k}-{x}" for v, k, x, _ in NON_FINITE_EVALUATIONS]
)
def test_a_non_finite_metric_marks_the_run_failed_in_the_status_table(tmp_path, variant, key, value, status):
    from analysis.__main__ import main as analysis_main

    record = _analysis_study(tmp_path)
    damaged = tmp_path / "runs" / variant / "seed1" / "eval_test.json"
    evaluation = json.loads(damaged.read_text())
    evaluation[key] = value
    damaged.write_text(json.dumps(evaluation))  # Python's json writes NaN and Infinity as such
    summary = tmp_path / "summary"
    assert analysis_main(_aggregate_argv(record)) == 0
    table = pd.read_csv(summary / "run_status.csv").set_index(["variant", "seed"])
    assert table.loc[(variant, 1), "status"] == status
    if status == "failed":
        assert "eval_test.json: non-finite" in table.loc[(variant, 1), "detail"]
        assert key in table.loc[(variant, 1), "detail"]
        assert key in (summary / "run_status.html").read_text()
    assert (table.drop(index=(variant, 1))["status"] == "ok").all()


def test_verbose_adds_the_traceback_above_the_one_error_line(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["train", "--config", str(missing), "--out", str(tmp_path / "run")]) == 2
    quiet = capsys.readouterr().err.strip().splitlines()
    assert len(quiet) == 1 and quiet[0].startswith("error:") and str(missing) in quiet[0]
    assert main(["-v", "train", "--config", str(missing), "--out", str(tmp_path / "run")]) == 2
    verbose = capsys.readouterr().err
    assert "Traceback (most recent call last)" in verbose and verbose.strip().splitlines()[-1] == quiet[0]
