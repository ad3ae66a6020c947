"""``python -m gtmoe prepare {corpus,tokenizer,shards}``: the parser (:func:`add_prepare_parser`) and one
handler per stage."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from gtmoe.checks import positive_int
from gtmoe.data.corpus import (
    CORPORA,
    CORPUS_META,
    DEFAULT_CORPUS,
    LOCAL_FILES,
    SPLITS,
    _load_corpus_with_origins,
    check_published_counts,
    corpus_spec,
    count_words,
    read_corpus_split,
    write_corpus,
)
from gtmoe.data.shards import MANIFEST, write_shards
from gtmoe.data.tokenizer import MIN_VOCAB_SIZE, _load_tokenizer, encode_split, train_tokenizer
from gtmoe.files import sha256_file

log = logging.getLogger("gtmoe.data")  # the logger name the `prepare` log lines have always carried

# The bounds of model.vocab_size and model.max_seq_len (gtmoe.config.MODEL_LIMITS): no model can use more, and a
# --seq-len beyond it would allocate a block of that many tokens.
MAX_VOCAB_SIZE = 1 << 20
MAX_SEQ_LEN = 1 << 20


def _count_in(low: int, high: int):
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], not {text!r:.40}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], not {value}")
        return value

    return parse


def _tokenizer_paths(args: argparse.Namespace) -> dict:
    """What `prepare tokenizer` reads (the corpus' train split and corpus.json) and writes (--out)."""
    return {"flag": "--out", "outputs": [args.out], "reads": [args.corpus / "train.txt", args.corpus / CORPUS_META]}


def _shards_paths(args: argparse.Namespace) -> dict:
    """What `prepare shards` reads (a corpus split, corpus.json, the tokenizer) and fills (the --out directory)."""
    reads = [args.corpus / f"{args.split}.txt", args.corpus / CORPUS_META, args.tokenizer]
    return {"flag": "--out", "outputs": [args.out], "reads": reads, "writes": (MANIFEST, "shard-*.arrow")}


def _cmd_corpus(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    spec = corpus_spec(args.corpus)
    corpus, origins, provenance = _load_corpus_with_origins(
        args.local_dir, args.source, verify=not args.no_verify, corpus_name=spec.name
    )
    if not args.no_verify:
        check_published_counts(corpus, spec, origins)
    extra = {split: {"corpus": spec.name, **provenance[split]} for split in SPLITS}
    summary = write_corpus(corpus, args.out, sources=origins, extra=extra)
    counts = ", ".join(f"{split} {s['lines']:,} lines / {s['words']:,} words" for split, s in summary.items())
    log.info("corpus: %s from %s -> %s in %.1fs", counts, origins["train"], args.out, time.perf_counter() - start)


def _cmd_tokenizer(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    lines = read_corpus_split(args.corpus, "train")
    tokenizer = train_tokenizer(lines, args.vocab_size, args.out)
    log.info(
        "tokenizer: byte-level BPE, vocab %d (asked %d) from %s train lines -> %s in %.1fs",
        tokenizer.get_vocab_size(),
        args.vocab_size,
        f"{len(lines):,}",
        args.out,
        time.perf_counter() - start,
    )


def _cmd_shards(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    tokenizer = _load_tokenizer(args.tokenizer)
    lines = read_corpus_split(args.corpus, args.split)
    tokens = encode_split(tokenizer, lines)
    corpus_meta = json.loads((Path(args.corpus) / CORPUS_META).read_text())
    meta = {
        "split": args.split,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": sha256_file(Path(args.tokenizer)),
        "corpus_sha256": corpus_meta[args.split]["sha256"],
    }
    manifest = write_shards(
        tokens, args.out, args.seq_len, n_words=count_words(lines), rows_per_shard=args.rows_per_shard, meta=meta
    )
    log.info(
        "shards: %s %s tokens (%s words) -> %d blocks of %d in %d shard(s) at %s in %.1fs",
        args.split,
        f"{manifest['n_tokens']:,}",
        f"{manifest['n_words']:,}",
        manifest["n_blocks"],
        args.seq_len,
        len(manifest["shards"]),
        args.out,
        time.perf_counter() - start,
    )


def add_prepare_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare {corpus,tokenizer,shards}``; each sets ``func`` to the function that runs it."""
    prepare = subparsers.add_parser(
        "prepare",
        help="build the data artefacts: corpus, tokenizer, token shards",
        description="Build the WikiText data artefacts (WikiText-2 or WikiText-103), one stage at a time.",
    )
    stages = prepare.add_subparsers(dest="stage", required=True, metavar="{corpus,tokenizer,shards}")

    corpus = stages.add_parser(
        "corpus", help="load and verify the three splits", description="Write {split}.txt and corpus.json."
    )
    corpus.add_argument(
        "--corpus",
        choices=tuple(CORPORA),
        default=DEFAULT_CORPUS,
        help=f"which WikiText release: its hub config and published checksums and counts (default {DEFAULT_CORPUS})",
    )
    corpus.add_argument(
        "--source",
        choices=("auto", "local", "hub"),
        default="auto",
        help="where to read the corpus: 'local' files, the Hugging Face 'hub', or 'auto' "
        "(local when --local-dir holds all three files, else the hub; default)",
    )
    corpus.add_argument(
        "--local-dir",
        type=Path,
        default=None,
        help=f"directory holding {', '.join(LOCAL_FILES.values())} (e.g. ../shared/data/wikitext-2)",
    )
    corpus.add_argument("--out", type=Path, required=True, help="output directory for {split}.txt and corpus.json")
    corpus.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the checks against the published checksums (local files) and line / word counts (both sources)",
    )
    corpus.set_defaults(func=_cmd_corpus)

    tokenizer = stages.add_parser(
        "tokenizer", help="train the byte-level BPE on the train split", description="Write tokenizer.json."
    )
    tokenizer.add_argument("--corpus", type=Path, required=True, help="corpus directory from `prepare corpus`")
    tokenizer.add_argument(
        "--vocab-size",
        type=_count_in(MIN_VOCAB_SIZE, MAX_VOCAB_SIZE),
        default=8192,
        help=f"vocabulary size including the special tokens ({MIN_VOCAB_SIZE}-{MAX_VOCAB_SIZE}; default 8192)",
    )
    tokenizer.add_argument("--out", type=Path, required=True, help="output tokenizer file (tokenizer.json)")
    tokenizer.set_defaults(func=_cmd_tokenizer, paths=_tokenizer_paths)

    shards = stages.add_parser(
        "shards",
        help="encode one split into Arrow IPC token blocks",
        description="Write shard-NNNNN.arrow files and manifest.json for one split.",
    )
    shards.add_argument("--corpus", type=Path, required=True, help="corpus directory from `prepare corpus`")
    shards.add_argument("--tokenizer", type=Path, required=True, help="tokenizer file from `prepare tokenizer`")
    shards.add_argument("--split", choices=SPLITS, required=True, help="which split to encode")
    shards.add_argument(
        "--seq-len",
        type=_count_in(1, MAX_SEQ_LEN),
        required=True,
        help=f"tokens per training sequence, 1-{MAX_SEQ_LEN} (each block stores seq-len + 1)",
    )
    shards.add_argument("--out", type=Path, required=True, help="output directory for the shards and manifest.json")
    shards.add_argument(
        "--rows-per-shard", type=positive_int, default=4096, help="blocks per Arrow file (default 4096)"
    )
    shards.set_defaults(func=_cmd_shards, paths=_shards_paths)
