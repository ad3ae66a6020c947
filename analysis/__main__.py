"""Command line of the analysis stage, called by the Snakemake rules (workflow/rules/analysis.smk).

Every step reads the study record that snakemake writes when it parses the config, and nothing else
about the study; its inputs and outputs lie under the study's root (gtmoe.contract.StudyLayout):

    python -m analysis aggregate   --study results/default/study.json
    python -m analysis stats       --study results/default/study.json
    python -m analysis figures     --study results/default/study.json
    python -m analysis findings    --study results/default/study.json
    python -m analysis compute     --study results/default/study.json
    python -m analysis sensitivity --study results/default/study.json   (a study with sweeps)
    python -m analysis tuning      --study results/tune/study.json      (a tuning study)
    python -m analysis specialisation --study results/default/study.json

A problem the user can fix (a bad record, an unreadable input, a full disk) is one `error:` line and
exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from analysis import RUN_OK, collect, compute, figures, findings, outputs, record, stats, tables, writing
from analysis.figures import coactivation as coactivation_figure
from analysis.figures import frontier as frontier_figure
from analysis.figures import load_over_training as load_figure
from analysis.figures import routing_stability as routing_figure
from analysis.record import Record
from analysis.stats import confirmatory, frontier, sensitivity, specialisation, stability, tuning
from gtmoe.contract import TOP_TOKENS
from gtmoe.errors import ConfigError, DataError, GtmoeError


def _log(message: str) -> None:
    print(f"[analysis] {message}", file=sys.stderr)


def _summary_path(study: Record, name: str) -> Path:
    return Path(study.layout.summary) / name


def _read(study: Record, name: str, step: str) -> pd.DataFrame:
    """The parquet table `name` that the step `step` wrote into the study's summary/, as it wrote it."""
    path = _summary_path(study, name)
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        problem = "does not exist"
    except (OSError, ValueError) as error:  # pyarrow's errors for a truncated or foreign file
        problem = f"is unreadable ({type(error).__name__}: {error})"
    raise DataError(
        f"{path} {problem}; write it with `python -m analysis {step} --study {study.path}` (snakemake does)"
    )


def _tidy(study: Record) -> pd.DataFrame:
    """The usable rows of the tidy table `aggregate` wrote."""
    return collect.usable(_read(study, outputs.TIDY, "aggregate"))


def _statistics(study: Record, name: str, step: str = "stats") -> pd.DataFrame:
    """A table the `stats` step (or `aggregate`, `sensitivity`) wrote."""
    return _read(study, f"{name}.parquet", step)


def _baselines(study: Record) -> pd.DataFrame:
    return collect.read_baselines(study.layout.baselines)


def run_aggregate(study: Record) -> int:
    """Read every run directory of the study into one tidy table (parquet), with each variant's router and
    resolved options as columns, and write the run status table (parquet, CSV, HTML)."""
    variants = collect.variant_columns(study, reserved=stats.SUMMARY_COLUMNS)
    tidy, status = collect.collect_runs(
        study.run_dirs(), study.variants, study.seeds_by_variant(), routed=study.routed(), splits=study.eval_splits
    )
    out_table = _summary_path(study, outputs.TIDY)
    with writing(out_table):
        out_table.parent.mkdir(parents=True, exist_ok=True)
        collect.join_variants(tidy, variants).to_parquet(out_table, index=False)
    tables.write_status(status, _summary_path(study, outputs.STATUS))
    for row in status[status["status"] != RUN_OK].itertuples():
        _log(f"{row.variant}/seed{row.seed}: {row.status} ({row.detail})")
    _log(f"{(status['status'] == RUN_OK).sum()}/{len(status)} runs ok; {len(tidy)} values -> {out_table}")
    return 0


