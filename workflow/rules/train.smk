# One training run per (variant, seed). The resolved run config is a parameter of the job (no job of
# its own writes it), so editing a variant's settings reruns exactly that variant's runs (Snakemake's
# params trigger); the job records it as config.yaml in the run directory.


rule train:
    input:
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
        run_config=lambda wc: json.dumps(STUDY.run_config(wc.variant, int(wc.seed), SHARDS).to_dict()),
    threads: job("train", "threads", 1)
    resources:
        mem_mb=job("train", "mem_mb", 4000),
        runtime=job("train", "runtime", 60),
        **gpu_resources("train"),
    conda:
        CONDA_ENV
    shell:
        # Appends: a resumed run's log keeps the interrupted attempt above it.
        "python -m gtmoe train --config-json {params.run_config:q} --out {params.run_dir:q} --threads {threads} "
        ">> {log:q} 2>&1"
