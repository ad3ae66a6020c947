# One training run per (variant, seed), its run config taken from the study record (study.json). The
# record is an `ancient` input: its mtime moves whenever anything in the study changes, so the trigger is
# the params value `weights` instead, the part of this run's config that can change the trained weights
# (gtmoe.contract.weight_config, the one definition of "the same run"). Editing a variant's router, the
# model or the optimiser retrains exactly the runs concerned; editing `eval` or a logging or checkpoint
# interval retrains nothing (a new interval applies to runs trained from then on). Turning routing snapshots
# on (train.routing_snapshots > 0) adds the validation shards to the inputs, which retrains the study's runs
# so that they take them; changing their number afterwards retrains nothing.


rule train:
    input:
        shards=f"{SHARDS}/train",
        probe=probe_shards,  # common.smk: the validation shards, for a run that takes routing snapshots
        study=ancient(STUDY_RECORD),
        trigger=TRAIN_TRIGGER,  # common.smk: a foreign run or a deleted run file retrains
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
        weights=lambda wc: run_weights(wc.variant, wc.seed),
    shell:
        # Appends: a resumed run's log keeps the interrupted attempt above it.
        "python -m gtmoe train --study {input.study:q} --variant {wildcards.variant:q} --seed {wildcards.seed:q} "
        "--out {params.run_dir:q} --threads {threads:q} >> {log:q} 2>&1"
