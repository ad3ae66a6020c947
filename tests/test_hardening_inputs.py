"""Hardening of the inputs (issue 22, items 7, 11, 12, 13), through the real entry points: sizes the experts'
grouped GEMM cannot run are refused at parse time; config files are regular files read with a bound on the bytes
read; no command writes over a file it reads or over another of its outputs; hostile arguments are one error
line with exit status 2; the commands of README.md and docs/ run as written."""

from __future__ import annotations

import dataclasses
import os
import re
import runpy
import shlex
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from gtmoe.__main__ import main
from gtmoe.config import GROUPED_MM_MULTIPLE, MAX_YAML_BYTES, ConfigError, load_yaml, save_run_config
from gtmoe.moe import grouped_matmul
from gtmoe.train import train

from conftest import tiny_model, tiny_run
from helpers import REPO, copy_checkout, run_module, single_error_line, snakemake, write_override


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the checkout for Snakemake's dry runs (they write the study record)."""
    return copy_checkout(tmp_path_factory.mktemp("docs") / "study")


# --------------------------------------------------------------------------- item 7: sizes grouped_mm can run


def grouped_mm_runs(width: int, hidden: int, dtype: torch.dtype) -> bool:
    """Forward and backward of the experts' grouped GEMM (gtmoe.moe.grouped_matmul, as GroupedSwiGLU calls it)
    on rows of `width` values times experts of `width` x `hidden`, in `dtype`, on the CPU."""
    x = torch.randn(13, width, dtype=dtype, requires_grad=True)  # 13 rows: the row count is free
    weight = torch.randn(3, width, hidden, dtype=dtype, requires_grad=True)
    offsets = torch.tensor([4, 9, 13])
    try:
        out = grouped_matmul(x, weight, offsets)
        (out * torch.randn_like(out)).sum().backward()
    except RuntimeError as exc:
        assert "multiple of 16 bytes" in str(exc), exc
        return False
    return True


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="this torch has no grouped_mm")
def test_the_size_rule_is_the_kernels_own_in_fp32_and_bf16():
    """Every multiple of 8 runs in fp32 and bf16; every other size fails in bf16 (CUDA autocast), and is refused."""
    for size in range(4, 41, 2):
        accepted = size % GROUPED_MM_MULTIPLE == 0
        assert grouped_mm_runs(size, 8, torch.bfloat16) is accepted, size
        assert grouped_mm_runs(8, size, torch.bfloat16) is accepted, size
        if accepted:
            assert grouped_mm_runs(size, size, torch.float32), size
        for key in ("d_model", "d_expert"):
            model = dataclasses.replace(tiny_model(n_heads=1), **{key: size})
            if accepted:
                model.validate()
            else:
                with pytest.raises(ConfigError, match=rf"'model.{key}' = {size}: must be a multiple of 8"):
                    model.validate()


