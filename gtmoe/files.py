"""Atomic file writes, file digests and sha256 manifests, shared by every stage that writes results.

A write goes to a temporary sibling, then is renamed over the target, so a reader (or a rerun after a
kill) sees the old file or the new one, never half of one. A manifest is a JSON file that records, per
file it covers, an entry ``{"bytes": size, "sha256": hex digest}`` (checkpoints, token shards, the
corpus); :func:`verify_file` checks a file against its entry. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path


def temporary(path: Path) -> Path:
    """The temporary sibling of `path` this process writes: `.<name>.tmp-<pid>`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(directory: Path, *names: str) -> None:
    """Delete the temporaries `.<name>.tmp-*` of processes killed mid-write (`name` may hold `*`):
    never valid, possibly checkpoint-sized."""
    for name in names:
        for stale in Path(directory).glob(f".{name}.tmp-*"):
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; it replaces `path` only if the block succeeds."""
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, write: Callable[[Path], object], *, durable: bool = False) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`. `durable` also
    fsyncs it first (for files a crash must not leave empty, such as checkpoint manifests)."""
    with atomic_path(path) as tmp:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --------------------------------------------------------------------------- manifests


class HashingWriter:
    """Write-only wrapper of a binary file that hashes what passes through it.

    For writers that write strictly sequentially (``torch.save``, a text written in slices), the
    digest is the file's sha256 without reading the file back.
    """

    def __init__(self, handle):
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def entry(self) -> dict:
        """The manifest entry of what was written so far."""
        return {"bytes": self.size, "sha256": self.sha256.hexdigest()}


def file_entry(path: Path) -> dict:
    """The manifest entry of a file on disk."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(path: Path, manifest: dict, *, durable: bool = False) -> None:
    """Write `manifest` as indented JSON, atomically (`durable`: fsynced before the rename)."""
    write_atomic(
        path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8"), durable=durable
    )


from gtmoe.errors import ManifestMismatch  # noqa: E402,F401  (re-exported)


def verify_file(path: Path, manifest: Path, entries: Sequence[Mapping], *, sha256: bool = True) -> Mapping:
    """The first of `entries` (manifest entries, the one `manifest` describes first) that the file at
    `path` matches: its size first (cheap), then, unless `sha256` is false, its sha256 digest.

    Raises :class:`ManifestMismatch` naming the file, its manifest and what differs; callers add how
    to recover.
    """
    if not path.is_file():
        raise ManifestMismatch(f"{path} is missing")
    size = path.stat().st_size
    same_size = [entry for entry in entries if entry["bytes"] == size]
    if not same_size:
        raise ManifestMismatch(
            f"{path} has {size} bytes but its manifest {manifest.name} says {entries[0]['bytes']} "
            "(truncated, partly written or modified)"
        )
    if not sha256:
        return same_size[0]
    digest = sha256_file(path)
    match = next((entry for entry in same_size if entry["sha256"] == digest), None)
    if match is None:
        raise ManifestMismatch(
            f"{path} does not match the sha256 in its manifest {manifest.name} (corrupted or modified)"
        )
    return match
