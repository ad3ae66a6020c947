"""Where the study's compute went: job-seconds per stage from Snakemake's benchmark files.

Every job of the workflow writes ``results/<name>/benchmarks/<rule>[/...].tsv`` (Snakemake's
``benchmark:`` directive; column ``s`` is the job's wall time in seconds, measured around
the whole job: interpreter start-up, imports, loading, the work itself). Jobs are grouped
into stages by the first component of that path (``STAGES``). ``study_benchmarks`` lists the
benchmark files of a study's jobs: those under its root whose run, if any, is one of the study
record's (variant, seed) runs, and the sensitivity job's only when the record has sweeps.

Training and evaluation jobs also time their own work in-process: ``train_summary.json``
``wall_s`` (the training loop) and each ``eval_{split}.json`` ``wall_s`` (forward passes).
Their job time splits into that in-process compute and the rest, start-up plus per-job
overhead (``job s − in-process``). Other jobs have no in-process timer: their time is
counted whole in their stage.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.tables import format_number, html_page, html_table, write_table
from gtmoe.errors import DataError

# Rule (first path component under results/<name>/benchmarks/) -> stage, in report order.
STAGES = {
    "corpus": "data prep",
    "tokenizer": "data prep",
    "shards": "data prep",
    "ngram_baselines": "baselines",
    "run_config": "run configs",
    "train": "training",
    "evaluate": "evaluation",
    "aggregate": "analysis",
    "statistics": "analysis",
    "figures": "analysis",
    "findings": "analysis",
    "specialisation": "analysis",
}
OVERHEAD_STAGES = {"run configs"}  # jobs that only write a config file: all overhead
IN_PROCESS, OVERHEAD, WHOLE_JOB = "in-process compute", "start-up + per-job overhead", "whole job"
JOB_COLUMNS = ["benchmark", "rule", "stage", "variant", "seed", "job_s", "in_process_s", "overhead_s"]
BREAKDOWN_COLUMNS = ["stage", "part", "jobs", "seconds", "percent"]
# train/{variant}/seed{seed}.tsv; evaluate/{variant}/seed{seed}.tsv (both splits in one job)
# or evaluate/{variant}/seed{seed}_{split}.tsv (one split per job).
_RUN_JOB = re.compile(r"^(?P<variant>[^/]+)/seed(?P<seed>\d+)(?:_(?P<split>[a-z]+))?\.tsv$")


def stage_of(rule: str) -> str:
    """The stage a rule's jobs count towards; a rule not in ``STAGES`` is its own stage."""
    return STAGES.get(rule, rule)


def job_seconds(benchmark: str | Path) -> float:
    """Wall seconds of one job: the sum of column ``s`` (one row per repeat of the job)."""
    table = pd.read_csv(benchmark, sep="\t")
    if "s" not in table.columns or table.empty:
        raise DataError(f"{benchmark}: not a Snakemake benchmark file (no 's' column or no row)")
    return float(table["s"].sum())


def _wall_s(path: Path) -> float:
    """``wall_s`` of a train summary or eval JSON; NaN when the file or the value is absent."""
    if not path.is_file():
        return math.nan
    value = json.loads(path.read_text()).get("wall_s")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def in_process_seconds(rule: str, relative: str, runs_root: Path) -> tuple[str | None, int | None, float]:
    """``(variant, seed, seconds)`` a train/evaluate job timed itself; NaN for other jobs."""
    match = _RUN_JOB.match(relative)
    if rule not in ("train", "evaluate") or match is None:
        return None, None, math.nan
    variant, seed, split = match["variant"], int(match["seed"]), match["split"]
    run_dir = runs_root / variant / f"seed{seed}"
    if rule == "train":
        return variant, seed, _wall_s(run_dir / "train_summary.json")
    files = [run_dir / f"eval_{split}.json"] if split else sorted(run_dir.glob("eval_*.json"))
    seconds = [_wall_s(file) for file in files]
    return variant, seed, (math.fsum(seconds) if seconds else math.nan)


