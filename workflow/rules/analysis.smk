# Runs -> tidy table -> statistics (scipy.stats) -> figures (seaborn) and findings, each output in report.html.
# Every step reads the study record (STUDY_RECORD, written when the workflow parses) and nothing else about the
# study: its command line is `python -m analysis STEP --study STUDY_RECORD`. The record is an `ancient` input
# (its mtime moves with any edit of the study); the trigger is the params value `study`, the part of the
# record the step reads (analysis.outputs.RECORD_KEYS), so a step reruns exactly when what it reads changed.
# The file names are analysis.outputs'.


rule aggregate:
    input:
        record=ancient(STUDY_RECORD),
        evals=eval_files(),
        train_logs=run_files(contract.TRAIN_LOG),
        router_logs=run_files(contract.ROUTER_LOG),
    output:
        table=summary_file(outputs.TIDY),
        status=summary_file(f"{outputs.STATUS}.parquet"),
        status_csv=summary_file(f"{outputs.STATUS}.csv"),
        status_html=captioned(summary_file(f"{outputs.STATUS}.html"), "run_status", "Summary", table="run status"),
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
        study=record_trigger("aggregate"),
    shell:
        analysis_command("aggregate")


rule statistics:
    input:
        record=ancient(STUDY_RECORD),
        table=rules.aggregate.output.table,
        baselines=NGRAM,
    output:
        summary=summary_file("summary.parquet"),
        summary_csv=summary_file("summary.csv"),
        summary_html=captioned(summary_file("summary.html"), "summary", "Summary", table="per variant"),
        comparisons=summary_file("comparisons.parquet"),
        comparisons_csv=summary_file("comparisons.csv"),
        comparisons_html=captioned(
            summary_file("comparisons.html"), "comparisons", "Summary", table=f"paired vs {STUDY.reference}"
        ),
        ablations=summary_file("ablations.parquet"),
        ablations_csv=summary_file("ablations.csv"),
        ablations_html=captioned(summary_file("ablations.html"), "ablations", "Ablations", table="paired deltas"),
        confirmatory=summary_file(f"{outputs.CONFIRMATORY}.parquet"),
        confirmatory_csv=summary_file(f"{outputs.CONFIRMATORY}.csv"),
        confirmatory_tex=summary_file(f"{outputs.CONFIRMATORY}.tex"),
        confirmatory_html=captioned(
            summary_file(f"{outputs.CONFIRMATORY}.html"), "confirmatory", "Summary", table="confirmatory contrasts"
        ),
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
        study=record_trigger("stats"),
    shell:
        analysis_command("stats")


rule figures:
    input:
        record=ancient(STUDY_RECORD),
        table=rules.aggregate.output.table,
        summary=rules.statistics.output.summary,
        comparisons=rules.statistics.output.comparisons,
        ablations=rules.statistics.output.ablations,
        router_logs=run_files(contract.ROUTER_LOG),
        train_logs=run_files(contract.TRAIN_LOG),
        baselines=NGRAM,
    output:
        perplexity=captioned(figure_file("perplexity"), "perplexity", "Perplexity", figure="per variant"),
        pareto=captioned(figure_file("pareto"), "pareto", "Perplexity", figure="perplexity vs Gini"),
        reference_forest=captioned(
            figure_file("reference_forest"), "reference_forest", "Perplexity", figure=f"paired vs {STUDY.reference}"
        ),
        load_balance=captioned(figure_file("load_balance"), "load_balance", "Load balance", figure="Gini and MaxVio"),
        load_heatmap=captioned(
            figure_file("load_heatmap"), "load_heatmap", "Load balance", figure="expert x layer load"
        ),
        training_balance=captioned(
            figure_file("training_balance"),
            "training_balance",
            "Training dynamics",
            figure="Gini and MaxVio over steps",
        ),
        load_over_training=captioned(  # with the other pictures of what the experts became (issue 23)
            figure_file("load_over_training"),
            "load_over_training",
            "Specialisation",
            figure="expert x step load",
        ),
        router_state=captioned(
            figure_file("router_state"), "router_state", "Router internals", figure="router state per expert"
        ),
        ablation_forest=captioned(figure_file("ablation_forest"), "ablation_forest", "Ablations", figure="forest plot"),
        flip_rates=captioned(figure_file("flip_rates"), "flip_rates", "Router internals", figure="flip rate per term"),
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
        study=record_trigger("figures"),
    shell:
        analysis_command("figures")


