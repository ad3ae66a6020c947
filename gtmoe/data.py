"""WikiText data pipeline: corpus -> byte-level BPE tokenizer -> Arrow IPC token shards -> batches.

Three stages, each a ``python -m gtmoe prepare ...`` subcommand whose outputs are written atomically
(temp name, then ``os.replace``), so an interrupted run never leaves a file that looks complete:

- ``corpus``: the three splits of WikiText-2 or WikiText-103 (:data:`CORPORA`), from the verified
  local copy or the Hugging Face hub, as ``{split}.txt`` plus ``corpus.json`` (counts and checksums).
- ``tokenizer``: a byte-level BPE trained on the train split only, saved as ``tokenizer.json``.
- ``shards``: one split encoded into a contiguous token stream, cut into fixed-length blocks in
  Arrow IPC files plus ``manifest.json``; :class:`TokenBlocks` reads them memory-mapped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LOCAL_FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HUB_ID, HUB_CONFIG = "Salesforce/wikitext", "wikitext-2-v1"
# Published checksums of the local files (../shared/data/SOURCES.md).
LOCAL_SHA256 = {
    "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "validation": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}


@dataclass(frozen=True)
class CorpusSpec:
    """One WikiText release (the tokenized "-v1" files): where it comes from and what it must contain.

    ``checksums`` maps split -> (hashlib algorithm, published hex digest) of the original local file;
    ``lines`` and ``words`` (:func:`count_words`) are the published sizes, which hold for both sources.
    """

    name: str
    hub_config: str
    local_files: dict[str, str]
    checksums: dict[str, tuple[str, str]]
    checksums_from: str
    lines: dict[str, int]
    words: dict[str, int]


CORPORA = {
    "wikitext-2": CorpusSpec(
        name="wikitext-2",
        hub_config=HUB_CONFIG,
        local_files=LOCAL_FILES,
        checksums={split: ("sha256", digest) for split, digest in LOCAL_SHA256.items()},
        checksums_from="../shared/data/SOURCES.md",
        lines={"train": 36_718, "validation": 3_760, "test": 4_358},
        words={"train": 2_088_628, "validation": 217_646, "test": 245_569},
    ),
    # No per-file sha256 of WikiText-103 is published anywhere we could find (the `datasets`
    # dataset_infos.json has only the zip's: 242ba0f2...539590). GluonNLP publishes per-file SHA-1
    # (dmlc/gluon-nlp src/gluonnlp/data/corpora/wikitext.py); its WikiText-2 SHA-1s match the files
    # whose sha256 SOURCES.md lists, so we verify those. corpus.json records the sha256 we compute.
    # Counts: Merity et al. 2016, Table 1 (words); lines = the hub's num_examples.
    "wikitext-103": CorpusSpec(
        name="wikitext-103",
        hub_config="wikitext-103-v1",
        local_files=LOCAL_FILES,
        checksums={
            "train": ("sha1", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
            "validation": ("sha1", "c326ac59dc587676d58c422eb8a03e119582f92b"),
            "test": ("sha1", "8a5befc548865cec54ed4273cf87dbbad60d1e47"),
        },
        checksums_from="GluonNLP (dmlc/gluon-nlp, src/gluonnlp/data/corpora/wikitext.py)",
        lines={"train": 1_801_350, "validation": 3_760, "test": 4_358},
        words={"train": 103_227_021, "validation": 217_646, "test": 245_569},
    ),
}
DEFAULT_CORPUS = "wikitext-2"

UNK, EOT = "<unk>", "<|endoftext|>"
SPECIAL_TOKENS = (UNK, EOT)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte must stay encodable
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
_WRITE_LINES = 65536  # lines per slice when writing a split's text
_ENCODE_LINES = 16384  # lines per tokenizer batch when encoding a split

CORPUS_META = "corpus.json"
MANIFEST = "manifest.json"
TOKENS_COLUMN, N_VALID_COLUMN = "tokens", "n_valid"

# An article title is " = Title = "; section headings are " = = Sub = = " and deeper.
_TITLE = re.compile(r" = [^=].* = ")


class DataError(RuntimeError):
    """A data problem the user can fix; the message names the file or key and how to rebuild it."""


# --------------------------------------------------------------------------- helpers


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cannot_write(path: Path, exc: OSError) -> DataError:
    return DataError(f"cannot write {path} ({exc.strerror or exc}); free space or fix the permissions there "
                     "(or pass another --out) and rerun")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while the block writes ``path`` (full disk, permissions) into a DataError naming it."""
    try:
        yield
    except OSError as exc:
        raise _cannot_write(path, exc) from None