def run_stats(study: Record) -> int:
    """Write the summary per variant (with its router and options), the paired comparisons against the
    reference and the ablations as parquet, CSV and HTML, and the confirmatory table (also LaTeX), from ok runs
    only, with the record's settings."""
    tidy = _tidy(study)
    settings = study.statistics
    split = study.split
    eval_splits = [split] + [s for s in study.eval_splits if s != split]
    summary = pd.concat(
        [
            stats.summarize(tidy, stats.SUMMARY_METRICS, eval_splits),
            stats.summarize(tidy, stats.TRAIN_METRICS, ["train"]),
            # The comparison split only: the evaluation may score a fixed subset of validation
            # blocks (eval.max_blocks), while the baselines score whole splits.
            stats.baseline_summary(_baselines(study), [split]),
        ],
        ignore_index=True,
    )
    variants = collect.variant_columns(study, reserved=stats.SUMMARY_COLUMNS)
    tables.write_summary(collect.join_variants(summary, variants), _summary_path(study, "summary"))
    order = collect.variant_order(tidy)
    metrics = list(dict.fromkeys([*stats.COMPARISON_METRICS, *settings["primary"]]))
    base = study.ablation_base
    by_construction = study.balanced_by_construction()
    for name, pairs, title in (
        ("comparisons", stats.reference_pairs(order, study.reference), f"Paired comparisons against {study.reference}"),
        ("ablations", stats.ablation_pairs(order, base, study.ablations), f"Ablations: each against {base or '-'}"),
    ):
        table = stats.paired_comparisons(
            tidy,
            pairs,
            metrics,
            split,
            primary=settings["primary"],
            alpha=settings["alpha"],
            power=settings["power"],
            by_construction=by_construction,
        )
        tables.write_comparisons(
            table, _summary_path(study, name), title, alpha=settings["alpha"], power=settings["power"]
        )
    # A tuning study confirms nothing: its runs choose the values that a confirmation study then tests.
    tuning = study.stage == "tuning"
    table = confirmatory.confirmatory_comparisons(
        tidy,
        [] if tuning else settings.get("contrasts", []),  # a record written before contrasts were declared has none
        None if tuning else base,
        study.ablations,
        split,
        primary=settings["primary"],
        margins=settings.get("margins", {}),
        alpha=settings["alpha"],
        power=settings["power"],
        by_construction=by_construction,
    )
    tables.write_confirmatory(
        table,
        _summary_path(study, outputs.CONFIRMATORY),
        alpha=settings["alpha"],
        power=settings["power"],
        empty_note="A tuning study: its runs choose each router's knob value on the validation split, and "
        "nothing is tested here. The declared contrasts are tested by a confirmation study on fresh seeds."
        if tuning
        else "",
    )
    _log(f"tables -> {study.layout.summary}")
    return 0


def run_figures(study: Record) -> int:
    """Write the report figures from the tidy table, the tables of `stats` (never recomputed), the run logs
    and the n-gram baselines."""
    tidy = _tidy(study)
    split = study.split
    order = collect.variant_order(tidy)
    ok_runs = set(zip(tidy["variant"].astype(str), tidy["seed"]))
    run_dirs = study.run_dirs()
    router_log = collect.load_router_logs(run_dirs, keep=ok_runs, variants=order)
    train_log = collect.load_train_logs(run_dirs, keep=ok_runs, variants=order)
    summary, baselines = _statistics(study, "summary"), _baselines(study)
    states = {v: study.state_labels(v) for v in study.variants}
    draw: dict[str, Callable[[Path], Path]] = {
        "perplexity": lambda path: figures.plot_perplexity(tidy, path, split, baselines, summary),
        "load_balance": lambda path: figures.plot_load_balance(tidy, path, split, summary),
        "load_heatmap": lambda path: figures.plot_load_heatmap(tidy, path, split),
        "training_balance": lambda path: figures.plot_training_balance(router_log, path),
        "load_over_training": lambda path: load_figure.plot_load_over_training(router_log, path),
        "pareto": lambda path: figures.plot_pareto(tidy, path, split, baselines=baselines, summary=summary),
        "router_state": lambda path: figures.plot_router_state(router_log, path, state_labels=states),
        "ablation_forest": lambda path: figures.plot_ablation_forest(_statistics(study, "ablations"), path),
        "reference_forest": lambda path: figures.plot_reference_forest(_statistics(study, "comparisons"), path),
        "flip_rates": lambda path: figures.plot_flip_rates(train_log, path, study.term_labels()),
    }
    out = Path(study.layout.figures)
    for name in outputs.FIGURES:
        draw[name](out / f"{name}.png")
    _log(f"{len(outputs.FIGURES)} figures -> {out}")
    return 0


def run_findings(study: Record) -> int:
    """Write the study's findings in words (HTML) from the tables of `stats`, `aggregate` and, for a study
    with sweeps, `sensitivity`, the n-gram baselines and the training logs."""
    status = _statistics(study, outputs.STATUS, "aggregate")
    ok = status[status["status"] == RUN_OK]
    dose, best = outputs.SENSITIVITY
    swept = {}
    if study.sweeps:  # the record says whether there are sweeps, not the files that happen to exist
        swept = dict(
            sensitivity=_statistics(study, dose, "sensitivity"),
            sensitivity_best=_statistics(study, best, "sensitivity"),
        )
    if study.stage == "tuning":
        select = study.tuning["select"]
        swept.update(
            stage="tuning",
            frontier_comparison=_statistics(study, "frontier_comparison", "tuning"),
            tuning_budget=_statistics(study, "tuning_budget", "tuning"),
            tuning_rule=sensitivity.rule_text(select["minimize"], select["subject_to"]),
        )
    summary = _statistics(study, "summary")
    inputs = findings.FindingsInputs(
        confirmatory=_statistics(study, outputs.CONFIRMATORY),
        comparisons=_statistics(study, "comparisons"),
        ablations=_statistics(study, "ablations"),
        summary=summary,
        status=status,
        train_logs=collect.load_train_logs(study.run_dirs(), keep=set(zip(ok["variant"].astype(str), ok["seed"]))),
        baselines=_baselines(study),
        reference=study.reference,
        split=study.split,
        alpha=study.statistics["alpha"],
        power=study.statistics["power"],
        horizon=findings.horizon_gain(_tidy(study), study.horizon, study.split) if study.horizon else None,
        group_routed={
            v: study.describe(v)["label"]
            for v in findings.noncausal_variants(summary, study.split, study.balanced_by_construction())
        },
        agreement=_statistics(study, outputs.SPECIALISATION[2], "specialisation"),
        router_logs=collect.load_router_logs(
            study.run_dirs(), keep=set(zip(ok["variant"].astype(str), ok["seed"])), variants=study.variants
        ),
        **swept,
    )
    _log(f"findings -> {findings.write_findings(inputs, _summary_path(study, outputs.FINDINGS))}")
    return 0


