# Runs -> tidy table -> statistics (scipy.stats) -> figures (seaborn), each output in report.html.
# Config values reach the shell only as params formatted with `:q`; a list param is quoted element by
# element, so each value stays one argument whatever characters it holds.

ABLATION_ARGS = (
    ["--ablation-base", STUDY.ablation_base, "--ablations", *STUDY.ablations]
    if STUDY.ablation_base
    else ["--ablations"]
)
# Declared endpoints, test level and power (config.yaml `statistics`).
STATISTICS_ARGS = [
    "--primary",
    *STUDY.statistics["primary"],
    "--alpha",
    str(STUDY.statistics["alpha"]),
    "--power",
    str(STUDY.statistics["power"]),
]
PAIR_ARGS = ["--reference", STUDY.reference, "--split", "test", *ABLATION_ARGS, *STATISTICS_ARGS]


rule aggregate:
    input:
        evals=eval_files(),
        train_logs=run_files(contract.TRAIN_LOG),
        router_logs=run_files(contract.ROUTER_LOG),
    output:
        table=f"{SUMMARY}/runs.parquet",
        status=f"{SUMMARY}/run_status.csv",
        status_html=captioned(f"{SUMMARY}/run_status.html", "run_status", "Summary", table="run status"),
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{BENCHMARKS}/aggregate.tsv"
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    params:
        run_dirs=run_dirs(),
        variants=VARIANTS,
        seeds=SEEDS,
    shell:
        "python -m analysis aggregate --run-dirs {params.run_dirs:q} --variants {params.variants:q} "
        "--seeds {params.seeds:q} --out-table {output.table:q} --out-status {output.status:q} "
        "--out-status-html {output.status_html:q} > {log:q} 2>&1"


rule statistics:
    input:
        table=rules.aggregate.output.table,
        baselines=NGRAM,
    output:
        summary=f"{SUMMARY}/summary.csv",
        summary_html=captioned(f"{SUMMARY}/summary.html", "summary", "Summary", table="per variant"),
        comparisons=f"{SUMMARY}/comparisons.csv",
        comparisons_html=captioned(
            f"{SUMMARY}/comparisons.html", "comparisons", "Summary", table=f"paired vs {STUDY.reference}"
        ),
        ablations=f"{SUMMARY}/ablations.csv",
        ablations_html=captioned(f"{SUMMARY}/ablations.html", "ablations", "Ablations", table="paired deltas"),
    log:
        f"{LOGS}/statistics.log",
    benchmark:
        f"{BENCHMARKS}/statistics.tsv"
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    params:
        pairs=PAIR_ARGS,
        out_dir=subpath(output.summary, parent=True),
    shell:
        "python -m analysis stats --table {input.table:q} --baselines {input.baselines:q} "
        "--out-dir {params.out_dir:q} {params.pairs:q} > {log:q} 2>&1"


rule figures:
    input:
        table=rules.aggregate.output.table,
        router_logs=run_files(contract.ROUTER_LOG),
        train_logs=run_files(contract.TRAIN_LOG),
        baselines=NGRAM,
    output:
        perplexity=captioned(f"{FIGURES}/perplexity.png", "perplexity", "Perplexity", figure="per variant"),
        pareto=captioned(f"{FIGURES}/pareto.png", "pareto", "Perplexity", figure="perplexity vs Gini"),
        reference_forest=captioned(
            f"{FIGURES}/reference_forest.png", "reference_forest", "Perplexity", figure=f"paired vs {STUDY.reference}"
        ),
        load_balance=captioned(f"{FIGURES}/load_balance.png", "load_balance", "Load balance", figure="Gini and MaxVio"),
        load_heatmap=captioned(
            f"{FIGURES}/load_heatmap.png", "load_heatmap", "Load balance", figure="expert x layer load"
        ),
        training_balance=captioned(
            f"{FIGURES}/training_balance.png",
            "training_balance",
            "Training dynamics",
            figure="Gini and MaxVio over steps",
        ),
        router_state=captioned(
            f"{FIGURES}/router_state.png", "router_state", "Router internals", figure="router state per expert"
        ),
        ablation_forest=captioned(
            f"{FIGURES}/ablation_forest.png", "ablation_forest", "Ablations", figure="forest plot"
        ),
        flip_rates=captioned(f"{FIGURES}/flip_rates.png", "flip_rates", "Router internals", figure="flip rate per term"),
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{BENCHMARKS}/figures.tsv"
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    params:
        run_dirs=run_dirs(),
        pairs=PAIR_ARGS,
        out_dir=subpath(output.perplexity, parent=True),
    shell:
        "python -m analysis figures --table {input.table:q} --run-dirs {params.run_dirs:q} "
        "--baselines {input.baselines:q} --out-dir {params.out_dir:q} {params.pairs:q} > {log:q} 2>&1"


