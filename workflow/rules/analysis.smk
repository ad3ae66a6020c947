# Runs -> tidy table -> statistics (scipy.stats) -> figures (seaborn), each output in report.html.
# Config values reach the shell only as params formatted with `:q`; a list param is quoted element by
# element, so each value stays one argument whatever characters it holds.

ABLATION_ARGS = (
    ["--ablation-base", STUDY.ablation_base, "--ablations", *STUDY.ablations]
    if STUDY.ablation_base
    else ["--ablations"]
)
# Declared endpoints, test level and power (config.yaml `statistics`).
STATISTICS_ARGS = ["--primary", *STUDY.statistics["primary"], "--alpha", str(STUDY.statistics["alpha"]),
                   "--power", str(STUDY.statistics["power"])]
PAIR_ARGS = ["--reference", STUDY.reference, "--split", "test", *ABLATION_ARGS, *STATISTICS_ARGS]


rule aggregate:
    input:
        evals=eval_files(),
        train_logs=run_files("train_log.parquet"),
        router_logs=run_files("router_log.parquet"),
    output:
        table=f"{SUMMARY}/runs.parquet",
        status=f"{SUMMARY}/run_status.csv",
        status_html=captioned(f"{SUMMARY}/run_status.html", "run_status", "Summary", table="run status"),
    log:
        f"{LOGS}/aggregate.log",
    benchmark:
        f"{BENCHMARKS}/aggregate.tsv"
    params:
        run_dirs=run_dirs(),
        variants=VARIANTS,
        seeds=SEEDS,
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    localrule: True
    conda:
        CONDA_ENV
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
        comparisons_html=captioned(f"{SUMMARY}/comparisons.html", "comparisons", "Summary",
                                   table=f"paired vs {STUDY.reference}"),
        ablations=f"{SUMMARY}/ablations.csv",
        ablations_html=captioned(f"{SUMMARY}/ablations.html", "ablations", "Ablations", table="paired deltas"),
    log:
        f"{LOGS}/statistics.log",
    benchmark:
        f"{BENCHMARKS}/statistics.tsv"
    params:
        pairs=PAIR_ARGS,
        out_dir=subpath(output.summary, parent=True),
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "python -m analysis stats --table {input.table:q} --baselines {input.baselines:q} "
        "--out-dir {params.out_dir:q} {params.pairs:q} > {log:q} 2>&1"


rule figures:
    input:
        table=rules.aggregate.output.table,
        router_logs=run_files("router_log.parquet"),
        train_logs=run_files("train_log.parquet"),
        baselines=NGRAM,
    output:
        perplexity=captioned(f"{FIGURES}/perplexity.png", "perplexity", "Perplexity", figure="per variant"),
        pareto=captioned(f"{FIGURES}/pareto.png", "pareto", "Perplexity", figure="perplexity vs Gini"),
        reference_forest=captioned(f"{FIGURES}/reference_forest.png", "reference_forest", "Perplexity",
                                   figure=f"paired vs {STUDY.reference}"),
        load_balance=captioned(f"{FIGURES}/load_balance.png", "load_balance", "Load balance",
                               figure="Gini and MaxVio"),
        load_heatmap=captioned(f"{FIGURES}/load_heatmap.png", "load_heatmap", "Load balance",
                               figure="expert x layer load"),
        training_balance=captioned(f"{FIGURES}/training_balance.png", "training_balance", "Training dynamics",
                                   figure="Gini and MaxVio over steps"),
        rdesi_internals=captioned(f"{FIGURES}/rdesi_internals.png", "rdesi_internals", "RD-ESI internals",
                                  figure="reputation, load, bonus"),
        ablation_forest=captioned(f"{FIGURES}/ablation_forest.png", "ablation_forest", "Ablations",
                                  figure="forest plot"),
        flip_rates=captioned(f"{FIGURES}/flip_rates.png", "flip_rates", "RD-ESI internals",
                             figure="flip rate per term"),
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{BENCHMARKS}/figures.tsv"
    params:
        run_dirs=run_dirs(),
        pairs=PAIR_ARGS,
        out_dir=subpath(output.perplexity, parent=True),
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "python -m analysis figures --table {input.table:q} --run-dirs {params.run_dirs:q} "
        "--baselines {input.baselines:q} --out-dir {params.out_dir:q} {params.pairs:q} > {log:q} 2>&1"


# The report's category menu is sorted alphabetically (localeCompare): the star puts the findings first.
FINDINGS_CATEGORY = "★ Findings"


rule findings:
    input:
        comparisons=rules.statistics.output.comparisons,
        ablations=rules.statistics.output.ablations,
        summary=rules.statistics.output.summary,
        status=rules.aggregate.output.status,
        baselines=NGRAM,
        train_logs=run_files("train_log.parquet"),
    output:
        captioned(f"{SUMMARY}/findings.html", "findings", FINDINGS_CATEGORY, table="findings in words"),
    log:
        f"{LOGS}/findings.log",
    benchmark:
        f"{BENCHMARKS}/findings.tsv"
    params:
        run_dirs=run_dirs(),
        pairs=PAIR_ARGS,
        summary_dir=subpath(input.summary, parent=True),
        still_learning_slope=STUDY.still_learning_slope,
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "python -m analysis findings --summary-dir {params.summary_dir:q} --baselines {input.baselines:q} "
        "--run-dirs {params.run_dirs:q} --still-learning-slope {params.still_learning_slope:q} --out {output:q} "
        "{params.pairs:q} > {log:q} 2>&1"


rule compute:
    input:
        # Benchmark files are outputs of their jobs, so they are valid inputs here.
        benchmarks=study_benchmarks(),
        train_summaries=run_files("train_summary.json"),
        evals=eval_files(),
    output:
        csv=f"{SUMMARY}/compute.csv",
        html=captioned(f"{SUMMARY}/compute.html", "compute", "Summary", table="compute breakdown"),
    log:
        f"{LOGS}/compute.log",
    params:
        runs_root=Path(RUN).parents[1],  # results/runs
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "python -m analysis compute --benchmarks {input.benchmarks:q} --runs-root {params.runs_root:q}"
        " --out-csv {output.csv:q} --out-html {output.html:q} > {log:q} 2>&1"


ANALYSIS_OUTPUTS = [*rules.statistics.output, *rules.figures.output, *rules.aggregate.output,
                    *rules.findings.output, *rules.compute.output]
