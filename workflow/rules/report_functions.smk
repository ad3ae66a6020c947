# The `report` job's functions (workflow/rules/report.smk, which says why the report is built this way).
import re
import subprocess

# Relative to the working directory, as every other path: an absolute one would differ in a copy of the study.
REPORT_CAPTIONS = sorted(
    f"workflow/report/{path.name}" for path in Path(workflow.basedir, "workflow", "report").glob("*.rst")
)


def report_failure(log):
    """The cause of a failed nested `snakemake --report`, as one line: the OS error it hit (a full disk, a
    file-size limit, a permission) or else the last line it printed."""
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    if causes := re.findall(r"\[Errno \d+\] ([^:'\"\n]+)", text):
        return causes[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def write_report(path, log):
    """Render the report into a temporary beside `path` (Snakemake picks the format by the .html suffix), then
    rename it over `path`; any failure leaves no report and one line naming it and the cause."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"):  # of a job killed mid-write
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    settings = workflow.config_settings
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        workflow.main_snakefile,
        *(["--configfile", *map(str, settings.configfiles)] if settings.configfiles else []),
        *(["--config", *settings.config_args] if settings.config_args else []),
        "--report",
        str(tmp),
        "all",
    ]  # not --quiet: `--quiet all` also silences the error that says why it failed
    try:
        with open(log, "w") as out:
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0 or not tmp.is_file():
            raise WorkflowError(
                f"cannot write {path}: {report_failure(log)} (nested `snakemake --report`, its output in {log}); "
                "free space or fix the cause, then rerun snakemake"
            )
        os.replace(tmp, path)
    except OSError as exc:
        raise WorkflowError(
            f"cannot write {path}: {exc.strerror or exc}; free space or fix the cause, then rerun snakemake"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
