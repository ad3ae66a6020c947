"""Command line of the analysis stage, called by the Snakemake rules.

    python -m analysis aggregate --run-dirs DIR... --variants V... --seeds S... \\
        --out-table results/summary/runs.parquet --out-status results/summary/run_status.csv
    python -m analysis stats --table results/summary/runs.parquet --reference topk \\
        --split test --out-dir results/summary
    python -m analysis figures --table results/summary/runs.parquet --run-dirs DIR... \\
        --out-dir results/figures
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis import RUN_OK, collect, figures, stats, tables

# Fixed output names (the workflow declares them as rule outputs).
STATUS_HTML_SUFFIX = ".html"
TABLE_FILES = ("summary", "comparisons", "ablations")  # each as .csv and .html


@dataclass(frozen=True)
class FigureInputs:
    tidy: pd.DataFrame        # usable rows of the tidy table
    router_log: pd.DataFrame  # router logs of the usable runs
    reference: pd.DataFrame   # paired comparisons against the reference variant
    ablations: pd.DataFrame   # paired comparisons of rdesi against its ablations
    split: str


FIGURES = {
    "perplexity.png": lambda d, path: figures.plot_perplexity(d.tidy, path, d.split),
    "load_balance.png": lambda d, path: figures.plot_load_balance(d.tidy, path, d.split),
    "load_heatmap.png": lambda d, path: figures.plot_load_heatmap(d.tidy, path, d.split),
    "training_balance.png": lambda d, path: figures.plot_training_balance(d.router_log, path),
    "pareto.png": lambda d, path: figures.plot_pareto(d.tidy, path, d.split),
    "rdesi_internals.png": lambda d, path: figures.plot_rdesi_internals(d.router_log, path),
    "ablation_forest.png": lambda d, path: figures.plot_ablation_forest(d.ablations, path),
    "reference_forest.png": lambda d, path: figures.plot_reference_forest(d.reference, path),
}
FIGURE_FILES = tuple(FIGURES)


def _log(message: str) -> None:
    print(f"[analysis] {message}", file=sys.stderr)


def _pairs(tidy: pd.DataFrame, args: argparse.Namespace) -> tuple[list, list]:
    """Reference and ablation pairs over the study's variants."""
    variants = collect.variant_order(tidy)
    return (stats.reference_pairs(variants, args.reference),
            stats.ablation_pairs(variants, args.ablation_base, args.ablations))