def run_compute(study: Record, benchmarks: Sequence[str]) -> int:
    """Sum the benchmark files of the study's jobs (--benchmarks: the compute job's inputs) per stage and split
    training and evaluation jobs into in-process compute and start-up + per-job overhead (CSV + HTML)."""
    jobs = compute.jobs_table(benchmarks, study.layout.benchmarks, study.layout.runs)
    table = compute.breakdown(jobs)
    written = compute.write_compute(table, _summary_path(study, outputs.COMPUTE))
    _log(f"{len(jobs)} jobs, {table['seconds'].iloc[-1]:.0f} job-seconds -> {written[0]}")
    return 0


def run_sensitivity(study: Record) -> int:
    """Write the dose-response table and the value the declared rule (tuning.select) chooses per swept option
    (parquet, CSV, HTML) and one figure per sweep, from ok runs only, for the sweeps of the study record: on the
    validation split, as every choice (the test split only confirms)."""
    if not study.sweeps:
        raise ConfigError(f"study '{study.name}' has no sweeps ({study.path}: sweeps is empty): nothing to analyse")
    try:
        design = sensitivity.read_design(study.sweeps)
    except ConfigError as error:
        raise ConfigError(f"study record {study.path}: {error}") from None
    select = study.tuning["select"]  # the declared rule (config tuning.select)
    minimize, subject_to = select["minimize"], dict(select["subject_to"])
    dose = sensitivity.dose_response(
        _tidy(study), design, sensitivity.SELECTION_SPLIT, study.reference, metrics=[minimize, *subject_to]
    )
    best = sensitivity.best_values(dose, minimize, subject_to)
    written = tables.write_sensitivity(dose, best, study.layout.summary)
    sweeps = list(dict.fromkeys(design["sweep"]))
    for sweep in sweeps:
        figures.plot_sensitivity(dose, Path(study.layout.figures) / outputs.sensitivity_figure(sweep), sweep)
    for row in best.itertuples():
        if row.note:
            _log(f"{row.sweep}/{row.option}{f' ({row.fixed})' if row.fixed else ''}: {row.note}")
    _log(f"{len(design)} points of {len(sweeps)} sweep(s): tables -> {Path(written[0]).parent}")
    return 0


def run_tuning(study: Record) -> int:
    """A tuning study's frontiers (table and figure), the paired frontier comparison of every declared contrast
    whose routers were both tuned, and the budget table, from ok runs only, on the validation split."""
    if study.stage != "tuning":
        raise ConfigError(f"study '{study.name}' is a {study.stage} study ({study.path}: stage): nothing was tuned")
    design = sensitivity.read_design(study.sweeps)
    tidy = _tidy(study)
    split = sensitivity.SELECTION_SPLIT
    table = frontier.frontier_table(tidy, design, split)
    pairs = [tuple(pair) for pair in study.tuning["pairs"]]
    comparison = pd.concat(
        [
            frontier.paired_frontier_comparison(tidy, design, pairs, split, metric)
            for metric in frontier.BALANCE_METRICS
        ],
        ignore_index=True,
    )
    status = _statistics(study, outputs.STATUS, "aggregate")
    budget = tuning.budget_table(study.tuning, design, study.seeds, status, study.max_steps)
    select = study.tuning["select"]
    rule = sensitivity.rule_text(select["minimize"], select["subject_to"])
    written = tables.write_tuning(table, comparison, budget, study.layout.summary, rule)
    chosen = _statistics(study, outputs.SENSITIVITY[1], "sensitivity")
    figure = Path(study.layout.figures) / f"{outputs.FRONTIER_FIGURE}.png"
    frontier_figure.plot_frontier(table, figure, frontier.BALANCE_METRICS, chosen)
    _log(
        f"{len(pairs)} frontier pair(s), {len(budget)} knob(s): tables -> {Path(written[0]).parent}, figure -> {figure}"
    )
    return 0


