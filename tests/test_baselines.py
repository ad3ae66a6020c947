"""The n-gram reference models (gtmoe.baselines) against brute-force counting on hand-made shards."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gtmoe import baselines
from gtmoe.data import (
    IGNORE_INDEX,
    LOCAL_FILES,
    DataError,
    TokenBlocks,
    count_words,
    encode_split,
    load_corpus,
    train_tokenizer,
    write_shards,
)

from helpers import run_module

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = REPO.parent / "shared/data/wikitext-2"
VOCAB = 7
SEQ_LEN = 4
# Hand-made streams. Token 6 never occurs in train (its unigram count is 0, only add-one gives it mass),
# and validation/test use 5 as a context, which train never does (5 is only ever the last train token).
STREAMS = {
    "train": [0, 1, 2, 3, 0, 1, 2, 4, 0, 1, 3, 2, 0, 1, 2, 3, 4, 0, 2, 1, 2, 3, 0, 1, 5],
    "validation": [0, 1, 2, 3, 0, 1, 2, 4, 5, 1, 0, 2, 3, 2, 6, 1],  # 16 tokens: the last block is padded
    "test": [1, 2, 3, 0, 1, 5, 2, 3, 4, 4, 0, 1, 2, 2, 6, 0, 3],
}
WORDS = {"train": 9, "validation": 5, "test": 7}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ngram")
    for split, stream in STREAMS.items():
        write_shards(
            np.array(stream, dtype=np.int32),
            root / split,
            SEQ_LEN,
            n_words=WORDS[split],
            rows_per_shard=2,
            meta={"vocab_size": VOCAB},
        )
    return root


# --------------------------------------------------------------------------- brute force


def brute_pairs(stream: list[int]) -> list[tuple[int, int]]:
    """Every (previous token, token) of the raw stream: each token after the first is a target once."""
    return [(stream[t - 1], stream[t]) for t in range(1, len(stream))]


def brute_model(lam: float, k: float = 1.0):
    """p(w | v) with Python dictionaries, straight from the definition."""
    pairs = brute_pairs(STREAMS["train"])
    unigram = Counter(w for _, w in pairs)
    bigram = Counter(pairs)
    context = Counter(v for v, _ in pairs)
    n = len(pairs)

    def p_unigram(w: int) -> float:
        return (unigram[w] + k) / (n + k * VOCAB)

    def p(w: int, v: int) -> float:
        if context[v] == 0:
            return p_unigram(w)
        return lam * bigram[(v, w)] / context[v] + (1 - lam) * p_unigram(w)

    return p_unigram, p


def brute_nll(split: str, lam: float) -> float:
    _, p = brute_model(lam)
    return sum(-math.log(p(w, v)) for v, w in brute_pairs(STREAMS[split]))


# --------------------------------------------------------------------------- tests


def test_pairs_are_exactly_the_targets_the_evaluation_scores(shards):
    for split, stream in STREAMS.items():
        blocks = TokenBlocks(shards / split)
        contexts, targets = baselines.target_pairs(blocks)
        assert list(zip(contexts.tolist(), targets.tolist())) == brute_pairs(stream)
        _, y = blocks.batch(np.arange(len(blocks)))  # how gtmoe.evaluate counts its tokens
        assert targets.size == int((y != IGNORE_INDEX).sum()) == len(stream) - 1


def test_perplexities_match_brute_force(shards):
    result = baselines.ngram_baselines(shards)
    assert set(result) >= {"models", "vocab_size", "shards"} and result["vocab_size"] == VOCAB
    lam = result["models"]["bigram"]["params"]["lambda"]
    assert result["models"]["unigram"]["params"] == {"k": 1.0}
    p_unigram, _ = brute_model(lam)
    for split in ("validation", "test"):
        pairs = brute_pairs(STREAMS[split])
        expected = {"unigram": sum(-math.log(p_unigram(w)) for _, w in pairs), "bigram": brute_nll(split, lam)}
        for model, total in expected.items():
            scored = result["models"][model][split]
            assert set(scored) == {"ppl", "word_ppl", "nll", "tokens", "words"}
            assert (scored["tokens"], scored["words"]) == (len(pairs), WORDS[split])
            assert scored["nll"] == pytest.approx(total / len(pairs), rel=1e-12)
            assert scored["ppl"] == pytest.approx(math.exp(total / len(pairs)), rel=1e-12)
            assert scored["word_ppl"] == pytest.approx(math.exp(total / WORDS[split]), rel=1e-12)


def test_lambda_is_the_validation_argmin(shards):
    lam = baselines.ngram_baselines(shards)["models"]["bigram"]["params"]["lambda"]
    grid = np.linspace(0.001, 0.999, 999)
    nll = np.array([brute_nll("validation", x) for x in grid])
    best = grid[nll.argmin()]
    assert abs(lam - best) <= 0.001 + 1e-9
    assert brute_nll("validation", lam) <= nll.min() + 1e-9
    assert 0 < lam < 1 and 0.05 < lam < 0.95  # an interior optimum on this data, not a bound


def test_probabilities_sum_to_one_over_the_vocabulary(shards):
    contexts, targets = baselines.target_pairs(TokenBlocks(shards / "train"))
    counts = baselines.NgramCounts(contexts, targets, VOCAB)
    words = np.arange(VOCAB)
    _, p = brute_model(0.7)
    for v in range(VOCAB):  # seen contexts and unseen ones (5, 6)
        ml, seen = counts.bigram_ml(np.full(VOCAB, v), words)
        probs = baselines.interpolate(0.7, ml, seen, counts.unigram_prob(words, baselines.ADD_K))
        assert probs.sum() == pytest.approx(1.0, abs=1e-12)
        assert (probs > 0).all()
        assert probs.tolist() == pytest.approx([p(w, v) for w in words], rel=1e-12)
    assert counts.unigram_prob(words, baselines.ADD_K).sum() == pytest.approx(1.0, abs=1e-12)


def test_missing_vocab_size_is_an_error_naming_the_file(tmp_path):
    for split, stream in STREAMS.items():
        write_shards(np.array(stream, dtype=np.int32), tmp_path / split, SEQ_LEN, n_words=1)
    with pytest.raises(DataError, match=r"train/manifest.json has no 'vocab_size'"):
        baselines.ngram_baselines(tmp_path)


def test_cli_writes_the_json(shards, tmp_path):
    out = tmp_path / "baselines" / "ngram.json"
    done = run_module("gtmoe", "baselines", "--shards", shards, "--out", out, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(baselines.ngram_baselines(shards)))
    assert set(result["models"]) == {"unigram", "bigram"} and result["shards"] == str(shards)
    assert "bigram" in done.stderr and "test ppl" in done.stderr
    missing = run_module("gtmoe", "baselines", "--shards", tmp_path / "none", "--out", out, timeout=120)
    assert missing.returncode == 2 and "manifest.json not found" in missing.stderr


@pytest.mark.skipif(
    not all((REAL_DIR / name).is_file() for name in LOCAL_FILES.values()),
    reason=f"real WikiText-2 copy not found at {REAL_DIR}",
)
def test_wikitext2_bigram_with_the_study_tokenizer(tmp_path):
    """The default study's data (4,096 BPE, 64-token blocks): the bigram reaches a test token PPL of
    about 89 (4.49 nats) and a word PPL of about 550, as issue 10 measured independently."""
    corpus = load_corpus(REAL_DIR, source="local")
    tokenizer = train_tokenizer(corpus["train"], 4096, tmp_path / "tokenizer.json")
    for split, lines in corpus.items():
        write_shards(
            encode_split(tokenizer, lines),
            tmp_path / "shards" / split,
            64,
            n_words=count_words(lines),
            meta={"vocab_size": tokenizer.get_vocab_size()},
        )
    result = baselines.ngram_baselines(tmp_path / "shards")
    bigram, unigram = result["models"]["bigram"], result["models"]["unigram"]
    assert bigram["test"]["ppl"] == pytest.approx(89.3, abs=1.0)
    assert bigram["test"]["nll"] == pytest.approx(4.49, abs=0.01)
    assert bigram["test"]["word_ppl"] == pytest.approx(554, rel=0.02)
    assert 0.8 < bigram["params"]["lambda"] < 0.95
    assert unigram["test"]["ppl"] > 5 * bigram["test"]["ppl"]
    assert bigram["test"]["words"] == 245_569  # the published WikiText-2 test word count
