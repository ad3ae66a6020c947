# Reference n-gram models (unigram, interpolated bigram) on the study's token shards: counted on
# train, interpolation weight tuned on validation. The tables and figures show them as reference rows
# and lines, so a reader sees at once whether the trained models beat a bigram.


rule ngram_baselines:
    input:
        expand(f"{SHARDS}/{{split}}", split=SPLITS),
        trigger=NGRAM_TRIGGER,  # common.smk: deleted under the tables that show it, it is rebuilt
    output:
        NGRAM,
    log:
        f"{LOGS}/ngram_baselines.log",
    benchmark:
        f"{BENCHMARKS}/ngram_baselines.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("prepare", "mem_mb", 4000),
        runtime=job("prepare", "runtime", 20),
    params:
        shards=subpath(input[0], parent=True),
    shell:
        "python -m gtmoe baselines --shards {params.shards:q} --out {output:q} > {log:q} 2>&1"