def test_the_smallest_accepted_sizes_train_a_step(tmp_path, tiny_shards):
    cfg = tiny_run(tiny_shards, "topk", max_steps=2, warmup_steps=0)
    cfg = dataclasses.replace(cfg, model=tiny_model(d_model=8, n_heads=2, d_expert=8)).validate()
    save_run_config(cfg, tmp_path / "run.yaml")
    done = run_module(
        "gtmoe", "train", "--config", tmp_path / "run.yaml", "--out", tmp_path / "run", "--stop-after", "1"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoint_last.pt").is_file()


# d_model 36 with 2 heads of 18 passes every other check (divisible, even head dimension).
REJECTED_SIZES = [({"d_expert": 30}, "'model.d_expert' = 30"), ({"d_model": 36, "n_heads": 2}, "'model.d_model' = 36")]


@pytest.mark.parametrize("sizes, key", REJECTED_SIZES)
def test_a_size_the_kernel_cannot_run_stops_train_before_any_step(tmp_path, tiny_shards, sizes, key):
    raw = tiny_run(tiny_shards, "topk").to_dict()
    raw["model"].update(sizes)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    done = run_module("gtmoe", "train", "--config", tmp_path / "run.yaml", "--out", tmp_path / "run")
    assert done.returncode == 2
    error = single_error_line(done.stderr)
    assert key in error and "must be a multiple of 8" in error and "grouped_mm" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sizes, key", REJECTED_SIZES)
def test_a_size_the_kernel_cannot_run_stops_snakemake_before_any_job(tmp_path, checkout, sizes, key):
    done = snakemake("--dry-run", "--configfile", write_override(tmp_path, {"model": sizes}), cwd=checkout)
    assert done.returncode != 0
    assert f"invalid configuration: config key {key}: must be a multiple of 8" in done.stdout + done.stderr
    assert "Job stats" not in done.stdout


# --------------------------------------------------------------------------- item 11: config files


def test_a_device_is_refused_without_reading_it():
    start = time.monotonic()
    with pytest.raises(ConfigError, match="/dev/zero is a character device, not a regular file"):
        load_yaml(Path("/dev/zero"))
    assert time.monotonic() - start < 5


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    with pytest.raises(ConfigError, match="is a FIFO"):
        load_yaml(fifo)


def test_reading_is_bounded_by_the_bytes_read_not_by_stat():
    """A regular file whose size `stat` reports as 0 (a /proc file) is read up to the bound, then refused."""
    source = Path("/proc/kallsyms")
    if not os.access(source, os.R_OK) or source.stat().st_size != 0:
        pytest.skip("no readable /proc/kallsyms here")
    with source.open("rb") as stream:
        if len(stream.read(MAX_YAML_BYTES + 1)) <= MAX_YAML_BYTES:
            pytest.skip("/proc/kallsyms is small here")
    with pytest.raises(ConfigError, match=f"holds more than {MAX_YAML_BYTES} bytes"):
        load_yaml(source)


def test_an_oversized_regular_file_is_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(ConfigError, match="holds more than"):
        load_yaml(big)
    fits = tmp_path / "fits.yaml"
    fits.write_text("a: 1\n" + "#" * (MAX_YAML_BYTES - 6) + "\n")
    assert fits.stat().st_size == MAX_YAML_BYTES and load_yaml(fits) == {"a": 1}


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_train_refuses_a_special_config_in_one_line(tmp_path, special):
    if special == "fifo":
        special = tmp_path / "fifo.yaml"
        os.mkfifo(special)
    done = run_module("gtmoe", "train", "--config", special, "--out", tmp_path / "run", timeout=60)
    assert done.returncode == 2
    assert "not a regular file" in single_error_line(done.stderr)


def test_snakemake_refuses_a_fifo_configfile_after_reading_it(tmp_path):
    """Snakemake reads a --configfile itself first (a FIFO with a writer gives it the content once); the
    workflow's strict re-read (workflow/rules/common.smk, through load_yaml) then refuses it, before any job."""
    study = copy_checkout(tmp_path / "study")
    fifo = tmp_path / "preset.yaml"
    os.mkfifo(fifo)

    def feed():
        with fifo.open("w") as writer:  # blocks until Snakemake opens the FIFO
            writer.write('{"name": "fifo"}')

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        done = snakemake("--dry-run", "--configfile", str(fifo), cwd=study, timeout=120)
    finally:
        if feeder.is_alive():  # Snakemake never opened it: unblock the writer
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(10)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert f"invalid configuration: {fifo} is a FIFO (named pipe), not a regular file" in output, output
    assert "Job stats" not in done.stdout and not (study / "results" / "fifo").exists()


# --------------------------------------------------------------------------- item 12: no command overwrites its inputs


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shards):
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_run(tiny_shards, "topk", max_steps=4, checkpoint_every=2)
    train(cfg, root / "run")
    return root / "run"


def snapshot(*roots: Path) -> dict[Path, bytes]:
    """Every file under `roots` with its bytes."""
    return {path: path.read_bytes() for root in roots for path in sorted(root.rglob("*")) if path.is_file()}


def gtmoe_fails(capsys, *args) -> str:
    """`python -m gtmoe args` (its main, in this process) fails with one error line and exit status 2."""
    capsys.readouterr()
    assert main([str(arg) for arg in args]) == 2
    return single_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["checkpoint.pt", "config.yaml", "checkpoint_saturation.pt", "train_summary.json"])
def test_evaluate_refuses_to_write_over_a_run_file(trained_run, tiny_shards, name, capsys):
    before = snapshot(trained_run, tiny_shards)
    error = gtmoe_fails(capsys, "evaluate", "--run", trained_run, "--split", "test", "--out", trained_run / name)
    assert f"{trained_run / name}, which this command reads" in error
    assert snapshot(trained_run, tiny_shards) == before


