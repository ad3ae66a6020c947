# Every metric of SPEC §5 for one run, on the validation and test splits from one model load
# (CUDA when the job has a GPU). The `eval` settings are this job's own params, not read from the
# run's config.yaml: editing them reruns the evaluations (Snakemake's params trigger), never training.


rule evaluate:
    input:
        checkpoint=rules.train.output.checkpoint,
        config=rules.train.output.config,
        shards=expand(f"{SHARDS}/{{split}}", split=EVAL_SPLITS),
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
        eval_settings=lambda wc: json.dumps(resolved_run_config(wc.variant, wc.seed)["eval"], sort_keys=True),
    shell:
        "python -m gtmoe evaluate --run {params.run_dir:q} --split {params.splits:q} --out {output:q} "
        "--eval-json {params.eval_settings:q} --threads {threads:q} > {log:q} 2>&1"
