# Every metric of SPEC §5 for one run, on the validation and test splits from one model load
# (CUDA when the job has a GPU). The `eval` settings come from the study record, not the run's
# config.yaml, and are this job's params trigger: editing them reruns the evaluations, never training.


rule evaluate:
    input:
        checkpoint=rules.train.output.checkpoint,
        config=rules.train.output.config,
        shards=expand(f"{SHARDS}/{{split}}", split=EVAL_SPLITS),
        study=ancient(STUDY_RECORD),
        trigger=EVALUATE_TRIGGER,  # common.smk: a deleted evaluation is rebuilt
    output:
        **{
            split: captioned(
                f"{RUN}/{contract.eval_file(split)}",
                "run_evaluation",
                "Summary",
                "per-run evaluations",
                variant="{variant}",
                seed="{seed}",
                split=split,
            )
            for split in EVAL_SPLITS
        },
    log:
        f"{LOGS}/evaluate/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{variant}}/seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: job("evaluate", "threads", 1)
    resources:
        **gpu_resources("evaluate"),
        mem_mb=job("evaluate", "mem_mb", 4000),
        runtime=job("evaluate", "runtime", 30),
    params:
        run_dir=subpath(input.config, parent=True),
        splits=EVAL_SPLITS,
        eval_settings=EVAL_SETTINGS,
    shell:
        "python -m gtmoe evaluate --run {params.run_dir:q} --study {input.study:q} --split {params.splits:q} "
        "--out {output:q} --threads {threads:q} > {log:q} 2>&1"