# What the experts learned (issue 23): co-activation, each expert's top tokens (decoded with the study's tokenizer)
# the specialisation metrics per variant, routing stability over training (the routing snapshots) and agreement
# across seeds (the probe), from the evaluations' per-layer counts and the statistics' summary.
SUMMARY_TABLE, VOCABULARY_TABLE, AGREEMENT_TABLE = outputs.SPECIALISATION


rule specialisation:
    input:
        record=ancient(STUDY_RECORD),
        table=rules.aggregate.output.table,
        summary=rules.statistics.output.summary,
        evals=eval_files(),
        tokenizer=LAYOUT.tokenizer,
    output:
        summary=summary_file(f"{SUMMARY_TABLE}.parquet"),
        summary_csv=summary_file(f"{SUMMARY_TABLE}.csv"),
        summary_html=captioned(
            summary_file(f"{SUMMARY_TABLE}.html"), SUMMARY_TABLE, "Specialisation", table="per variant"
        ),
        vocabulary=summary_file(f"{VOCABULARY_TABLE}.parquet"),
        vocabulary_csv=summary_file(f"{VOCABULARY_TABLE}.csv"),
        vocabulary_html=captioned(
            summary_file(f"{VOCABULARY_TABLE}.html"), VOCABULARY_TABLE, "Specialisation", table="top tokens per expert"
        ),
        agreement=summary_file(f"{AGREEMENT_TABLE}.parquet"),
        agreement_csv=summary_file(f"{AGREEMENT_TABLE}.csv"),
        agreement_html=captioned(
            summary_file(f"{AGREEMENT_TABLE}.html"), AGREEMENT_TABLE, "Specialisation", table="agreement across seeds"
        ),
        coactivation=captioned(
            figure_file(outputs.COACTIVATION_FIGURE),
            outputs.COACTIVATION_FIGURE,
            "Specialisation",
            figure="co-activation",
        ),
        stability=captioned(
            figure_file(outputs.STABILITY_FIGURE),
            outputs.STABILITY_FIGURE,
            "Specialisation",
            figure="routing stability over training",
        ),
        agreement_figure=captioned(
            figure_file(outputs.AGREEMENT_FIGURE),
            outputs.AGREEMENT_FIGURE,
            "Specialisation",
            figure="agreement across seeds",
        ),
    log:
        f"{LOGS}/specialisation.log",
    benchmark:
        f"{BENCHMARKS}/specialisation.tsv"
    localrule: True
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("analysis", "mem_mb", 2000),
        runtime=job("analysis", "runtime", 10),
    params:
        study=record_trigger("specialisation"),
    shell:
        analysis_command("specialisation")


