# Every metric of SPEC §5 for one run, on the validation and test splits from one model load
# (CUDA when the job has a GPU).


rule evaluate:
    input:
        checkpoint=f"{RUN}/checkpoint.pt",
        config=f"{RUN}/config.yaml",
        shards=expand(f"{SHARDS}/{{split}}", split=EVAL_SPLITS),
    output:
        **{
            split: captioned(
                f"{RUN}/eval_{split}.json",
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
    params:
        run_dir=subpath(input.config, parent=True),
        splits=EVAL_SPLITS,
    threads: job("evaluate", "threads", 1)
    resources:
        mem_mb=job("evaluate", "mem_mb", 4000),
        runtime=job("evaluate", "runtime", 30),
        **gpu_resources("evaluate"),
    conda:
        CONDA_ENV
    shell:
        "python -m gtmoe evaluate --run {params.run_dir:q} --split {params.splits:q} --out {output:q} "
        "--threads {threads} > {log:q} 2>&1"