# Dose-response of each sweep (config `sweeps`, gtmoe.sweeps): only when the config has sweeps.
if SWEEPS:

    rule sensitivity:
        input:
            table=rules.aggregate.output.table,
        output:
            table=f"{SUMMARY}/sensitivity.csv",
            table_html=captioned(
                f"{SUMMARY}/sensitivity.html", "sensitivity_table", "Sensitivity", table="dose-response"
            ),
            best=f"{SUMMARY}/sensitivity_best.csv",
            best_html=captioned(
                f"{SUMMARY}/sensitivity_best.html", "sensitivity_best", "Sensitivity", table="best value per option"
            ),
            figures=[
                captioned(f"{FIGURES}/sensitivity_{sweep}.png", "sensitivity", "Sensitivity", figure=f"sweep {sweep}")
                for sweep in SWEEPS
            ],
        log:
            f"{LOGS}/sensitivity.log",
        benchmark:
            f"{BENCHMARKS}/sensitivity.tsv"
        localrule: True
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=job("analysis", "mem_mb", 2000),
            runtime=job("analysis", "runtime", 10),
        params:
            design=json.dumps(STUDY.sweep_design),
            reference=STUDY.reference,
            out_dir=subpath(output.table, parent=True),
            figures_dir=lambda wildcards, output: Path(output.figures[0]).parent,
        shell:
            "python -m analysis sensitivity --table {input.table:q} --design-json {params.design:q} "
            "--reference {params.reference:q} --split test --out-dir {params.out_dir:q} "
            "--figures-dir {params.figures_dir:q} > {log:q} 2>&1"


# The report's category menu is sorted alphabetically (localeCompare): the star puts the findings first.
FINDINGS_CATEGORY = "★ Findings"


rule findings:
    input:
        comparisons=rules.statistics.output.comparisons,
        ablations=rules.statistics.output.ablations,
        summary=rules.statistics.output.summary,
        status=rules.aggregate.output.status,
        baselines=NGRAM,
        train_logs=run_files(contract.TRAIN_LOG),
        sensitivity=[rules.sensitivity.output.table, rules.sensitivity.output.best] if SWEEPS else [],
    output:
        captioned(f"{SUMMARY}/findings.html", "findings", FINDINGS_CATEGORY, table="findings in words"),
    log:
        f"{LOGS}/findings.log",
    benchmark:
        f"{BENCHMARKS}/findings.tsv"
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    params:
        run_dirs=run_dirs(),
        pairs=PAIR_ARGS,
        summary_dir=subpath(input.summary, parent=True),
        still_learning_slope=STUDY.still_learning_slope,
    shell:
        "python -m analysis findings --summary-dir {params.summary_dir:q} --baselines {input.baselines:q} "
        "--run-dirs {params.run_dirs:q} --still-learning-slope {params.still_learning_slope:q} --out {output:q} "
        "{params.pairs:q} > {log:q} 2>&1"


rule compute:
    input:
        # Benchmark files are outputs of their jobs, so they are valid inputs here.
        benchmarks=study_benchmarks(),
        train_summaries=run_files(contract.TRAIN_SUMMARY),
        evals=eval_files(),
    output:
        csv=f"{SUMMARY}/compute.csv",
        html=captioned(f"{SUMMARY}/compute.html", "compute", "Summary", table="compute breakdown"),
    log:
        f"{LOGS}/compute.log",
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    params:
        runs_root=Path(RUN).parents[1],  # results/runs
    shell:
        "python -m analysis compute --benchmarks {input.benchmarks:q} --runs-root {params.runs_root:q}"
        " --out-csv {output.csv:q} --out-html {output.html:q} > {log:q} 2>&1"


ANALYSIS_OUTPUTS = [
    *rules.statistics.output,
    *rules.figures.output,
    *rules.aggregate.output,
    *rules.findings.output,
    *rules.compute.output,
    *(rules.sensitivity.output if SWEEPS else []),
]