def jobs_table(benchmarks: Sequence[str | Path], benchmark_root: str | Path, runs_root: str | Path) -> pd.DataFrame:
    """One row per job: its rule, stage, wall seconds and (train/evaluate) the in-process part.

    The overhead is ``job_s − in_process_s``, floored at 0: a resumed training run's loop
    time can exceed the last attempt's job time.
    """
    root, runs_root = Path(benchmark_root), Path(runs_root)
    rows = []
    for benchmark in benchmarks:
        try:
            relative = Path(benchmark).relative_to(root).as_posix()
        except ValueError:
            raise DataError(f"benchmark file {benchmark} is not under the study's {root}/") from None
        rule = relative.split("/", 1)[0].removesuffix(".tsv")
        run_relative = relative.split("/", 1)[1] if "/" in relative else ""
        variant, seed, in_process = in_process_seconds(rule, run_relative, runs_root)
        seconds = job_seconds(benchmark)
        in_process = min(in_process, seconds) if math.isfinite(in_process) else in_process
        rows.append(
            dict(
                benchmark=relative,
                rule=rule,
                stage=stage_of(rule),
                variant=variant,
                seed=seed,
                job_s=seconds,
                in_process_s=in_process,
                overhead_s=seconds - in_process,
            )
        )
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def breakdown(jobs: pd.DataFrame) -> pd.DataFrame:
    """Seconds and percent of the study's job-seconds per stage, and per part of a stage.

    Each stage contributes a total row (part ``"all"``); stages whose jobs time themselves
    add an ``IN_PROCESS`` and an ``OVERHEAD`` row (jobs without the in-process time, e.g. a
    run whose summary is missing, count whole). The last row is the study total; the row
    before sums the start-up + per-job overhead of all stages: that of the timed jobs plus
    the whole of the jobs that only write a run's config (``OVERHEAD_STAGES``).
    """
    total = float(jobs["job_s"].sum())

    def row(stage: str, part: str, jobs_: int, seconds: float) -> dict:
        return dict(
            stage=stage,
            part=part,
            jobs=jobs_,
            seconds=seconds,
            percent=100 * seconds / total if total > 0 else math.nan,
        )

    order = list(dict.fromkeys([s for s in STAGES.values() if s in set(jobs["stage"])] + list(jobs["stage"])))
    rows = []
    for stage in order:
        part = jobs[jobs["stage"] == stage]
        rows.append(row(stage, "all", len(part), float(part["job_s"].sum())))
        timed = part[part["in_process_s"].notna()]
        if len(timed):
            rows.append(row(stage, IN_PROCESS, len(timed), float(timed["in_process_s"].sum())))
            rows.append(row(stage, OVERHEAD, len(timed), float(timed["overhead_s"].sum())))
            untimed = part[part["in_process_s"].isna()]
            if len(untimed):
                rows.append(row(stage, WHOLE_JOB, len(untimed), float(untimed["job_s"].sum())))
    timed = jobs[jobs["in_process_s"].notna()]
    config_jobs = jobs[jobs["stage"].isin(OVERHEAD_STAGES)]
    rows.append(
        row(
            "all stages",
            OVERHEAD,
            len(timed) + len(config_jobs),
            float(timed["overhead_s"].sum() + config_jobs["job_s"].sum()),
        )
    )
    rows.append(row("total", "all", len(jobs), total))
    return pd.DataFrame(rows, columns=BREAKDOWN_COLUMNS)


def write_compute(table: pd.DataFrame, stem: str | Path) -> list[Path]:
    """The breakdown as CSV (full precision) and as a captioned HTML table."""
    rows = []
    for r in table.itertuples():
        whole = r.part == "all"
        rows.append(
            {
                "stage": r.stage if whole else "",
                "part": "whole stage" if whole else r.part,
                "jobs": str(r.jobs),
                "job-seconds": format_number(r.seconds),
                "share of total": f"{format_number(r.percent, 3)} %",
                "_row_class": "significant" if whole else "",
                "_class": {"jobs": "num", "job-seconds": "num", "share of total": "num"},
            }
        )
    caption = (
        "Job-seconds of the study by stage, from Snakemake's benchmark files (results/<name>/benchmarks/, "
        "column s: each job's wall time, start-up included). Training and evaluation jobs split into "
        "the compute they time in-process (train_summary.json wall_s: the training loop; eval JSON "
        "wall_s: forward passes) and the rest, interpreter start-up, imports, loading and per-job "
        "overhead. Percentages are of the total job-seconds (jobs that ran in parallel count each)."
    )
    page = html_page(
        "Compute breakdown",
        caption,
        [("", html_table(rows, ["stage", "part", "jobs", "job-seconds", "share of total"]))],
    )
    return write_table(table, page, stem, parquet=False)
