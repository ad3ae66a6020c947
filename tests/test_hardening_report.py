"""Issue 22, items 1 and 4, through the real entry points.

The report is an output like any other: Snakemake rebuilds it when what it shows changed or when it is missing,
it is written atomically (a kill at any moment leaves a whole report or none, and a plain rerun rebuilds it
identical to an uninterrupted run's), a full disk is one line naming it and the cause, and nothing is written
outside the study's directory. Config files run no code: YTE templating (`__use_yte__`) is refused.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gtmoe.config import ConfigError, load_yaml

from helpers import SMOKE, WIKITEXT, copy_checkout, copy_study, run_module, single_error_line

REPORT = Path("results/smoke/report.html")
NOTHING_TO_DO = "Nothing to be done"


def snakemake_in(study: Path, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """`snakemake --configfile SMOKE args...` in `study`, its temporary directory inside the test's own
    (`study.parent / "tmp"`: what a run leaves outside the checkout shows there)."""
    tmp = study.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    return run_module(
        "snakemake", *args, "--configfile", SMOKE, cwd=study, env={"TMPDIR": str(tmp), **(env or {})}, **kwargs
    )


def report_view(study: Path) -> dict:
    """What the report shows, without its timestamps: every embedded result (caption, labels, job properties
    and the file's bytes as a data URI), the category menu and the workflow description."""
    html = (study / REPORT).read_text()
    view = {}
    for name in ("results", "categories", "workflow_desc"):
        start = re.search(rf'var {name} =\s*(?=[{{"\[])', html).end()
        view[name] = json.JSONDecoder().raw_decode(html, start)[0]
    return view


def embedded_files(view: dict) -> dict[str, bytes]:
    """Each embedded result's bytes, decoded from its data URI."""
    return {path: base64.b64decode(entry["data_uri"].split(";base64,")[1]) for path, entry in view["results"].items()}


def assert_shows_the_study_as_it_is(study: Path) -> dict:
    """The report embeds every file exactly as it is on disk now (never a stale copy); returns its view."""
    view = report_view(study)
    files = embedded_files(view)
    assert "results/smoke/summary/findings.html" in files and len(files) > 20, sorted(files)
    for path, data in files.items():
        assert data == (study / path).read_bytes(), f"the report shows a stale {path}"
    return view


def leftovers(study: Path) -> list[str]:
    """Temporaries of the report beside it, and every file a run left in its temporary directory but torch's
    compile cache (torchinductor_<user>/, kept there by design)."""
    found = [p.name for p in (study / REPORT).parent.glob(".report*")]
    tmp = study.parent / "tmp"
    return found + [
        str(p) for p in tmp.rglob("*") if p.is_file() and not p.relative_to(tmp).parts[0].startswith("torchinductor_")
    ]


@pytest.fixture(scope="module")
def study(finished_smoke, tmp_path_factory):
    """This module's copy of the finished smoke study (run with its temporary directory beside it, as
    snakemake_in runs); the tests below change it in turn."""
    return copy_study(finished_smoke, tmp_path_factory.mktemp("report"))


needs_wikitext = pytest.mark.skipif(not WIKITEXT.is_dir(), reason=f"needs the WikiText-2 files in {WIKITEXT}")


@needs_wikitext
@pytest.mark.integration
def test_the_report_is_built_by_the_run_as_one_of_its_outputs(study):
    assert_shows_the_study_as_it_is(study)
    # The nested `snakemake --report` got this run's own config files: no copy of the config anywhere.
    assert leftovers(study) == []
    done = snakemake_in(study, "--dry-run")
    assert done.returncode == 0 and NOTHING_TO_DO in done.stdout + done.stderr, done.stdout[-2000:]


@needs_wikitext
@pytest.mark.integration
def test_a_config_or_caption_edit_rebuilds_the_report(study):
    findings = study / "results/smoke/summary/findings.html"
    before = findings.read_bytes()
    preset = study / SMOKE
    assert preset.read_text().endswith("statistics:\n  contrasts: [[rdesi, topk]]\n")  # the smoke preset's last key
    preset.write_text(preset.read_text() + "  alpha: 0.2\n")
    caption = study / "workflow/report/findings.rst"
    caption.write_text(caption.read_text() + "\nEdited caption.\n")
    done = snakemake_in(study, "--cores", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert findings.read_bytes() != before  # the analysis reran with the new alpha ...
    view = assert_shows_the_study_as_it_is(study)  # ... and the report shows it, not the old findings
    assert embedded_files(view)["results/smoke/summary/findings.html"] != before
    assert "Edited caption." in view["results"]["results/smoke/summary/findings.html"]["caption"]
    again = snakemake_in(study, "--dry-run")
    assert NOTHING_TO_DO in again.stdout + again.stderr, again.stdout[-2000:]


def nested_report_call(study: Path) -> int | None:
    """The pid of the nested `snakemake --report` running in `study`, if any."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            if b"--report" in argv and Path(cmdline.parent / "cwd").resolve() == study.resolve():
                return int(cmdline.parent.name)
        except OSError:
            continue
    return None


@pytest.mark.faults
@needs_wikitext
@pytest.mark.integration
@pytest.mark.parametrize("moment", ["nested call started", "temporary being written"])
def test_a_report_killed_mid_build_is_rebuilt_whole_by_a_plain_rerun(study, tmp_path, moment):
    reference = report_view(study)
    old = (study / REPORT).read_bytes()
    tmp = study.parent / "tmp"
    with open(tmp_path / "killed.log", "w") as out:
        node = subprocess.Popen(  # the report rebuilt over a finished one (as after an edit), killed midway
            [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", SMOKE, "--forcerun", "report"],
            cwd=study,
            env={**os.environ, "TMPDIR": str(tmp)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not (
            nested_report_call(study)
            if moment == "nested call started"
            else list((study / REPORT).parent.glob(".report.tmp-*"))
        ):
            assert node.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {moment} within 300 s"
            time.sleep(0.01)
        os.killpg(node.pid, signal.SIGKILL)  # the node dies: Snakemake, the job and the nested call at once
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    # Never part of a report: the old one or none (Snakemake deletes an output as its job starts).
    assert not (study / REPORT).exists() or (study / REPORT).read_bytes() == old

    unlock = snakemake_in(study, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    rerun = snakemake_in(study, "--cores", "2")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert report_view(study) == reference  # identical to the uninterrupted run's, file for file
    assert leftovers(study) == []


@pytest.mark.faults
@needs_wikitext
@pytest.mark.integration
def test_a_full_disk_is_one_line_and_leaves_no_report_and_a_rerun_rebuilds_it(study):
    reference = report_view(study)

    def small_disk():  # a write past 1 MiB fails with EFBIG, as one past a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    tmp = study.parent / "tmp"
    full = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", SMOKE, "--forcerun", "report"],
        cwd=study,
        env={**os.environ, "TMPDIR": str(tmp)},
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_disk,
    )
    assert full.returncode != 0
    lines = [line for line in (full.stdout + full.stderr).splitlines() if "cannot write" in line]
    assert len(lines) == 1 and lines[0].startswith(f"cannot write {REPORT}: File too large"), lines
    assert not (study / REPORT).exists()  # no partial report.html
    assert leftovers(study) == []

    assert f"Missing output files: {REPORT}" in snakemake_in(study, "--dry-run").stdout
    rerun = snakemake_in(study, "--cores", "2")  # space again: a plain rerun builds the missing report
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert report_view(study) == reference
    assert_shows_the_study_as_it_is(study)


# --------------------------------------------------------------------------- item 4: config files run no code

TEMPLATED = [
    "__use_yte__: true\ntrain:\n  max_steps: ?__import__('os').system('id') or 20\n",
    "train:\n  __use_yte__: true\n  max_steps: 20\n",  # anywhere, not only at the top
    "__use_yte__: false\nseeds: [0]\n",
    "__definitions__:\n  - import os\nseeds: [0]\n",
    "__variables__:\n  n: 3\nseeds: [0]\n",
    '{"seeds": [0], "__use_yte__": true}',  # JSON: refused alike (a YAML dump of it would render)
]


@pytest.mark.faults
@pytest.mark.parametrize("text", TEMPLATED)
def test_the_strict_loader_refuses_templating_keys_anywhere(text):
    with pytest.raises(ConfigError, match=r"preset.yaml.*'__(use_yte|definitions|variables)__' enables YTE templating"):
        load_yaml(text, "preset.yaml")


@pytest.mark.faults
def test_a_run_config_with_templating_is_one_error_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(TEMPLATED[0].replace("'id'", "'touch " + str(tmp_path / "ran") + "'"))
    done = run_module("gtmoe", "train", "--config", config, "--out", tmp_path / "run")
    assert done.returncode == 2
    assert "'__use_yte__' enables YTE templating" in single_error_line(done.stderr)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()


def payload(marker: Path) -> str:
    return f"__use_yte__: true\ntrain:\n  max_steps: ?__import__('pathlib').Path({str(marker)!r}).touch() or 20\n"


def refusal(done: subprocess.CompletedProcess, where: str) -> None:
    """Snakemake stopped at parse time with one line naming the file, the key and why, before any job."""
    output = done.stdout + done.stderr
    assert done.returncode != 0
    lines = [line for line in output.splitlines() if "enables YTE templating" in line]
    assert len(lines) == 1 and lines[0].startswith(f"invalid configuration: {where} line 1:"), output[-2000:]
    assert "'__use_yte__'" in lines[0]
    assert "Job stats" not in output


@pytest.mark.faults
def test_a_templated_config_yaml_is_refused_before_snakemake_renders_it(tmp_path):
    study = copy_checkout(tmp_path / "study")
    marker = tmp_path / "ran"
    (study / "config.yaml").write_text(payload(marker))
    done = run_module("snakemake", "--cores", "1", cwd=study)
    refusal(done, "config.yaml")
    assert not marker.exists()  # refused before Snakemake loaded it: its code never ran
    assert not (study / "results").exists()


@pytest.mark.faults
def test_a_templated_preset_stops_the_workflow_before_any_job(tmp_path):
    study = copy_checkout(tmp_path / "study")
    marker = tmp_path / "ran"
    preset = tmp_path / "preset.yaml"
    preset.write_text(payload(marker))
    done = run_module("snakemake", "--cores", "1", "--configfile", SMOKE, preset, cwd=study)
    refusal(done, str(preset))
    assert not (study / "results").exists()
    # The documented limit (docs/reliability.md): Snakemake renders a --configfile as it parses its command
    # line, before the Snakefile runs, so its code has run. If this fails, Snakemake stopped doing that:
    # update the docs.
    assert marker.exists()