def test_evaluate_refuses_outputs_through_a_link_into_the_shards_or_given_twice(
    tmp_path, trained_run, tiny_shards, capsys
):
    before = snapshot(trained_run, tiny_shards)
    link = tmp_path / "link.json"
    link.symlink_to(trained_run / "checkpoint.pt")
    error = gtmoe_fails(capsys, "evaluate", "--run", trained_run, "--split", "test", "--out", link)
    assert "which this command reads" in error
    error = gtmoe_fails(
        capsys, "evaluate", "--run", trained_run, "--split", "test", "--out", tiny_shards / "test" / "x.json"
    )
    assert f"lies in {tiny_shards / 'test'}, which this command reads" in error
    out = tmp_path / "e.json"
    error = gtmoe_fails(capsys, "evaluate", "--run", trained_run, "--split", "validation", "test", "--out", out, out)
    assert "is given twice" in error
    error = gtmoe_fails(
        capsys, "evaluate", "--run", trained_run, "--split", "test", "test", "--out", out, tmp_path / "f.json"
    )
    assert "--split names test 2 times" in error
    os.mkfifo(tmp_path / "fifo.json")  # an atomic write would replace it (as root: /dev/null too)
    error = gtmoe_fails(capsys, "evaluate", "--run", trained_run, "--split", "test", "--out", tmp_path / "fifo.json")
    assert "is not a regular file" in error and stat.S_ISFIFO(os.lstat(tmp_path / "fifo.json").st_mode)
    assert snapshot(trained_run, tiny_shards) == before and not out.exists()


def test_evaluate_still_writes_its_json_into_the_run_directory(trained_run):
    assert main(["evaluate", "--run", str(trained_run), "--split", "test", "--out", str(trained_run / "e.json")]) == 0
    assert (trained_run / "e.json").is_file()
    (trained_run / "e.json").unlink()


def test_baselines_refuse_an_output_inside_the_shards(tiny_shards, capsys):
    before = snapshot(tiny_shards)
    for split, name in (("train", "manifest.json"), ("validation", "shard-00000.arrow"), ("test", "ngram.json")):
        error = gtmoe_fails(capsys, "baselines", "--shards", tiny_shards, "--out", tiny_shards / split / name)
        assert f"lies in {tiny_shards / split}, which this command reads" in error
    assert snapshot(tiny_shards) == before


def test_train_refuses_to_write_over_its_config(tmp_path, trained_run, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "config.yaml").write_bytes((trained_run / "config.yaml").read_bytes())
    error = gtmoe_fails(capsys, "train", "--config", copy / "config.yaml", "--out", copy)
    assert f"--out {copy}: this command writes config.yaml there, which is {copy / 'config.yaml'}" in error
    assert sorted(p.name for p in copy.iterdir()) == ["config.yaml"]


def test_prepare_refuses_to_write_over_its_inputs(tmp_path, capsys):
    from gtmoe.data import write_corpus

    corpus = tmp_path / "corpus"
    write_corpus({split: [" = T = ", f" some words of {split} "] for split in ("train", "validation", "test")}, corpus)
    before = snapshot(corpus)
    error = gtmoe_fails(
        capsys, "prepare", "tokenizer", "--corpus", corpus, "--vocab-size", "300", "--out", corpus / "train.txt"
    )
    assert f"{corpus / 'train.txt'}, which this command reads" in error
    error = gtmoe_fails(
        capsys, "prepare", "tokenizer", "--corpus", corpus, "--vocab-size", "300", "--out", corpus / "corpus.json"
    )
    assert "which this command reads" in error
    # The shards' directory would get manifest.json over a tokenizer of that name.
    tokenizer = tmp_path / "shards" / "manifest.json"
    tokenizer.parent.mkdir()
    tokenizer.write_text("{}")
    argv = ["prepare", "shards", "--corpus", corpus, "--tokenizer", tokenizer, "--split", "test", "--seq-len", "8"]
    error = gtmoe_fails(capsys, *argv, "--out", tokenizer.parent)
    assert "this command writes manifest.json there" in error and tokenizer.read_text() == "{}"
    assert snapshot(corpus) == before


# --------------------------------------------------------------------------- item 13: hostile arguments

