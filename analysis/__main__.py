"""Command line of the analysis stage, called by the Snakemake rules.

    python -m analysis aggregate --run-dirs DIR... --variants V... --seeds S... \\
        --out-table results/summary/runs.parquet --out-status results/summary/run_status.csv
    python -m analysis stats --table results/summary/runs.parquet --reference topk \\
        --split test --primary ppl gini maxvio_global --alpha 0.05 --power 0.8 \\
        --baselines results/baselines/ngram.json --out-dir results/summary
    python -m analysis figures --table results/summary/runs.parquet --run-dirs DIR... \\
        --baselines results/baselines/ngram.json --out-dir results/figures
    python -m analysis findings --summary-dir results/summary --baselines results/baselines/ngram.json \
        --run-dirs DIR... --reference topk --out results/summary/findings.html
    python -m analysis compute --benchmarks TSV... --benchmark-root results/benchmarks \
        --runs-root results/runs --out-csv results/summary/compute.csv
    python -m analysis sensitivity --table results/summary/runs.parquet --design-json JSON \
        --reference topk --split test --out-dir results/summary --figures-dir results/figures
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import RUN_OK, OutputError, collect, compute, figures, findings, sensitivity, stats, tables, writing

# Fixed output names (the workflow declares them as rule outputs).
STATUS_HTML_SUFFIX = ".html"
TABLE_FILES = ("summary", "comparisons", "ablations")  # each as .csv and .html


@dataclass(frozen=True)
class FigureInputs:
    tidy: pd.DataFrame  # usable rows of the tidy table
    router_log: pd.DataFrame  # router logs of the usable runs
    reference: pd.DataFrame  # paired comparisons against the reference variant
    ablations: pd.DataFrame  # paired comparisons of rdesi against its ablations
    split: str
    baselines: pd.DataFrame  # n-gram reference models (collect.read_baselines), maybe empty
    train_log: pd.DataFrame | None = None  # training logs of the usable runs (flip rates)


FIGURES = {
    "perplexity.png": lambda d, path: figures.plot_perplexity(d.tidy, path, d.split, d.baselines),
    "load_balance.png": lambda d, path: figures.plot_load_balance(d.tidy, path, d.split),
    "load_heatmap.png": lambda d, path: figures.plot_load_heatmap(d.tidy, path, d.split),
    "training_balance.png": lambda d, path: figures.plot_training_balance(d.router_log, path),
    "pareto.png": lambda d, path: figures.plot_pareto(d.tidy, path, d.split, baselines=d.baselines),
    "router_state.png": lambda d, path: figures.plot_router_state(d.router_log, path),
    "ablation_forest.png": lambda d, path: figures.plot_ablation_forest(d.ablations, path),
    "reference_forest.png": lambda d, path: figures.plot_reference_forest(d.reference, path),
    "flip_rates.png": lambda d, path: figures.plot_flip_rates(d.train_log, path),
}
FIGURE_FILES = tuple(FIGURES)


def _log(message: str) -> None:
    print(f"[analysis] {message}", file=sys.stderr)


def _pairs(tidy: pd.DataFrame, args: argparse.Namespace) -> tuple[list, list]:
    """Reference and ablation pairs over the study's variants."""
    variants = collect.variant_order(tidy)
    return (
        stats.reference_pairs(variants, args.reference),
        stats.ablation_pairs(variants, args.ablation_base, args.ablations),
    )


def run_aggregate(args: argparse.Namespace) -> int:
    tidy, status = collect.collect_runs(args.run_dirs, args.variants, args.seeds)
    out_table = Path(args.out_table)
    with writing(out_table):
        out_table.parent.mkdir(parents=True, exist_ok=True)
        tidy.to_parquet(out_table, index=False)
    status_html = args.out_status_html or Path(args.out_status).with_suffix(STATUS_HTML_SUFFIX)
    tables.write_status(status, args.out_status, status_html)
    for row in status[status["status"] != RUN_OK].itertuples():
        _log(f"{row.variant}/seed{row.seed}: {row.status} ({row.detail})")
    _log(f"{(status['status'] == RUN_OK).sum()}/{len(status)} runs ok; {len(tidy)} values -> {out_table}")
    return 0