def run_aggregate(args: argparse.Namespace) -> int:
    tidy, status = collect.collect_runs(args.run_dirs, args.variants, args.seeds)
    out_table = Path(args.out_table)
    out_table.parent.mkdir(parents=True, exist_ok=True)
    tidy.to_parquet(out_table, index=False)
    status_html = args.out_status_html or Path(args.out_status).with_suffix(STATUS_HTML_SUFFIX)
    tables.write_status(status, args.out_status, status_html)
    for row in status[status["status"] != RUN_OK].itertuples():
        _log(f"{row.variant}/seed{row.seed}: {row.status} ({row.detail})")
    _log(f"{(status['status'] == RUN_OK).sum()}/{len(status)} runs ok; {len(tidy)} values -> {out_table}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    tidy = collect.usable(pd.read_parquet(args.table))
    out = Path(args.out_dir)
    eval_splits = [args.split] + [s for s in collect.EVAL_SPLITS if s != args.split]
    summary = pd.concat([stats.summarize(tidy, args.summary_metrics, eval_splits),
                         stats.summarize(tidy, stats.TRAIN_METRICS, ["train"])], ignore_index=True)
    tables.write_summary(summary, out / "summary.csv", out / "summary.html")
    reference, ablation = _pairs(tidy, args)
    comparisons = stats.paired_comparisons(tidy, reference, args.metrics, args.split)
    tables.write_comparisons(comparisons, out / "comparisons.csv", out / "comparisons.html",
                             f"Paired comparisons against {args.reference}")
    ablations = stats.paired_comparisons(tidy, ablation, args.metrics, args.split)
    tables.write_comparisons(ablations, out / "ablations.csv", out / "ablations.html",
                             f"RD-ESI ablations: each ablation against {args.ablation_base}")
    _log(f"tables -> {out}")
    return 0


def run_figures(args: argparse.Namespace) -> int:
    tidy = collect.usable(pd.read_parquet(args.table))
    ok_runs = set(zip(tidy["variant"].astype(str), tidy["seed"]))
    router_log = collect.load_router_logs(args.run_dirs, keep=ok_runs,
                                          variants=collect.variant_order(tidy))
    reference, ablation = _pairs(tidy, args)
    inputs = FigureInputs(
        tidy=tidy, router_log=router_log, split=args.split,
        reference=stats.paired_comparisons(tidy, reference, args.metrics, args.split),
        ablations=stats.paired_comparisons(tidy, ablation, args.metrics, args.split))
    out = Path(args.out_dir)
    for name, draw in FIGURES.items():
        draw(inputs, out / name)
    _log(f"{len(FIGURES)} figures -> {out}")
    return 0


def _add_pair_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", default="topk",
                        help="reference variant; every other variant is compared with it (default: topk)")
    parser.add_argument("--split", default="test", choices=collect.EVAL_SPLITS,
                        help="evaluation split of the comparisons and figures (default: test)")
    parser.add_argument("--metrics", nargs="+", default=list(stats.COMPARISON_METRICS), metavar="METRIC",
                        help="metrics of the paired comparisons (default: %(default)s)")
    parser.add_argument("--ablation-base", default=stats.ABLATION_BASE,
                        help="variant the ablations are compared with (default: %(default)s)")
    parser.add_argument("--ablations", nargs="*", default=list(stats.ABLATIONS), metavar="VARIANT",
                        help="ablation variants; those absent from the table are skipped "
                             "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    aggregate = commands.add_parser("aggregate", help="collect run directories into a tidy table",
                                    description="Read every run directory into one tidy table "
                                                "(parquet) and write the run status table (CSV + HTML).")
    aggregate.add_argument("--run-dirs", nargs="*", default=[], metavar="DIR",
                           help="run directories results/runs/{variant}/seed{seed}; absent ones are "
                                "reported as missing")
    aggregate.add_argument("--variants", nargs="+", metavar="V",
                           help="expected variants in study order (default: those of --run-dirs)")
    aggregate.add_argument("--seeds", nargs="+", type=int, metavar="S",
                           help="expected seeds (default: those of --run-dirs)")
    aggregate.add_argument("--out-table", required=True, help="tidy table to write (.parquet)")
    aggregate.add_argument("--out-status", required=True, help="run status table to write (.csv)")
    aggregate.add_argument("--out-status-html",
                           help="HTML view of the run status (default: --out-status with .html)")
    aggregate.set_defaults(handler=run_aggregate)

    stats_cmd = commands.add_parser("stats", help="summary, paired comparison and ablation tables",
                                    description="Write summary, comparisons and ablations as CSV "
                                                "and HTML into --out-dir, from ok runs only.")
    stats_cmd.add_argument("--table", required=True, help="tidy table written by aggregate")
    stats_cmd.add_argument("--out-dir", required=True, help="directory for the tables")
    stats_cmd.add_argument("--summary-metrics", nargs="+", default=list(stats.SUMMARY_METRICS),
                           metavar="METRIC", help="metrics of the summary table (default: %(default)s)")
    _add_pair_options(stats_cmd)
    stats_cmd.set_defaults(handler=run_stats)

    figures_cmd = commands.add_parser("figures", help="report figures (PNG)",
                                      description="Write the report figures into --out-dir: "
                                                  + ", ".join(FIGURE_FILES) + ".")
    figures_cmd.add_argument("--table", required=True, help="tidy table written by aggregate")
    figures_cmd.add_argument("--run-dirs", nargs="*", default=[], metavar="DIR",
                             help="run directories, for the router logs (training curves, RD-ESI state)")
    figures_cmd.add_argument("--out-dir", required=True, help="directory for the figures")
    _add_pair_options(figures_cmd)
    figures_cmd.set_defaults(handler=run_figures)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # configuration errors (unknown reference, stray run dir)
        print(f"python -m analysis {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