def _clear_temporaries(directory: Path, *names: str) -> None:
    """Remove the temporaries ``.{name}.tmp-PID`` of a process killed mid-write (``name`` may hold ``*``)."""
    for name in names:
        for stale in directory.glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and move it into place only if the block succeeds.

    A failed write (disk full, permissions) is a DataError naming ``path``.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with _writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _split_lines(text: str) -> list[str]:
    """Lines of ``text`` without their newlines (``str.splitlines`` would also split on \\x0b, \\x1c, ...)."""
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line opens no new line
        lines.pop()
    return lines


def _as_hub_row(line: str) -> str:
    """Normalise a line to the row the hub serves, minus its newline.

    The hub's loader kept non-blank lines verbatim and turned whitespace-only lines (" " in the files)
    into "", so both sources yield identical corpora and therefore identical tokens.
    """
    line = line.removesuffix("\n")
    return line if line.strip() else ""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


# --------------------------------------------------------------------------- corpus


def corpus_spec(name: str) -> CorpusSpec:
    """The :class:`CorpusSpec` called ``name`` (a key of :data:`CORPORA`)."""
    try:
        return CORPORA[name]
    except KeyError:
        raise DataError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}") from None


def _load_local(local_dir: Path, verify: bool, spec: CorpusSpec) -> tuple[dict, dict, dict]:
    corpus, origins, provenance = {}, {}, {}
    for split in SPLITS:
        path = local_dir / spec.local_files[split]
        if not path.is_file():
            raise DataError(
                f"{path} not found: {local_dir} must hold the {spec.name} files "
                f"{', '.join(spec.local_files.values())} (see README, Data)"
            )
        data = path.read_bytes()
        algorithm, published = spec.checksums[split]
        if verify and (actual := hashlib.new(algorithm, data).hexdigest()) != published:
            raise DataError(
                f"{path}: {algorithm} {actual} does not match the published {published} of {spec.name} "
                f"({spec.checksums_from}); restore the original file, or pass --no-verify "
                "(verify=False) to use a modified copy on purpose"
            )
        # The original file's sha256, recorded in corpus.json (the written {split}.txt differs from it:
        # blank lines " " become ""); for WikiText-103 it is the only sha256 there is.
        provenance[split] = {"local_sha256": hashlib.sha256(data).hexdigest()}
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}); restore the original file") from exc
        del data  # WikiText-103's train split is ~540 MB: hold the bytes and the text only briefly
        corpus[split] = [_as_hub_row(line) for line in _split_lines(text)]
        origins[split] = f"local:{path.resolve()}"
    return corpus, origins, provenance


def _load_hub(spec: CorpusSpec) -> tuple[dict, dict, dict]:
    import datasets  # slow to import and only needed on this path

    try:
        dataset = datasets.load_dataset(HUB_ID, spec.hub_config)
    except Exception as exc:  # offline, DNS, auth, cache and not-found all surface as different types
        raise DataError(f"could not load the hub dataset {HUB_ID} ({spec.hub_config}): {exc}") from exc
    corpus, origins = {}, {}
    for split in SPLITS:
        try:
            rows = dataset[split]["text"]
        except KeyError as exc:
            raise DataError(f"the hub dataset {HUB_ID} ({spec.hub_config}) has no {split!r} split") from exc
        corpus[split] = [_as_hub_row(row) for row in rows]
        origins[split] = f"hub:{HUB_ID}/{spec.hub_config}:{split}"
    return corpus, origins, {split: {} for split in SPLITS}