def _compare(tidy: pd.DataFrame, pairs: list, args: argparse.Namespace) -> pd.DataFrame:
    """Paired comparisons on the comparison metrics plus any primary endpoint not among them."""
    metrics = list(dict.fromkeys([*args.metrics, *args.primary]))
    return stats.paired_comparisons(
        tidy, pairs, metrics, args.split, primary=args.primary, alpha=args.alpha, power=args.power
    )


def run_stats(args: argparse.Namespace) -> int:
    tidy = collect.usable(pd.read_parquet(args.table))
    out = Path(args.out_dir)
    eval_splits = [args.split] + [s for s in collect.EVAL_SPLITS if s != args.split]
    summary = pd.concat(
        [
            stats.summarize(tidy, args.summary_metrics, eval_splits),
            stats.summarize(tidy, stats.TRAIN_METRICS, ["train"]),
            # Test split only: the evaluation may score a fixed subset of validation
            # blocks (eval.max_blocks), while the baselines score whole splits.
            stats.baseline_summary(collect.read_baselines(args.baselines), [args.split]),
        ],
        ignore_index=True,
    )
    tables.write_summary(summary, out / "summary.csv", out / "summary.html")
    reference, ablation = _pairs(tidy, args)
    for name, pairs, title in (
        ("comparisons", reference, f"Paired comparisons against {args.reference}"),
        ("ablations", ablation, f"RD-ESI ablations: each ablation against {args.ablation_base}"),
    ):
        tables.write_comparisons(
            _compare(tidy, pairs, args),
            out / f"{name}.csv",
            out / f"{name}.html",
            title,
            alpha=args.alpha,
            power=args.power,
        )
    _log(f"tables -> {out}")
    return 0


def run_figures(args: argparse.Namespace) -> int:
    tidy = collect.usable(pd.read_parquet(args.table))
    ok_runs = set(zip(tidy["variant"].astype(str), tidy["seed"]))
    router_log = collect.load_router_logs(args.run_dirs, keep=ok_runs, variants=collect.variant_order(tidy))
    reference, ablation = _pairs(tidy, args)
    inputs = FigureInputs(
        tidy=tidy,
        router_log=router_log,
        split=args.split,
        reference=_compare(tidy, reference, args),
        ablations=_compare(tidy, ablation, args),
        baselines=collect.read_baselines(args.baselines),
        train_log=collect.load_train_logs(args.run_dirs, keep=ok_runs, variants=collect.variant_order(tidy)),
    )
    out = Path(args.out_dir)
    for name, draw in FIGURES.items():
        draw(inputs, out / name)
    _log(f"{len(FIGURES)} figures -> {out}")
    return 0


def run_findings(args: argparse.Namespace) -> int:
    inputs = findings.load_inputs(
        Path(args.summary_dir),
        args.baselines,
        args.run_dirs,
        args.reference,
        split=args.split,
        alpha=args.alpha,
        power=args.power,
        still_learning_slope=args.still_learning_slope,
    )
    _log(f"findings -> {findings.write_findings(inputs, args.out)}")
    return 0


def run_compute(args: argparse.Namespace) -> int:
    root = args.benchmark_root or os.path.commonpath(
        [os.path.dirname(os.path.abspath(path)) for path in args.benchmarks]
    )
    jobs = compute.jobs_table(
        [os.path.abspath(path) for path in args.benchmarks], os.path.abspath(root), args.runs_root
    )
    table = compute.breakdown(jobs)
    html_out = args.out_html or Path(args.out_csv).with_suffix(STATUS_HTML_SUFFIX)
    compute.write_compute(table, args.out_csv, html_out)
    _log(f"{len(jobs)} jobs, {table['seconds'].iloc[-1]:.0f} job-seconds -> {args.out_csv}")
    return 0


def _design_text(argument: str) -> str:
    """The design given inline (a JSON list, as the workflow passes it) or as a file."""
    if argument.lstrip().startswith("["):
        return argument
    try:
        return Path(argument).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(
            f"--design-json is neither a JSON list nor a readable file: {argument!r} ({error.strerror or error})"
        ) from None


