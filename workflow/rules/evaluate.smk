# Every metric of SPEC §5 for one run on one split (CUDA when the job has a GPU).


rule evaluate:
    input:
        checkpoint=f"{RUN}/checkpoint.pt",
        config=f"{RUN}/config.yaml",
        shards=f"{SHARDS}/{{split}}",
    output:
        captioned(f"{RUN}/eval_{{split}}.json", "run_evaluation", "Summary", "per-run evaluations",
                  variant="{variant}", seed="{seed}", split="{split}"),
    log:
        f"{LOGS}/evaluate/{{variant}}/seed{{seed}}_{{split}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{{variant}}/seed{{seed}}_{{split}}.tsv"
    params:
        run_dir=subpath(input.config, parent=True),
    threads: job("evaluate", "threads", 1)
    resources:
        mem_mb=job("evaluate", "mem_mb", 4000),
        runtime=job("evaluate", "runtime", 30),
        **gpu_resources("evaluate"),
    conda:
        CONDA_ENV
    shell:
        "python -m gtmoe evaluate --run {params.run_dir} --split {wildcards.split} --out {output} "
        "--threads {threads} > {log} 2>&1"
