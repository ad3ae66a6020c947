# report.html after every run that did work, so `snakemake --cores all` needs no second command.
# onsuccess is skipped on dry runs and when nothing was to be done, so a rerun leaves it untouched.
import subprocess
import tempfile

import yaml


onsuccess:
    if all(Path(path).exists() for path in ANALYSIS_OUTPUTS):
        # The nested call must see exactly this run's config (presets, --config overrides included).
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(dict(config), handle)
        command = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            workflow.main_snakefile,
            "--configfile",
            handle.name,
            "--report",
            REPORT,
            "--quiet",
            "all",
        ]
        print("Creating", REPORT, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        Path(handle.name).unlink()
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n", flush=True)
            raise WorkflowError(f"creating {REPORT} failed: {' '.join(command)}")
        print("Report:", REPORT, flush=True)
    else:
        print(
            f"{REPORT} not updated: the study's summary and figures are not all built yet "
            "(run `snakemake --cores all`)",
            flush=True,
        )