def run_sensitivity(args: argparse.Namespace) -> int:
    design = sensitivity.read_design(_design_text(args.design_json))
    tidy = collect.usable(pd.read_parquet(args.table))
    dose = sensitivity.dose_response(tidy, design, args.split, args.reference)
    best = sensitivity.best_values(dose)
    written = sensitivity.write_tables(dose, best, args.out_dir)
    sweeps = list(dict.fromkeys(design["sweep"]))
    for sweep in sweeps:
        sensitivity.plot_sensitivity(
            dose, Path(args.figures_dir) / sensitivity.figure_name(sweep), sweep, args.reference
        )
    for row in best.itertuples():
        if row.note:
            _log(f"{row.sweep}/{row.option}{f' ({row.fixed})' if row.fixed else ''}: {row.note}")
    _log(
        f"{len(design)} points of {len(sweeps)} sweep(s): tables -> {Path(written[0]).parent}, "
        f"figures -> {args.figures_dir}"
    )
    return 0


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


TABLE_HELP = "tidy table written by aggregate"  # --table of stats, figures and sensitivity


def _add_values(
    parser: argparse.ArgumentParser, flag: str, default: Sequence[str], metavar: str, help: str, nargs: str = "+"
) -> None:
    """An option of several values whose default, a constant of the analysis, is listed in its help."""
    parser.add_argument(
        flag, nargs=nargs, default=list(default), metavar=metavar, help=f"{help} (default: %(default)s)"
    )


def _add_run_dirs(parser: argparse.ArgumentParser, purpose: str) -> None:
    parser.add_argument("--run-dirs", nargs="*", default=[], metavar="DIR", help=purpose)


def _add_pair_options(parser: argparse.ArgumentParser) -> None:
    """The paired comparisons' settings, shared by every sub-command that compares variants."""
    parser.add_argument(
        "--reference", default="topk", help="reference variant; every other variant is compared with it (default: topk)"
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=collect.EVAL_SPLITS,
        help="evaluation split of the comparisons and figures (default: test)",
    )
    _add_values(parser, "--metrics", stats.COMPARISON_METRICS, "METRIC", "metrics of the paired comparisons")
    parser.add_argument(
        "--ablation-base",
        default=stats.ABLATION_BASE,
        help="variant the ablations are compared with (default: %(default)s)",
    )
    _add_values(
        parser,
        "--ablations",
        stats.ABLATIONS,
        "VARIANT",
        "ablation variants; those absent from the table are skipped",
        nargs="*",
    )
    _add_values(
        parser,
        "--primary",
        stats.PRIMARY_METRICS,
        "METRIC",
        "primary (confirmatory) endpoints; other metrics are marked exploratory, and "
        "primary ones absent from --metrics are compared too",
        nargs="*",
    )
    parser.add_argument(
        "--alpha", type=_probability, default=stats.ALPHA, help="level of the tests, in (0, 1) (default: %(default)s)"
    )
    parser.add_argument(
        "--power",
        type=_probability,
        default=stats.POWER,
        help="power at which the minimum detectable difference is quoted, in (alpha, 1) (default: %(default)s)",
    )
    parser.add_argument(
        "--baselines",
        default=None,
        metavar="JSON",
        help="n-gram reference models from `python -m gtmoe baselines`, shown as reference "
        "rows and lines (default: none)",
    )


def _add_csv_output(parser: argparse.ArgumentParser, flag: str, html_flag: str, table: str) -> None:
    """A table written as CSV, with its HTML view beside it unless `html_flag` places it elsewhere."""
    parser.add_argument(flag, required=True, help=f"{table} to write (.csv)")
    parser.add_argument(html_flag, help=f"HTML view of the {table} (default: {flag} with .html)")


def _aggregate_options(parser: argparse.ArgumentParser) -> None:
    _add_run_dirs(parser, "run directories results/runs/{variant}/seed{seed}; absent ones are reported as missing")
    parser.add_argument(
        "--variants", nargs="+", metavar="V", help="expected variants in study order (default: those of --run-dirs)"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, metavar="S", help="expected seeds (default: those of --run-dirs)"
    )
    parser.add_argument("--out-table", required=True, help="tidy table to write (.parquet)")
    _add_csv_output(parser, "--out-status", "--out-status-html", "run status table")


def _stats_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help=TABLE_HELP)
    parser.add_argument("--out-dir", required=True, help="directory for the tables")
    _add_values(parser, "--summary-metrics", stats.SUMMARY_METRICS, "METRIC", "metrics of the summary table")
    _add_pair_options(parser)