SHARDS_ARGV = ["prepare", "shards", "--corpus", "c", "--tokenizer", "t", "--split", "test"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "tokenizer", "--corpus", "c", "--vocab-size", "5", "--out", "t.json"], "--vocab-size: must be"),
        (["prepare", "tokenizer", "--corpus", "c", "--vocab-size", "1e3", "--out", "t.json"], "--vocab-size: must be"),
        (["prepare", "tokenizer", "--corpus", "c", "--vocab-size", str(2**40), "--out", "t"], "--vocab-size: must be"),
        ([*SHARDS_ARGV, "--seq-len", "0", "--out", "s"], "--seq-len: must be"),
        ([*SHARDS_ARGV, "--seq-len", str(10**12), "--out", "s"], "--seq-len: must be"),
        (["train", "--config", "r.yaml", "--out", "r", "--threads", "-1"], "--threads: must be"),
        (["train", "--config", "r.yaml", "--out", "r", "--threads", str(2**31)], "--threads: must be at most"),
        (["train", "--config", "r.yaml", "--out", "r", "--stop-after", "-5"], "--stop-after: must be"),
        (["evaluate", "--run", "r", "--split", "test", "--out", "e.json", "--threads", "1000000"], "--threads: must"),
        (["evaluate", "--run", "r", "--split", "tset", "--out", "e.json"], "--split: invalid choice"),
    ],
)
def test_hostile_arguments_are_argparse_errors_with_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0], errors


def test_an_empty_list_of_primary_endpoints_stops_snakemake(tmp_path, checkout):
    override = write_override(tmp_path, {"statistics": {"primary": []}})
    done = snakemake("--dry-run", "--configfile", override, cwd=checkout)
    assert done.returncode != 0 and "Job stats" not in done.stdout
    assert "'statistics.primary' = []: must name at least one metric" in done.stdout + done.stderr


# --------------------------------------------------------------------------- the documented commands, as written

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def documented_commands(program: str) -> list[str]:
    """Every command line of README.md and docs/*.md (code blocks and inline) that starts with `program`, without
    its trailing comment."""
    found = []
    for document in DOCUMENTS:
        for line in document.read_text().splitlines():
            for command in re.findall(rf"(?:^\s*|`)({re.escape(program)} [^`#]*)", line):
                command = command.strip()
                if command and command not in found:
                    found.append(command)
    return found


def python_verbs() -> list[tuple[str, ...]]:
    """(module, verb...) of every documented `python -m` command: the words before the first option."""
    verbs = []
    for command in documented_commands("python -m"):
        words = shlex.split(command)[2:]
        head = tuple(word for word in words[: next((i for i, w in enumerate(words) if w.startswith("-")), None)])
        real = head and head[0] in ("gtmoe", "gtmoe.bench", "analysis")  # not pytest, not a placeholder (<verb>, …)
        if real and all(re.fullmatch(r"[a-z_]+", word) for word in head[1:]) and head not in verbs:
            verbs.append(head)
    return verbs


def test_the_docs_name_commands():
    verbs = python_verbs()
    assert ("gtmoe", "prepare", "tokenizer") in verbs and ("analysis", "aggregate") in verbs
    assert any("tune_lossfree" in command for command in documented_commands("snakemake"))


@pytest.mark.parametrize("verb", python_verbs(), ids=" ".join)
def test_every_documented_python_command_has_help(verb, monkeypatch, capsys):
    """`python -m MODULE VERB... --help` as the interpreter runs it (runpy, as `-m` does), in this process: the
    parser is the whole command here, and a fresh interpreter per verb would spend seconds importing torch.
    `python -m` itself is run as a subprocess by the tests of the error lines (test_cli_errors.py)."""
    module, *words = verb
    monkeypatch.setattr(sys, "argv", [module, *words, "--help"])
    monkeypatch.delitem(sys.modules, f"{module}.__main__", raising=False)  # as in a fresh interpreter: not imported
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    assert capsys.readouterr().out.startswith("usage: ")


def dry_runnable(command: str) -> bool:
    """A documented snakemake command a dry run of a fresh checkout can run: no files the docs only suggest one
    writes (lr6e3.yaml), no cluster profile, no report or unlock."""
    words = shlex.split(command)
    files = [w for w in words if w.endswith((".yaml", ".yml")) and not w.startswith("-")]
    return (
        all((REPO / f).is_file() for f in files)
        and "FILE" not in words  # a placeholder
        and not {"noisy", "rdesi_terms"} & set(words)  # targets of a variant and a sweep the docs tell one to add
        and not {"--profile", "--report", "--unlock", "--summary"} & set(words)
        and "&&" not in words
    )


SNAKEMAKE_COMMANDS = [c for c in documented_commands("snakemake") if dry_runnable(c)]


@pytest.mark.parametrize("command", SNAKEMAKE_COMMANDS)
def test_every_documented_snakemake_command_dry_runs_as_written(checkout, command):
    words = shlex.split(command)
    done = snakemake(*words[1:], "--dry-run", cwd=checkout, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
