# One training run per (variant, seed). The run config is resolved from config.yaml, so editing a
# variant's settings reruns exactly that variant's runs (Snakemake's params trigger).


rule run_config:
    output:
        RUN_CONFIG,
    log:
        f"{LOGS}/run_config/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/run_config/{{variant}}/seed{{seed}}.tsv"
    params:
        resolved=lambda wc: STUDY.run_config(wc.variant, int(wc.seed), SHARDS).to_dict(),
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/write_run_config.py"


rule train:
    input:
        config=RUN_CONFIG,
        shards=f"{SHARDS}/train",
    output:
        checkpoint=f"{RUN}/checkpoint.pt",
        config=f"{RUN}/config.yaml",
        train_log=f"{RUN}/train_log.parquet",
        router_log=f"{RUN}/router_log.parquet",
        summary=f"{RUN}/train_summary.json",
    log:
        f"{LOGS}/train/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{variant}}/seed{{seed}}.tsv"
    params:
        run_dir=subpath(output.summary, parent=True),
    threads: job("train", "threads", 1)
    resources:
        mem_mb=job("train", "mem_mb", 4000),
        runtime=job("train", "runtime", 60),
        **gpu_resources("train"),
    conda:
        CONDA_ENV
    shell:
        # Appends: a resumed run's log keeps the interrupted attempt above it.
        "python -m gtmoe train --config {input.config} --out {params.run_dir} --threads {threads} >> {log} 2>&1"