def _figures_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help=TABLE_HELP)
    _add_run_dirs(parser, "run directories, for the router logs (training curves, RD-ESI state)")
    parser.add_argument("--out-dir", required=True, help="directory for the figures")
    _add_pair_options(parser)


def _findings_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary-dir", required=True, help="directory of the statistics tables")
    _add_run_dirs(parser, "run directories, for the training logs (final loss slope)")
    parser.add_argument(
        "--still-learning-slope",
        type=float,
        default=1.0,
        metavar="NATS",
        help="flag a variant as still learning when its training loss falls faster "
        "than this many nats per 1000 steps at the end (default: %(default)s)",
    )
    parser.add_argument("--out", required=True, help="HTML file to write")
    _add_pair_options(parser)


def _compute_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmarks", nargs="+", required=True, metavar="TSV", help="benchmark files of the jobs to count"
    )
    parser.add_argument(
        "--benchmark-root",
        help="directory the benchmark paths are relative to; their first component "
        "names the rule (default: the files' common directory)",
    )
    parser.add_argument(
        "--runs-root", required=True, help="root of the run directories {variant}/seed{seed}, for the in-process times"
    )
    _add_csv_output(parser, "--out-csv", "--out-html", "breakdown table")


def _sensitivity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", required=True, help=TABLE_HELP)
    parser.add_argument(
        "--design-json",
        required=True,
        metavar="JSON",
        help="the sweep design: a JSON list of records {sweep, base, router, option, "
        "value, variant, term, fixed}, inline or the path of a file holding it",
    )
    parser.add_argument(
        "--reference", default="topk", help="variant whose mean and CI band each curve is read against (default: topk)"
    )
    parser.add_argument("--split", default="test", choices=collect.EVAL_SPLITS, help="evaluation split (default: test)")
    parser.add_argument("--out-dir", required=True, help="directory for the tables")
    parser.add_argument("--figures-dir", required=True, help="directory for the figures")


@dataclass(frozen=True)
class Subcommand:
    run: Callable[[argparse.Namespace], int]
    add_options: Callable[[argparse.ArgumentParser], None]
    summary: str  # one line in the list of sub-commands
    description: str  # the sub-command's own --help


SUBCOMMANDS = {
    "aggregate": Subcommand(
        run_aggregate,
        _aggregate_options,
        "collect run directories into a tidy table",
        "Read every run directory into one tidy table (parquet) and write the run status table (CSV + HTML).",
    ),
    "stats": Subcommand(
        run_stats,
        _stats_options,
        "summary, paired comparison and ablation tables",
        "Write summary, comparisons and ablations as CSV and HTML into --out-dir, from ok runs only.",
    ),
    "figures": Subcommand(
        run_figures,
        _figures_options,
        "report figures (PNG)",
        "Write the report figures into --out-dir: " + ", ".join(FIGURE_FILES) + ".",
    ),
    "findings": Subcommand(
        run_findings,
        _findings_options,
        "the findings in words (HTML)",
        "Write the study's findings in words from the tables of `stats` and `aggregate` in "
        "--summary-dir (comparisons, ablations, summary, run_status .csv), the n-gram "
        "baselines and the training logs.",
    ),
    "compute": Subcommand(
        run_compute,
        _compute_options,
        "job-seconds per stage from the benchmark files",
        "Sum Snakemake's benchmark files per stage and split training and evaluation jobs "
        "into in-process compute and start-up + per-job overhead (CSV + HTML).",
    ),
    "sensitivity": Subcommand(
        run_sensitivity,
        _sensitivity_options,
        "dose-response of the router options of each sweep",
        "Write the dose-response table (sensitivity.csv/.html), the best value per swept option "
        "(sensitivity_best.csv/.html) into --out-dir and one figure sensitivity_{sweep}.png per "
        "sweep into --figures-dir, from ok runs only.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=command.summary, description=command.description)
        command.add_options(sub)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "power") and args.power <= args.alpha:
        parser.error(f"--power {args.power} must exceed --alpha {args.alpha} (power is alpha at no difference)")
    try:
        return args.handler(args)
    except (ValueError, OutputError) as error:  # configuration errors (unknown reference, stray run dir), writes
        print(f"error: python -m analysis {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
