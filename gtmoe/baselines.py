"""Reference n-gram language models over the study's BPE tokens: what a trained MoE must beat.

Both models are counted on the train shards only and scored on exactly the target tokens the
neural evaluation scores: every ``(input, target)`` pair of :meth:`TokenBlocks.batch` whose
target is not padding, so each real token after a split's first is scored once, with the token
before it as context (block boundaries included: consecutive blocks share one token).

- unigram, add-one (Laplace) smoothed: ``p(w) = (c(w) + k) / (N + k V)`` with ``k = 1`` fixed.
- interpolated bigram: ``p(w | v) = lam · c(v, w) / c(v) + (1 − lam) · p_unigram(w)``; a
  context never seen in training has no maximum-likelihood estimate and gets ``p_unigram(w)``.
  ``lam`` is tuned on validation.

``lam`` minimises the validation NLL with ``scipy.optimize.minimize_scalar`` (bounded; the NLL
is convex in ``lam``). Token perplexity is ``exp(total NLL / tokens)``, word perplexity
``exp(total NLL / words)`` with the split's word count, as in :mod:`gtmoe.evaluate`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from gtmoe import metrics
from gtmoe.data.errors import DataError
from gtmoe.data.shards import IGNORE_INDEX, TokenBlocks
from gtmoe.files import remove_stale_temporaries, write_atomic

log = logging.getLogger(__name__)

EVAL_SPLITS = ("validation", "test")
BLOCKS_PER_CHUNK = 65_536  # bounds the int64 batch copies on large corpora: ~35 MB per chunk at seq_len 64
# Add-one keeps the NLL finite for the ~150 byte tokens the train split never uses. It is fixed, not
# tuned: on WikiText-2 the validation NLL falls monotonically as k -> 0 (every validation token was
# seen in training), so tuning only runs into its lower bound; k = 1 costs 0.01% of unigram PPL.
ADD_K = 1.0
# lam stays strictly inside (0, 1) so that every token keeps unigram mass and the NLL stays finite.
LAMBDA_BOUNDS = (1e-4, 1 - 1e-4)
TUNING_XATOL = 1e-5


def target_pairs(blocks: TokenBlocks) -> tuple[np.ndarray, np.ndarray]:
    """``(context, target)`` token ids of every real target of a split, as int32 arrays.

    The same positions the neural evaluation scores: targets marked ``IGNORE_INDEX`` (padding of
    the last block) are dropped, and the context of target j is input j of the same block.
    """
    contexts, targets = [], []
    for start in range(0, len(blocks), BLOCKS_PER_CHUNK):
        x, y = blocks.batch(np.arange(start, min(start + BLOCKS_PER_CHUNK, len(blocks))))
        x, y = x.numpy().reshape(-1), y.numpy().reshape(-1)
        real = y != IGNORE_INDEX
        # int32 halves the memory of a large split (~120M tokens for WikiText-103); ids are < vocab_size.
        contexts.append(x[real].astype(np.int32))
        targets.append(y[real].astype(np.int32))
    return np.concatenate(contexts), np.concatenate(targets)


class NgramCounts:
    """Unigram and bigram counts of a train split (bigrams stored sparsely, keyed ``v · V + w``)."""

    def __init__(self, contexts: np.ndarray, targets: np.ndarray, vocab_size: int):
        self.vocab_size = vocab_size
        self.unigram = np.bincount(targets, minlength=vocab_size).astype(np.float64)
        self.context = np.bincount(contexts, minlength=vocab_size).astype(np.float64)
        # np.unique instead of a dense V x V bincount: V^2 cells would not fit for a large vocabulary.
        self.bigram_keys, counts = np.unique(self.keys(contexts, targets), return_counts=True)
        self.bigram = counts.astype(np.float64)
        self.tokens = int(targets.size)

    def keys(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``v · V + w`` in int64 (V^2 overflows int32 above V = 46,340)."""
        return contexts.astype(np.int64) * self.vocab_size + targets

    def bigram_count(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """c(v, w) for each pair (0 for pairs never seen in training)."""
        keys = self.keys(contexts, targets)
        index = np.searchsorted(self.bigram_keys, keys)
        index = np.minimum(index, len(self.bigram_keys) - 1)
        return np.where(self.bigram_keys[index] == keys, self.bigram[index], 0.0)

    def unigram_prob(self, targets: np.ndarray, k: float) -> np.ndarray:
        """Add-k unigram probability of each target."""
        return (self.unigram[targets] + k) / (self.tokens + k * self.vocab_size)

    def bigram_ml(self, contexts: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Maximum-likelihood ``c(v, w) / c(v)`` per pair, and whether the context was seen at all."""
        context = self.context[contexts]
        seen = context > 0
        ml = np.divide(self.bigram_count(contexts, targets), context, out=np.zeros_like(context), where=seen)
        return ml, seen


def interpolate(lam: float, ml: np.ndarray, seen: np.ndarray, unigram: np.ndarray) -> np.ndarray:
    """``lam · p_ML + (1 − lam) · p_unigram`` where the context was seen, else ``p_unigram``."""
    return np.where(seen, lam * ml + (1 - lam) * unigram, unigram)


def split_result(nll_sum: float, tokens: int, words: int) -> dict:
    return {
        "ppl": metrics.perplexity(nll_sum, tokens),
        "word_ppl": metrics.perplexity(nll_sum, words),
        "nll": nll_sum / tokens,
        "tokens": tokens,
        "words": words,
    }


def _open(shard_dir: Path, split: str) -> TokenBlocks:
    blocks = TokenBlocks(shard_dir / split)
    if "vocab_size" not in blocks.manifest:
        raise DataError(
            f"{shard_dir / split / 'manifest.json'} has no 'vocab_size'; rebuild the shards with "
            "`python -m gtmoe prepare shards` (it records the tokenizer's vocabulary size)"
        )
    return blocks


def ngram_baselines(shard_dir: str | Path) -> dict:
    """Count both models on ``{shard_dir}/train``, tune ``lam`` on validation, score validation and test."""
    shard_dir = Path(shard_dir)
    train = _open(shard_dir, "train")
    vocab_size = int(train.manifest["vocab_size"])
    splits = {split: _open(shard_dir, split) for split in EVAL_SPLITS}
    for split, blocks in splits.items():
        if blocks.manifest["vocab_size"] != vocab_size:
            raise DataError(
                f"{shard_dir / split} has vocab_size {blocks.manifest['vocab_size']}, train has "
                f"{vocab_size}: the splits come from different tokenizers; rebuild the shards"
            )
    pairs = {"train": target_pairs(train), **{split: target_pairs(b) for split, b in splits.items()}}
    for split, (contexts, targets) in pairs.items():
        if max(contexts.max(), targets.max()) >= vocab_size:
            raise DataError(f"{shard_dir / split} holds token ids >= its vocab_size {vocab_size}; rebuild the shards")
    counts = NgramCounts(*pairs["train"], vocab_size)

    # Per-token pieces of the bigram probability; only lam changes while tuning.
    pieces = {
        split: (*counts.bigram_ml(*pairs[split]), counts.unigram_prob(pairs[split][1], ADD_K)) for split in EVAL_SPLITS
    }

    def bigram_nll(split: str, lam: float) -> float:
        return float(-np.log(interpolate(lam, *pieces[split])).sum())

    found = minimize_scalar(
        lambda lam: bigram_nll("validation", lam),
        bounds=LAMBDA_BOUNDS,
        method="bounded",
        options={"xatol": TUNING_XATOL},
    )
    if not found.success:
        raise RuntimeError(f"tuning the bigram's lambda did not converge: {found.message}")
    lam = float(found.x)

    unigram, bigram = {"params": {"k": ADD_K}}, {"params": {"lambda": lam, "k": ADD_K}}
    for split, blocks in splits.items():
        tokens = int(pairs[split][1].size)
        unigram_nll = float(-np.log(pieces[split][2]).sum())
        unigram[split] = split_result(unigram_nll, tokens, blocks.n_words)
        bigram[split] = split_result(bigram_nll(split, lam), tokens, blocks.n_words)
    return {
        "models": {"unigram": unigram, "bigram": bigram},
        "vocab_size": vocab_size,
        "shards": str(shard_dir),
        "train_tokens": counts.tokens,
    }


def write_ngram_baselines(shard_dir: str | Path, out: str | Path) -> dict:
    """Compute :func:`ngram_baselines` and write it as JSON (atomically)."""
    start = time.perf_counter()
    result = ngram_baselines(shard_dir)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out.parent, out.name)
        write_atomic(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    except OSError as exc:
        raise DataError(
            f"cannot write the n-gram baselines {out} ({exc.strerror or exc}); free space or fix the "
            "permissions there (or pass another --out) and rerun"
        ) from None
    for name, model in result["models"].items():
        log.info(
            "%s %s: test ppl %.2f, word ppl %.1f; validation ppl %.2f",
            name,
            json.dumps(model["params"]),
            model["test"]["ppl"],
            model["test"]["word_ppl"],
            model["validation"]["ppl"],
        )
    log.info("n-gram baselines -> %s in %.1fs", out, time.perf_counter() - start)
    return result
