"""The ``shards`` stage: a token stream cut into fixed-length blocks in Arrow IPC files plus ``manifest.json``
(:func:`write_shards`), and :class:`TokenBlocks`, their memory-mapped reader that serves batches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from gtmoe.contract import IGNORE_INDEX  # noqa: E402,F401  (re-exported)
from gtmoe.data.errors import DataError
from gtmoe.data.files import _atomic_path, _write_manifest, _writing
from gtmoe.files import ManifestMismatch, file_entry, remove_stale_temporaries, verify_file

MANIFEST = "manifest.json"
TOKENS_COLUMN, N_VALID_COLUMN = "tokens", "n_valid"


def _shard_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(TOKENS_COLUMN, pa.list_(pa.int32(), seq_len + 1), nullable=False),
            pa.field(N_VALID_COLUMN, pa.int32(), nullable=False),
        ]
    )


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
        remove_stale_temporaries(out, MANIFEST, "shard-*.arrow")

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
            shards.append({"name": path.name, "rows": hi - lo, **file_entry(tmp)})

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
    _write_manifest(out / MANIFEST, manifest)
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
        try:
            verify_file(path, self.shard_dir / MANIFEST, [entry], sha256=verify)  # sizes always: cheap
        except ManifestMismatch as exc:
            raise DataError(f"{exc}; {self._rebuild_hint()}") from None
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

    def routed_token_counts(self, vocab_size: int, chunk: int = 4096) -> torch.Tensor:
        """(vocab_size,) how often each token id is routed in the full blocks: every input position with a
        real target (padding is not counted). Read `chunk` blocks at a time (hash routing's balanced map)."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for start in range(0, self.n_full_blocks, chunk):
            inputs, targets = self.batch(range(start, min(start + chunk, self.n_full_blocks)))
            counts += torch.bincount(inputs[targets != IGNORE_INDEX], minlength=vocab_size)
        return counts

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
