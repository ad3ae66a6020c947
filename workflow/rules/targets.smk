# Targets beside `all` (in the Snakefile): one variant, the ablation group, or the runs alone.
# Each also rebuilds the aggregates that depend on it, and nothing else that is up to date.


rule runs:
    input:
        eval_files(),


rule ablations:
    input:
        eval_files([STUDY.ablation_base, *STUDY.ablations] if STUDY.ablation_base else []),
        ANALYSIS_OUTPUTS,


for _variant in VARIANTS:

    rule:
        name:
            _variant
        input:
            eval_files([_variant]),
            ANALYSIS_OUTPUTS,
