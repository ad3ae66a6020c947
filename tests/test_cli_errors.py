"""Every verb of `python -m gtmoe` turns bad input into one `error:` line and exit status 2, through the
path the command line really takes (gtmoe.__main__.main); anything that is not a gtmoe.errors.GtmoeError is a
bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gtmoe.__main__ import main
from gtmoe.errors import ConfigError, DataError, GtmoeError, ManifestMismatch, NonFiniteLossError, OutputError, RunError

from helpers import REPO, single_error_line


def test_every_error_of_gtmoe_and_analysis_is_one_family():
    from analysis import OutputError as AnalysisOutputError
    from gtmoe.checks import ConfigError as ChecksConfigError
    from gtmoe.data.errors import DataError as DataPathError
    from gtmoe.files import ManifestMismatch as FilesManifestMismatch
    from gtmoe.runfiles import NonFiniteLossError as RunNonFinite
    from gtmoe.runfiles import RunError as RunfilesRunError

    for error in (ConfigError, DataError, RunError, NonFiniteLossError, ManifestMismatch, OutputError):
        assert issubclass(error, GtmoeError) and not issubclass(error, ValueError), error
    # Re-exported where each layer raises it, never redefined.
    assert (ChecksConfigError, DataPathError, FilesManifestMismatch, RunNonFinite, RunfilesRunError) == (
        ConfigError,
        DataError,
        ManifestMismatch,
        NonFiniteLossError,
        RunError,
    )
    assert AnalysisOutputError is OutputError


def bad_inputs(tmp_path):
    """(argv, the start of the one error line) for each verb."""
    missing = str(tmp_path / "missing")
    (tmp_path / "not-a-mapping.yaml").write_text("[1, 2]\n")
    return {
        "prepare corpus": (
            ["prepare", "corpus", "--source", "local", "--local-dir", missing, "--out", str(tmp_path / "c")],
            f"error: {missing}/wiki.train.tokens not found",
        ),
        "prepare tokenizer": (
            ["prepare", "tokenizer", "--corpus", missing, "--vocab-size", "300", "--out", str(tmp_path / "t.json")],
            f"error: {missing}/corpus.json not found",
        ),
        "prepare shards": (
            ["prepare", "shards", "--corpus", missing, "--tokenizer", f"{missing}.json", "--split", "test"]
            + ["--seq-len", "8", "--out", str(tmp_path / "s")],
            f"error: {missing}.json not found",
        ),
        "train --config": (
            ["train", "--config", str(tmp_path / "not-a-mapping.yaml"), "--out", str(tmp_path / "r")],
            "error: run config",
        ),
        "train --study": (
            ["train", "--study", f"{missing}.json", "--variant", "topk", "--seed", "0", "--out", str(tmp_path / "r")],
            f"error: study record {missing}.json does not exist",
        ),
        "evaluate": (
            ["evaluate", "--run", missing, "--split", "test", "--out", str(tmp_path / "e.json")],
            f"error: run config {missing}/config.yaml does not exist",
        ),
        "baselines": (
            ["baselines", "--shards", missing, "--out", str(tmp_path / "b.json")],
            f"error: {missing}/train/manifest.json not found",
        ),
    }


VERBS = ["prepare corpus", "prepare tokenizer", "prepare shards", "train --config", "train --study", "evaluate"]


@pytest.mark.parametrize("verb", [*VERBS, "baselines"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, verb):
    argv, start = bad_inputs(tmp_path)[verb]
    assert main(argv) == 2
    assert single_error_line(capsys.readouterr().err).startswith(start)


def test_bad_input_through_python_m_gtmoe(tmp_path):
    argv, start = bad_inputs(tmp_path)["train --study"]
    done = subprocess.run([sys.executable, "-m", "gtmoe", *argv], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and single_error_line(done.stderr).startswith(start), done.stderr


@pytest.mark.parametrize("flag, value", [("--threads", "-1"), ("--stop-after", "0"), ("--seed", "x")])
def test_bad_numbers_are_argparse_errors_with_exit_2(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "r"), flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_a_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """A ValueError from gtmoe's own code is a bug: it propagates (a traceback), never one `error:` line."""
    import gtmoe.baselines

    def broken(*args, **kwargs):
        raise ValueError("a bug inside gtmoe")

    monkeypatch.setattr(gtmoe.baselines, "write_ngram_baselines", broken)
    with pytest.raises(ValueError, match="a bug inside gtmoe"):
        main(["baselines", "--shards", str(tmp_path), "--out", str(tmp_path / "b.json")])