# Dose-response of each sweep (config `sweeps`, gtmoe.sweeps): only when the study has sweeps.
if STUDY.sweeps:

    rule sensitivity:
        input:
            record=ancient(STUDY_RECORD),
            table=rules.aggregate.output.table,
        output:
            table=summary_file("sensitivity.parquet"),
            table_csv=summary_file("sensitivity.csv"),
            table_html=captioned(
                summary_file("sensitivity.html"), "sensitivity_table", "Sensitivity", table="dose-response"
            ),
            best=summary_file("sensitivity_best.parquet"),
            best_csv=summary_file("sensitivity_best.csv"),
            best_html=captioned(
                summary_file("sensitivity_best.html"),
                "sensitivity_best",
                "Sensitivity",
                table="best value per option",
            ),
            figures=[
                captioned(
                    f"{FIGURES}/{outputs.sensitivity_figure(sweep)}",
                    "sensitivity",
                    "Sensitivity",
                    figure=f"sweep {sweep}",
                )
                for sweep in STUDY.sweeps
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
            study=record_trigger("sensitivity"),
        shell:
            analysis_command("sensitivity")


# A tuning study (config `stage: tuning`, gtmoe.tuning): each router's frontier across its knob, the paired
# frontier comparison of the declared contrasts and the budget table; the findings lead with them.
if STUDY.stage == "tuning":

    rule tuning:
        input:
            record=ancient(STUDY_RECORD),
            table=rules.aggregate.output.table,
            status=rules.aggregate.output.status,
            chosen=rules.sensitivity.output.best,
        output:
            frontier=summary_file("frontier.parquet"),
            frontier_csv=summary_file("frontier.csv"),
            frontier_html=captioned(summary_file("frontier.html"), "frontier_table", "Tuning", table="frontier points"),
            comparison=summary_file("frontier_comparison.parquet"),
            comparison_csv=summary_file("frontier_comparison.csv"),
            comparison_tex=summary_file("frontier_comparison.tex"),
            comparison_html=captioned(
                summary_file("frontier_comparison.html"), "frontier_comparison", "Tuning", table="frontier comparison"
            ),
            budget=summary_file("tuning_budget.parquet"),
            budget_csv=summary_file("tuning_budget.csv"),
            budget_html=captioned(summary_file("tuning_budget.html"), "tuning_budget", "Tuning", table="budget"),
            figure=captioned(figure_file(outputs.FRONTIER_FIGURE), "frontier", "Tuning", figure="frontiers"),
        log:
            f"{LOGS}/tuning.log",
        benchmark:
            f"{BENCHMARKS}/tuning.tsv"
        localrule: True
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=job("analysis", "mem_mb", 2000),
            runtime=job("analysis", "runtime", 10),
        params:
            study=record_trigger("tuning"),
        shell:
            analysis_command("tuning")


# The report's category menu is sorted alphabetically (localeCompare): the star puts the findings first.
FINDINGS_CATEGORY = "★ Findings"


rule findings:
    input:
        record=ancient(STUDY_RECORD),
        confirmatory=rules.statistics.output.confirmatory,
        comparisons=rules.statistics.output.comparisons,
        ablations=rules.statistics.output.ablations,
        summary=rules.statistics.output.summary,
        status=rules.aggregate.output.status,
        agreement=rules.specialisation.output.agreement,
        baselines=NGRAM,
        train_logs=run_files(contract.TRAIN_LOG),
        router_logs=run_files(contract.ROUTER_LOG),
        sensitivity=[rules.sensitivity.output.table, rules.sensitivity.output.best] if STUDY.sweeps else [],
        tuning=[rules.tuning.output.comparison, rules.tuning.output.budget] if STUDY.stage == "tuning" else [],
    output:
        captioned(summary_file(outputs.FINDINGS), "findings", FINDINGS_CATEGORY, table="findings in words"),
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
        study=record_trigger("findings"),
    shell:
        analysis_command("findings")


rule compute:
    input:
        record=ancient(STUDY_RECORD),
        # Benchmark files are outputs of their jobs, so they are valid inputs here: compute runs after them all.
        benchmarks=study_benchmarks(),
        train_summaries=run_files(contract.TRAIN_SUMMARY),
        evals=eval_files(),
    output:
        csv=summary_file(f"{outputs.COMPUTE}.csv"),
        html=captioned(summary_file(f"{outputs.COMPUTE}.html"), "compute", "Summary", table="compute breakdown"),
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
        study=record_trigger("compute"),
    shell:
        analysis_command("compute")


ANALYSIS_OUTPUTS = [
    *rules.statistics.output,
    *rules.figures.output,
    *rules.aggregate.output,
    *rules.findings.output,
    *rules.compute.output,
    *rules.specialisation.output,
    *(rules.sensitivity.output if STUDY.sweeps else []),
    *(rules.tuning.output if STUDY.stage == "tuning" else []),
]
