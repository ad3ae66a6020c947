# Corpus -> tokenizer -> Arrow shards: shared by every run, built once.


rule corpus:
    input:
        trigger=CORPUS_TRIGGER,  # common.smk: a deleted corpus file is rebuilt
    output:
        splits=expand(f"{LAYOUT.corpus}/{{split}}.txt", split=SPLITS),
        meta=f"{LAYOUT.corpus}/corpus.json",
    log:
        f"{LOGS}/corpus.log",
    benchmark:
        f"{BENCHMARKS}/corpus.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("prepare", "mem_mb", 4000),
        runtime=job("prepare", "runtime", 20),
    params:
        corpus=config["data"].get("corpus", "wikitext-2"),
        source=config["data"]["source"],
        # A list: `:q` quotes each element, so a path with spaces or shell characters stays one argument.
        local_dir=["--local-dir", config["data"]["local_dir"]] if config["data"].get("local_dir") else [],
        out_dir=subpath(output.meta, parent=True),
    shell:
        "python -m gtmoe prepare corpus --corpus {params.corpus:q} --source {params.source:q} {params.local_dir:q} "
        "--out {params.out_dir:q} > {log:q} 2>&1"


rule tokenizer:
    input:
        f"{LAYOUT.corpus}/train.txt",
        trigger=TOKENIZER_TRIGGER,  # common.smk: a deleted tokenizer is rebuilt
    output:
        LAYOUT.tokenizer,
    log:
        f"{LOGS}/tokenizer.log",
    benchmark:
        f"{BENCHMARKS}/tokenizer.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("prepare", "mem_mb", 4000),
        runtime=job("prepare", "runtime", 20),
    params:
        corpus=subpath(input[0], parent=True),
        vocab_size=config["data"]["vocab_size"],
    shell:
        "python -m gtmoe prepare tokenizer --corpus {params.corpus:q} --vocab-size {params.vocab_size:q} "
        "--out {output:q} > {log:q} 2>&1"


rule shards:
    input:
        text=f"{LAYOUT.corpus}/{{split}}.txt",
        tokenizer=rules.tokenizer.output[0],
        trigger=SHARDS_TRIGGER,  # common.smk: a deleted shard directory is rebuilt
    output:
        directory(f"{SHARDS}/{{split}}"),
    log:
        f"{LOGS}/shards/{{split}}.log",
    benchmark:
        f"{BENCHMARKS}/shards/{{split}}.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=job("prepare", "mem_mb", 4000),
        runtime=job("prepare", "runtime", 20),
    params:
        corpus=subpath(input.text, parent=True),
        seq_len=config["data"]["seq_len"],
    shell:
        "python -m gtmoe prepare shards --corpus {params.corpus:q} --tokenizer {input.tokenizer:q} "
        "--split {wildcards.split:q} --seq-len {params.seq_len:q} --out {output:q} > {log:q} 2>&1"