def _load_corpus_with_origins(
    local_dir: str | Path | None, source: str, verify: bool, corpus_name: str = DEFAULT_CORPUS
) -> tuple[dict[str, list[str]], dict[str, str], dict[str, dict]]:
    """Like :func:`load_corpus`, also returning where each split came from and the local file's sha256."""
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', not {source!r}")
    spec = corpus_spec(corpus_name)
    local = Path(local_dir) if local_dir is not None else None
    has_local = local is not None and all((local / name).is_file() for name in spec.local_files.values())

    if source == "local":
        if local is None:
            raise DataError(f"source='local' needs a local directory (--local-dir) holding the {spec.name} files")
        corpus, origins, provenance = _load_local(local, verify, spec)
    elif source == "auto" and has_local:
        corpus, origins, provenance = _load_local(local, verify, spec)
    else:
        try:
            corpus, origins, provenance = _load_hub(spec)
        except DataError as exc:
            if source == "hub":
                raise
            tried = f"the local directory {local}" if local is not None else "no local directory (none given)"
            raise DataError(
                f"no {spec.name} source available: tried {tried} (needs {', '.join(spec.local_files.values())}) "
                f"and the hub dataset {HUB_ID} ({spec.hub_config}), which failed: {exc.__cause__ or exc}. "
                f"Point --local-dir at ../shared/data/{spec.name} or make the hub reachable."
            ) from exc

    for split in SPLITS:
        if not any(line.strip() for line in corpus[split]):
            raise DataError(f"split {split!r} from {origins[split]} is empty (no non-blank lines)")
    return corpus, origins, provenance


def load_corpus(
    local_dir: str | Path | None, source: str = "auto", *, verify: bool = True, corpus: str = DEFAULT_CORPUS
) -> dict[str, list[str]]:
    """Load a WikiText release (``corpus``, a key of :data:`CORPORA`) as ``split -> lines``.

    Each line comes without its newline (the rows the hub serves). ``source``: "auto" (local files
    when ``local_dir`` has all three, else the hub), "local" or "hub". Local files are checked
    against the published checksums unless ``verify=False``.
    """
    return _load_corpus_with_origins(local_dir, source, verify, corpus)[0]


def check_published_counts(corpus: dict[str, Sequence[str]], spec: CorpusSpec, origins: dict[str, str]) -> None:
    """Raise :class:`DataError` unless every split has the published line and word counts of ``spec``.

    The local checksums already pin the files; this also covers the hub, which has none.
    """
    for split in SPLITS:
        lines, words = len(corpus[split]), count_words(corpus[split])
        if (lines, words) != (spec.lines[split], spec.words[split]):
            raise DataError(
                f"split {split!r} from {origins[split]} has {lines:,} lines / {words:,} words, but the published "
                f"{spec.name} {split} split has {spec.lines[split]:,} / {spec.words[split]:,}; the source is "
                "incomplete or a different release (pass --no-verify to use it anyway)"
            )


def count_words(lines: Sequence[str]) -> int:
    """Whitespace-separated words plus one end-of-line per line: the published WikiText word counts."""
    return sum(len(line.split()) for line in lines) + len(lines)


def write_corpus(
    corpus: dict[str, list[str]],
    out_dir: str | Path,
    *,
    sources: dict[str, str] | None = None,
    extra: dict[str, dict] | None = None,
) -> dict:
    """Write ``{out_dir}/{split}.txt`` (one newline-terminated line per row) and ``corpus.json``.

    ``corpus.json`` holds, per split, lines, words, bytes, sha256 of the written file, its source and
    the fields of ``extra[split]``; it is written last, so its presence marks a complete corpus.
    Returns its content.
    """
    out = Path(out_dir)
    with _writing(out / CORPUS_META):
        (out / CORPUS_META).unlink(missing_ok=True)
        if out.is_dir():
            _clear_temporaries(out, CORPUS_META, *(f"{split}.txt" for split in SPLITS))
    summary = {}
    for split in SPLITS:
        lines = corpus.get(split)
        if not lines:
            raise DataError(f"split {split!r} is missing or empty; nothing to write to {out / f'{split}.txt'}")
        if any("\n" in line for line in lines):
            raise ValueError(f"split {split!r}: lines must not contain newlines")
        digest, n_bytes = hashlib.sha256(), 0
        with _atomic_path(out / f"{split}.txt") as tmp:
            with open(tmp, "wb") as f:
                # In slices, so WikiText-103's ~540 MB train split is never one more string in memory.
                for lo in range(0, len(lines), _WRITE_LINES):
                    data = "".join(line + "\n" for line in lines[lo : lo + _WRITE_LINES]).encode("utf-8")
                    f.write(data)
                    digest.update(data)
                    n_bytes += len(data)
        summary[split] = {
            "lines": len(lines),
            "words": count_words(lines),
            "bytes": n_bytes,
            "sha256": digest.hexdigest(),
            "source": (sources or {}).get(split, "unspecified"),
            **(extra or {}).get(split, {}),
        }
    _write_json(out / CORPUS_META, summary)
    return summary


