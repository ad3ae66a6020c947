"""The ``tokenizer`` stage: the byte-level BPE (train on the train split, load, check) and the encoding of a
split into one token stream with ``<|endoftext|>`` between articles."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gtmoe.data.errors import DataError
from gtmoe.data.files import _atomic_path
from gtmoe.files import remove_stale_temporaries

UNK, EOT = "<unk>", "<|endoftext|>"
SPECIAL_TOKENS = (UNK, EOT)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte must stay encodable
_ENCODE_LINES = 16384  # lines per tokenizer batch when encoding a split

# An article title is " = Title = "; section headings are " = = Sub = = " and deeper.
_TITLE = re.compile(r" = [^=].* = ")


def _training_pieces(lines: Sequence[str]) -> Iterator[str]:
    """Yield the text pieces :func:`encode_split` will pre-tokenise, so BPE learns merges on exactly those.

    Each line is encoded with its newline, and the tokenizer cuts special tokens out of the text
    before pre-tokenising; training sees the raw text, so the literal ``<unk>`` is removed here to
    keep the ~55k occurrences in the train split from spending merges on "<", "unk", ">".
    """
    for line in lines:
        for piece in (line + "\n").split(UNK):
            if piece:
                yield piece


def train_tokenizer(train_lines: Sequence[str], vocab_size: int, out_path: str | Path) -> Tokenizer:
    """Train a byte-level BPE on the train split with ``<unk>`` and ``<|endoftext|>`` as special tokens.

    Saves ``tokenizer.json`` atomically to ``out_path`` and returns the tokenizer.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: every WikiText line already starts with one.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_pieces(train_lines), trainer=trainer)
    out_path = Path(out_path)
    if out_path.parent.is_dir():
        remove_stale_temporaries(out_path.parent, out_path.name)
    with _atomic_path(out_path) as tmp:
        try:
            tokenizer.save(str(tmp))
        except Exception as exc:  # the tokenizers library raises its own error type for a failed write
            if isinstance(exc, OSError):
                raise
            raise OSError(f"{exc}".strip().splitlines()[0] if f"{exc}".strip() else type(exc).__name__) from None
    return tokenizer


def _load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved at ``path``; a DataError naming the file and how to rebuild it if it is unusable."""
    path = Path(path)
    rebuild = (
        f"delete it (`rm {path}`) and rerun snakemake, which rebuilds it and then everything built from "
        f"it (shards, runs); or `python -m gtmoe prepare tokenizer --corpus DIR --out {path}`"
    )
    if path.is_dir():
        raise DataError(
            f"{path} is a directory, not a tokenizer file; remove it (`rm -r {path}`) and rerun "
            "snakemake, or pass the tokenizer.json file"
        )
    if not path.is_file():
        raise DataError(f"{path} not found; build it with `python -m gtmoe prepare tokenizer --out {path}`")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # OSError, or the tokenizers library's own error for a corrupt file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"tokenizer {path} is unreadable or corrupt ({reason}); {rebuild}") from None
    if tokenizer.token_to_id(EOT) is None:
        raise DataError(f"tokenizer {path} has no {EOT} token (not written by gtmoe, or damaged); {rebuild}")
    return tokenizer


def tokenizer_problem(path: str | Path) -> str | None:
    """Why an existing tokenizer file is unusable (None if it is fine or absent: absent ones get built).

    Checked when Snakemake parses the workflow: a corrupt tokenizer newer than the shards would
    otherwise make Snakemake delete the good shards first, then fail to rebuild them.
    """
    if not Path(path).exists():
        return None
    try:
        _load_tokenizer(path)
    except DataError as exc:
        return str(exc)
    return None


def _article_starts(lines: Sequence[str]) -> set[int]:
    """Indices of article title lines that follow earlier text: where an end-of-text token belongs.

    A title is " = Title = " between blank lines; the blank-neighbour test rejects table rows
    like " = Goals ; A = " that match the pattern but sit inside an article. On the real splits
    this finds 600 / 60 / 60 articles.
    """

    def blank(i: int) -> bool:
        return not (0 <= i < len(lines)) or not lines[i].strip()

    starts, seen_text = set(), False
    for i, line in enumerate(lines):
        if seen_text and _TITLE.fullmatch(line) and blank(i - 1) and blank(i + 1):
            starts.add(i)
        seen_text = seen_text or bool(line.strip())
    return starts


def encode_split(tokenizer: Tokenizer, lines: Sequence[str]) -> np.ndarray:
    """Encode a split into one contiguous int32 token stream.

    Every line is encoded with its newline, and ``<|endoftext|>`` precedes each article title
    except the first, so the model sees document boundaries. Lines are encoded in batches of
    ``_ENCODE_LINES``, so memory beyond the result stays small (WikiText-103's train split is
    ~120M tokens: a 0.5 GB int32 array, but ~4 GB as a Python list, more as Encoding objects).
    """
    eot_id = tokenizer.token_to_id(EOT)
    if eot_id is None:
        raise DataError(f"the tokenizer has no {EOT} token; rebuild it with `python -m gtmoe prepare tokenizer`")
    starts = _article_starts(lines)
    pieces: list[np.ndarray] = []
    for lo in range(0, len(lines), _ENCODE_LINES):
        batch = [line + "\n" for line in lines[lo : lo + _ENCODE_LINES]]
        ids: list[int] = []
        # encode_batch_fast: the same ids as encode_batch, without computing character offsets.
        for i, encoding in enumerate(tokenizer.encode_batch_fast(batch, add_special_tokens=False), start=lo):
            if i in starts:
                ids.append(eot_id)
            ids.extend(encoding.ids)
        pieces.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
