"""WikiText data path: corpus -> byte-level BPE tokenizer -> Arrow IPC token shards -> batches.

Three stages, each a ``python -m gtmoe prepare ...`` subcommand (:mod:`gtmoe.data.cli`) whose outputs are
written atomically (temp name, then ``os.replace``, :mod:`gtmoe.files`), so an interrupted run never
leaves a file that looks complete:

- ``corpus`` (:mod:`gtmoe.data.corpus`): the three splits of WikiText-2 or WikiText-103 (:data:`CORPORA`),
  from the verified local copy or the Hugging Face hub, as ``{split}.txt`` plus ``corpus.json``.
- ``tokenizer`` (:mod:`gtmoe.data.tokenizer`): a byte-level BPE trained on the train split only, saved as
  ``tokenizer.json``; it also encodes a split into one token stream.
- ``shards`` (:mod:`gtmoe.data.shards`): that stream cut into fixed-length blocks in Arrow IPC files plus
  ``manifest.json``; :class:`TokenBlocks` reads them memory-mapped.

Every user-fixable problem is a :class:`DataError` (:mod:`gtmoe.data.errors`). This package re-exports
the public names of its modules, so ``from gtmoe.data import X`` works for each of them.
"""

from gtmoe.data.cli import add_prepare_parser
from gtmoe.data.corpus import (
    CORPORA,
    CORPUS_META,
    DEFAULT_CORPUS,
    HUB_CONFIG,
    HUB_ID,
    LOCAL_FILES,
    LOCAL_SHA256,
    SPLITS,
    CorpusSpec,
    check_published_counts,
    corpus_spec,
    count_words,
    load_corpus,
    read_corpus_split,
    write_corpus,
)
from gtmoe.data.errors import DataError
from gtmoe.data.shards import IGNORE_INDEX, MANIFEST, N_VALID_COLUMN, TOKENS_COLUMN, TokenBlocks, write_shards
from gtmoe.data.tokenizer import (
    EOT,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    UNK,
    encode_split,
    tokenizer_problem,
    train_tokenizer,
)

# Reached as data.Tokenizer and data._article_starts by tests/test_data.py.
from gtmoe.data.tokenizer import Tokenizer as Tokenizer
from gtmoe.data.tokenizer import _article_starts as _article_starts

__all__ = [
    "CORPORA",
    "CORPUS_META",
    "DEFAULT_CORPUS",
    "EOT",
    "HUB_CONFIG",
    "HUB_ID",
    "IGNORE_INDEX",
    "LOCAL_FILES",
    "LOCAL_SHA256",
    "MANIFEST",
    "MIN_VOCAB_SIZE",
    "N_VALID_COLUMN",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TOKENS_COLUMN",
    "UNK",
    "CorpusSpec",
    "DataError",
    "TokenBlocks",
    "add_prepare_parser",
    "check_published_counts",
    "corpus_spec",
    "count_words",
    "encode_split",
    "load_corpus",
    "read_corpus_split",
    "tokenizer_problem",
    "train_tokenizer",
    "write_corpus",
    "write_shards",
]