def read_corpus_split(corpus_dir: str | Path, split: str) -> list[str]:
    """Lines of one split of a corpus written by :func:`write_corpus`, verified against ``corpus.json``."""
    _check_split(split)
    corpus_dir = Path(corpus_dir)
    rebuild = f"rerun `python -m gtmoe prepare corpus --out {corpus_dir}`"
    meta_path = corpus_dir / CORPUS_META
    if not meta_path.is_file():
        raise DataError(f"{meta_path} not found: {corpus_dir} is not a complete corpus; {rebuild}")
    entry = json.loads(meta_path.read_text()).get(split)
    if entry is None:
        raise DataError(f"{meta_path} has no entry for split {split!r}; {rebuild}")
    path = corpus_dir / f"{split}.txt"
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path} not found; {rebuild}") from exc
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{path} does not match its sha256 in {meta_path} (modified or partly written); {rebuild}")
    text = data.decode("utf-8")
    del data  # never the bytes, the text and the lines of a large split at once
    return _split_lines(text)


# --------------------------------------------------------------------------- tokenizer


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
        _clear_temporaries(out_path.parent, out_path.name)
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
    rebuild = (f"delete it (`rm {path}`) and rerun snakemake, which rebuilds it and then everything built from "
               f"it (shards, runs); or `python -m gtmoe prepare tokenizer --corpus DIR --out {path}`")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a tokenizer file; remove it (`rm -r {path}`) and rerun "
                        "snakemake, or pass the tokenizer.json file")
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


# --------------------------------------------------------------------------- shards


def _shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema([
        pa.field(TOKENS_COLUMN, pa.list_(pa.int32(), seq_len + 1), nullable=False),
        pa.field(N_VALID_COLUMN, pa.int32(), nullable=False),
    ])


