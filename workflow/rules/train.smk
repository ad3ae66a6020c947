# One training run per (variant, seed). The resolved run config is a parameter of the job (no job of
# its own writes it); the job records it as config.yaml in the run directory. Snakemake's params
# trigger sees only the part that can change the trained weights (`weights`): editing a variant's
# router, the model or the optimiser retrains exactly the runs concerned, while `eval` and how often
# training logs or checkpoints (TRAIN_NOT_TRIGGERS) retrain nothing: `evaluate` takes the current
# `eval` settings as its own params, and a new logging or checkpoint interval applies to runs trained
# from then on. checkpoint_every is left out because saving a checkpoint changes no computation: an
# uninterrupted run ends with the same weights whatever the interval (on CPU a resumed one does too).
# TRAIN_NOT_TRIGGERS, weight_settings and NotATrigger are in common.smk.


rule train:
    input:
        shards=f"{SHARDS}/train",
    output:
        checkpoint=f"{RUN}/{contract.CHECKPOINT}",
        config=f"{RUN}/{contract.RUN_CONFIG}",
        train_log=f"{RUN}/{contract.TRAIN_LOG}",
        router_log=f"{RUN}/{contract.ROUTER_LOG}",
        summary=f"{RUN}/{contract.TRAIN_SUMMARY}",
    log:
        f"{LOGS}/train/{{variant}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{variant}}/seed{{seed}}.tsv"
    conda:
        CONDA_ENV
    threads: job("train", "threads", 1)
    resources:
        **gpu_resources("train"),
        mem_mb=job("train", "mem_mb", 4000),
        runtime=job("train", "runtime", 60),
    params:
        run_dir=subpath(output.summary, parent=True),
        # The trigger; sorted keys: reordering config.yaml changes nothing.
        weights=lambda wc: json.dumps(weight_settings(resolved_run_config(wc.variant, wc.seed)), sort_keys=True),
        run_config=lambda wc: NotATrigger(json.dumps(resolved_run_config(wc.variant, wc.seed))),
    shell:
        # Appends: a resumed run's log keeps the interrupted attempt above it.
        "python -m gtmoe train --config-json {params.run_config:q} --out {params.run_dir:q} --threads {threads:q} "
        ">> {log:q} 2>&1"
