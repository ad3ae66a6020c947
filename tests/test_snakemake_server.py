"""The tests' Snakemake fork server (tests/snakemake_server.py) runs a command as a fresh `python -m snakemake` would:
the same working directory, environment, module search path, temporary directory, arguments, output and exit
code; a command past its timeout is killed and raises as subprocess.run does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FRESH_SNAKEMAKE, REPO, SnakemakeServer, run_module

# A workflow that records what its interpreter sees at parse time, then prints a line and exits with a code.
SNAKEFILE = """
import json, os, sys, tempfile
Path = __import__("pathlib").Path
if "--target-jobs" not in sys.argv:  # not the fresh interpreter Snakemake starts for the `run:` job
  Path(config["out"]).write_text(json.dumps({
      "cwd": os.getcwd(),
      "path": sys.path,
      "env": os.environ.get("PROBE"),
      "tmp": tempfile.gettempdir(),
      "argv": sys.argv[1:],
      "executable": sys.executable,
      "gtmoe": __import__("gtmoe").__file__,
  }))
print("parsed", flush=True)
if config.get("fail"):
    raise SystemExit(int(config["fail"]))
if config.get("sleep"):
    __import__("time").sleep(float(config["sleep"]))

rule all:
    run:
        pass
"""


def seen(
    tmp_path: Path, monkeypatch, fresh: bool, *config: str, timeout: float = 120
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the probe workflow, in a fresh interpreter or forked, from a directory holding a package gtmoe (which
    must be found first, as a study's checkout is)."""
    where = tmp_path / ("fresh" if fresh else "forked")
    (where / "gtmoe").mkdir(parents=True, exist_ok=True)
    (where / "gtmoe" / "__init__.py").write_text("")
    (where / "Snakefile").write_text(SNAKEFILE)
    (where / "tmp").mkdir(exist_ok=True)
    out = where / "seen.json"
    monkeypatch.setenv(FRESH_SNAKEMAKE, "1" if fresh else "0")
    done = run_module(
        "snakemake",
        "--cores",
        "1",
        "--config",
        f"out={out}",
        *config,
        cwd=where,
        env={"PROBE": "a value", "TMPDIR": str(where / "tmp")},
        timeout=timeout,
    )
    return done, json.loads(out.read_text()) if out.exists() else {}


def test_a_forked_command_sees_what_a_fresh_interpreter_sees(tmp_path, monkeypatch):
    fresh, expected = seen(tmp_path, monkeypatch, True)
    forked, got = seen(tmp_path, monkeypatch, False)
    assert fresh.returncode == forked.returncode == 0, fresh.stderr + forked.stderr
    assert "parsed" in fresh.stdout and "parsed" in forked.stdout
    for view in (expected, got):  # each in its own directory: compare them relative to it
        where = Path(view["cwd"])
        view["gtmoe"] = str(Path(view["gtmoe"]).relative_to(where))
        view["tmp"] = str(Path(view["tmp"]).relative_to(where))
        view["path"] = [str(Path(p).relative_to(where)) if p.startswith(str(where)) else p for p in view["path"]]
        view["argv"] = [a.replace(str(where), "HERE") for a in view["argv"]]
        del view["cwd"]
    assert got == expected
    assert expected["gtmoe"] == "gtmoe/__init__.py" and expected["tmp"] == "tmp" and expected["env"] == "a value"
    assert str(REPO) in expected["path"] and expected["executable"] == sys.executable


def test_a_forked_command_exits_with_its_code_and_output(tmp_path, monkeypatch):
    done, _ = seen(tmp_path, monkeypatch, False, "fail=3")
    assert done.returncode == 3 and "parsed" in done.stdout


def test_a_forked_command_past_its_timeout_is_killed_and_raises(tmp_path, monkeypatch):
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        seen(tmp_path, monkeypatch, False, "sleep=60", timeout=5)
    assert "parsed" in timed_out.value.output
    done, _ = seen(tmp_path, monkeypatch, False)  # the server runs the next command
    assert done.returncode == 0


def test_both_replies_arriving_at_once_are_both_read(tmp_path):
    """A command that ends before the client reads its pid: the two reply lines come in one read."""
    server = SnakemakeServer()
    server.process = subprocess.Popen(  # answers a request with both lines at once, then idles
        ["sh", "-c", 'read request; printf \'{"pid": 1}\\n{"returncode": 4}\\n\'; sleep 60'],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        done = server.run([sys.executable, "-m", "snakemake", "-n"], tmp_path, {}, timeout=20)
    finally:
        server.process.kill()
        server.process.wait()
    assert done.returncode == 4