def write_shards(
    tokens: np.ndarray,
    out_dir: str | Path,
    seq_len: int,
    *,
    n_words: int,
    rows_per_shard: int = 4096,
    meta: dict | None = None,
) -> dict:
    """Cut a token stream into blocks of ``seq_len + 1`` tokens and write them as Arrow IPC files.

    Block i holds ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (inputs ``row[:-1]``, targets
    ``row[1:]``), so consecutive blocks share one token and every token after the first is a target
    exactly once. The last block is zero-padded; ``n_valid`` says how many of its tokens are real.
    ``manifest.json`` (written last) records the sizes, checksums and ``meta``. Returns the manifest.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    if seq_len < 1 or rows_per_shard < 1:
        raise ValueError(f"seq_len and rows_per_shard must be positive, got {seq_len} and {rows_per_shard}")
    n_tokens = len(tokens)
    if n_tokens < 2:
        raise DataError(f"a split of {n_tokens} token(s) has no targets; nothing to write to {out_dir}")
    out = Path(out_dir)
    with _writing(out / MANIFEST):
        out.mkdir(parents=True, exist_ok=True)
        # Readers trust the manifest; drop it first so a crash below leaves no stale one behind.
        (out / MANIFEST).unlink(missing_ok=True)
        _clear_temporaries(out, MANIFEST, "shard-*.arrow")

    width = seq_len + 1
    n_blocks = -(-(n_tokens - 1) // seq_len)
    n_valid = np.minimum(n_tokens - np.arange(n_blocks, dtype=np.int64) * seq_len, width).astype(np.int32)

    schema = _shard_schema(seq_len)
    shards = []
    for index, lo in enumerate(range(0, n_blocks, rows_per_shard)):
        hi = min(lo + rows_per_shard, n_blocks)
        # This shard's tokens, zero-padded only where the stream ends (no padded copy of the whole split).
        span = np.zeros((hi - lo) * seq_len + 1, dtype=np.int32)
        piece = tokens[lo * seq_len : hi * seq_len + 1]
        span[: len(piece)] = piece
        blocks = np.lib.stride_tricks.sliding_window_view(span, width)[::seq_len]  # a view, no copy
        flat = pa.array(np.ascontiguousarray(blocks).reshape(-1))
        batch = pa.record_batch(
            [pa.FixedSizeListArray.from_arrays(flat, width), pa.array(n_valid[lo:hi])], schema=schema
        )
        path = out / f"shard-{index:05d}.arrow"
        with _atomic_path(path) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                writer.write_batch(batch)
            shards.append({"name": path.name, "rows": hi - lo, "bytes": tmp.stat().st_size, "sha256": _sha256_file(tmp)})

    # Shards left by an earlier, longer run would never be read but would confuse anyone listing the folder.
    current = {shard["name"] for shard in shards}
    for stale in out.glob("shard-*.arrow"):
        if stale.name not in current:
            stale.unlink()

    manifest = {
        "seq_len": seq_len,
        "n_tokens": n_tokens,
        "n_words": n_words,
        "n_blocks": n_blocks,
        "n_full_blocks": int(np.count_nonzero(n_valid == width)),
        "rows_per_shard": rows_per_shard,
    }
    if clash := set(meta or {}) & set(manifest):
        raise ValueError(f"meta must not override computed manifest keys: {sorted(clash)}")
    manifest.update(meta or {})
    manifest["shards"] = shards
    _write_json(out / MANIFEST, manifest)
    return manifest


class TokenBlocks:
    """Memory-mapped reader of a shard directory written by :func:`write_shards` (zero-copy to numpy).

    Sizes are always checked against the manifest; ``verify=True`` also checks every sha256.
    """

    def __init__(self, shard_dir: str | Path, verify: bool = True):
        self.shard_dir = Path(shard_dir)
        manifest_path = self.shard_dir / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{manifest_path} not found: {self.shard_dir} is incomplete; {self._rebuild_hint()}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self.seq_len: int = self.manifest["seq_len"]
            self.n_tokens: int = self.manifest["n_tokens"]
            self.n_words: int = self.manifest["n_words"]
            self.n_blocks: int = self.manifest["n_blocks"]
            self.n_full_blocks: int = self.manifest["n_full_blocks"]
            if not all({"name", "bytes", "sha256"} <= set(shard) for shard in self.manifest["shards"]):
                raise KeyError("every entry of 'shards' needs 'name', 'bytes' and 'sha256'")
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise DataError(
                f"{manifest_path} is unreadable ({exc.__class__.__name__}: {exc}); {self._rebuild_hint()}"
            ) from exc

        # One (tokens, n_valid) pair of numpy views per record batch, backed by the memory maps.
        self._tokens: list[np.ndarray] = []
        self._n_valid: list[np.ndarray] = []
        for shard in self.manifest["shards"]:
            self._open_shard(self.shard_dir / shard["name"], shard, verify)
        self._row_starts = np.cumsum([0] + [len(rows) for rows in self._tokens])
        if self._row_starts[-1] != self.n_blocks:
            raise DataError(
                f"{self.shard_dir}: shards hold {self._row_starts[-1]} blocks but {manifest_path} "
                f"says {self.n_blocks}; {self._rebuild_hint()}"
            )

    def _rebuild_hint(self) -> str:
        return (
            f"rerun `python -m gtmoe prepare shards ... --out {self.shard_dir}` "
            "or delete the directory and rerun snakemake"
        )

    def _open_shard(self, path: Path, entry: dict, verify: bool) -> None:
        if not path.is_file():
            raise DataError(f"{path} is missing; {self._rebuild_hint()}")
        if (size := path.stat().st_size) != entry["bytes"]:
            raise DataError(
                f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated or "
                f"partly written); {self._rebuild_hint()}"
            )
        if verify and _sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path} does not match its sha256 in the manifest (corrupted); {self._rebuild_hint()}")
        expected = _shard_schema(self.seq_len)
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            if not reader.schema.equals(expected):
                raise DataError(f"{path} has schema {reader.schema}, expected {expected}; {self._rebuild_hint()}")
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                tokens = batch.column(TOKENS_COLUMN).flatten().to_numpy(zero_copy_only=True)
                self._tokens.append(tokens.reshape(-1, self.seq_len + 1))
                self._n_valid.append(batch.column(N_VALID_COLUMN).to_numpy(zero_copy_only=True))
        except pa.ArrowException as exc:  # unreadable despite the right size: only reachable with verify=False
            raise DataError(f"{path} is not a readable Arrow IPC file ({exc}); {self._rebuild_hint()}") from exc

    def __len__(self) -> int:
        return self.n_blocks

    def batch(self, indices: np.ndarray | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (int64, shape ``(len(indices), seq_len)``) of the given blocks.

        Targets past a block's valid length (the padding of the last block) are ``-100``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_blocks):
            raise IndexError(f"block indices must lie in [0, {self.n_blocks}), got {indices.min()}..{indices.max()}")
        rows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        n_valid = np.empty(len(indices), dtype=np.int64)
        segment = np.searchsorted(self._row_starts, indices, side="right") - 1
        for s in np.unique(segment):
            pick = segment == s
            local = indices[pick] - self._row_starts[s]
            rows[pick] = self._tokens[s][local]
            n_valid[pick] = self._n_valid[s][local]
        x = np.ascontiguousarray(rows[:, :-1])
        y = rows[:, 1:].copy()
        # Target j is the block's token j + 1, real only while j + 1 < n_valid.
        y[np.arange(1, self.seq_len + 1) >= n_valid[:, None]] = IGNORE_INDEX
        return torch.from_numpy(x), torch.from_numpy(y)


# --------------------------------------------------------------------------- CLI


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
        tokenizer.get_vocab_size(), args.vocab_size, f"{len(lines):,}", args.out, time.perf_counter() - start,
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
        "tokenizer_sha256": _sha256_file(Path(args.tokenizer)),
        "corpus_sha256": corpus_meta[args.split]["sha256"],
    }
    manifest = write_shards(
        tokens, args.out, args.seq_len, n_words=count_words(lines), rows_per_shard=args.rows_per_shard, meta=meta
    )
    log.info(
        "shards: %s %s tokens (%s words) -> %d blocks of %d in %d shard(s) at %s in %.1fs",
        args.split, f"{manifest['n_tokens']:,}", f"{manifest['n_words']:,}", manifest["n_blocks"],
        args.seq_len, len(manifest["shards"]), args.out, time.perf_counter() - start,
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
        "--corpus", choices=tuple(CORPORA), default=DEFAULT_CORPUS,
        help=f"which WikiText release: its hub config and published checksums and counts (default {DEFAULT_CORPUS})",
    )
    corpus.add_argument(
        "--source", choices=("auto", "local", "hub"), default="auto",
        help="where to read the corpus: 'local' files, the Hugging Face 'hub', or 'auto' "
             "(local when --local-dir holds all three files, else the hub; default)",
    )
    corpus.add_argument(
        "--local-dir", type=Path, default=None,
        help=f"directory holding {', '.join(LOCAL_FILES.values())} (e.g. ../shared/data/wikitext-2)",
    )
    corpus.add_argument("--out", type=Path, required=True, help="output directory for {split}.txt and corpus.json")
    corpus.add_argument(
        "--no-verify", action="store_true",
        help="skip the checks against the published checksums (local files) and line / word counts (both sources)",
    )
    corpus.set_defaults(func=_cmd_corpus)

    tokenizer = stages.add_parser(
        "tokenizer", help="train the byte-level BPE on the train split", description="Write tokenizer.json."
    )
    tokenizer.add_argument("--corpus", type=Path, required=True, help="corpus directory from `prepare corpus`")
    tokenizer.add_argument(
        "--vocab-size", type=int, default=8192,
        help=f"vocabulary size including the special tokens (minimum {MIN_VOCAB_SIZE}; default 8192)",
    )
    tokenizer.add_argument("--out", type=Path, required=True, help="output tokenizer file (tokenizer.json)")
    tokenizer.set_defaults(func=_cmd_tokenizer)

    shards = stages.add_parser(
        "shards", help="encode one split into Arrow IPC token blocks",
        description="Write shard-NNNNN.arrow files and manifest.json for one split.",
    )
    shards.add_argument("--corpus", type=Path, required=True, help="corpus directory from `prepare corpus`")
    shards.add_argument("--tokenizer", type=Path, required=True, help="tokenizer file from `prepare tokenizer`")
    shards.add_argument("--split", choices=SPLITS, required=True, help="which split to encode")
    shards.add_argument(
        "--seq-len", type=int, required=True, help="tokens per training sequence (each block stores seq-len + 1)"
    )
    shards.add_argument("--out", type=Path, required=True, help="output directory for the shards and manifest.json")
    shards.add_argument(
        "--rows-per-shard", type=int, default=4096, help="blocks per Arrow file (default 4096)"
    )
    shards.set_defaults(func=_cmd_shards)
