# Runs -> tidy table -> statistics (scipy.stats) -> figures (seaborn), each output in report.html.

ABLATION_ARGS = (
    f"--ablation-base {STUDY.ablation_base} --ablations {' '.join(STUDY.ablations)}"
    if STUDY.ablation_base
    else "--ablations"
)
PAIR_ARGS = f"--reference {STUDY.reference} --split test {ABLATION_ARGS}"


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
        run_dirs=" ".join(run_dirs()),
        variants=" ".join(VARIANTS),
        seeds=" ".join(map(str, SEEDS)),
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "python -m analysis aggregate --run-dirs {params.run_dirs} --variants {params.variants} "
        "--seeds {params.seeds} --out-table {output.table} --out-status {output.status} "
        "--out-status-html {output.status_html} > {log} 2>&1"


rule statistics:
    input:
        rules.aggregate.output.table,
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
        "python -m analysis stats --table {input} --out-dir {params.out_dir} {params.pairs} > {log} 2>&1"


rule figures:
    input:
        table=rules.aggregate.output.table,
        router_logs=run_files("router_log.parquet"),
        train_logs=run_files("train_log.parquet"),
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
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{BENCHMARKS}/figures.tsv"
    params:
        run_dirs=" ".join(run_dirs()),
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
        "python -m analysis figures --table {input.table} --run-dirs {params.run_dirs} "
        "--out-dir {params.out_dir} {params.pairs} > {log} 2>&1"


ANALYSIS_OUTPUTS = [*rules.statistics.output, *rules.figures.output, *rules.aggregate.output]