def run_specialisation(study: Record) -> int:
    """What the experts learned, on the comparison split, from ok runs only: the specialisation metrics per variant
    (the summary's rows, labelled; parquet, CSV, HTML), each expert's top token ids as text for one run per variant
    (the study's tokenizer), and the co-activation figure (the evaluation JSONs' per-layer counts); how stable the
    routing is: over training (the routing snapshots' curves) and across seeds (the probe's routings, validation
    split: the agreement table and figure)."""
    tidy = _tidy(study)
    ok_runs = set(zip(tidy["variant"].astype(str), tidy["seed"]))
    arrays = collect.load_layer_arrays(study.run_dirs(), study.split, keep=ok_runs, variants=study.variants)
    table = specialisation.specialisation_summary(_statistics(study, "summary"), study.statistics["primary"])
    summary_name, vocabulary_name, agreement_name = outputs.SPECIALISATION
    tables.write_specialisation(table, _summary_path(study, summary_name), study.split)
    tokenizer = study.layout.tokenizer
    decode = collect.read_tokenizer(tokenizer)
    vocabulary = specialisation.vocabulary_table(arrays, decode)
    labels = {v: study.describe(v)["label"] for v in study.variants}
    tables.write_vocabulary(
        vocabulary,
        _summary_path(study, vocabulary_name),
        TOP_TOKENS,
        study.split,
        tokenizer if decode else None,
        labels,
    )
    figure = Path(study.layout.figures) / f"{outputs.COACTIVATION_FIGURE}.png"
    shares, panels = specialisation.coactivation_by_rank(arrays)
    without = [v for v, routed in study.routed().items() if routed and v not in set(panels["variant"])]
    coactivation_figure.plot_coactivation(shares, panels, figure, without)
    routed = [v for v, is_routed in study.routed().items() if is_routed]
    curves = stability.stability_curves(arrays)
    routing_figure.plot_routing_stability(
        curves,
        Path(study.layout.figures) / f"{outputs.STABILITY_FIGURE}.png",
        [v for v in routed if v not in set(curves["variant"].astype(str))],
    )
    # The probe is routed where its split is scored: a study that does not score it has none (an earlier
    # evaluation's file in a run directory is not this study's output).
    scored = collect.PROBE_SPLIT in study.eval_splits
    probes = collect.load_probe_routings(study.run_dirs() if scored else [], keep=ok_runs, variants=study.variants)
    pairs = stability.agreement_pairs(probes)
    agreement = stability.agreement_summary(pairs)
    tables.write_agreement(agreement, pairs, _summary_path(study, agreement_name))
    routing_figure.plot_seed_agreement(
        pairs,
        Path(study.layout.figures) / f"{outputs.AGREEMENT_FIGURE}.png",
        [v for v in routed if v not in set(agreement["variant"])],
    )
    _log(
        f"{len(arrays)} layers of {len(ok_runs)} runs, {len(pairs)} pairs of seeds: tables -> {study.layout.summary}, "
        f"figures -> {study.layout.figures}"
    )
    return 0


VERBS = {  # the command line: one line per step, each reads only --study
    "aggregate": (run_aggregate, "collect the run directories into the tidy table"),
    "stats": (run_stats, "summary, paired comparison and ablation tables"),
    "figures": (run_figures, "report figures (PNG)"),
    "findings": (run_findings, "the findings in words (HTML)"),
    "compute": (run_compute, "job-seconds per stage from the benchmark files"),
    "sensitivity": (run_sensitivity, "dose-response of the router options of each sweep"),
    "tuning": (run_tuning, "a tuning study's frontiers, frontier comparisons and budget"),
    "specialisation": (
        run_specialisation,
        "what the experts learned: co-activation, vocabulary, utilisation, routing stability, agreement across seeds",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="STEP")
    for name, (run, summary) in VERBS.items():
        sub = commands.add_parser(name, help=summary, description=run.__doc__)
        sub.add_argument("--study", required=True, metavar="JSON", help="the study record results/<name>/study.json")
        sub.set_defaults(run=run, inputs={})
    # compute also takes the files it sums: the workflow passes the benchmark files of the study's jobs.
    commands.choices["compute"].add_argument(
        "--benchmarks", nargs="+", required=True, metavar="TSV", help="benchmark files under <root>/benchmarks/"
    )
    commands.choices["compute"].set_defaults(inputs=("benchmarks",))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        study = record.load(args.study, outputs.RECORD_KEYS[args.command])
        return args.run(study, **{name: getattr(args, name) for name in args.inputs})
    except GtmoeError as error:  # a problem the user can fix; anything else is a bug, with its traceback
        print(f"error: python -m analysis {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
