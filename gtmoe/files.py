"""Atomic file writes and file digests, shared by every stage that writes results.

A write goes to a temporary sibling, then is renamed over the target, so a reader (or a rerun after a
kill) sees the old file or the new one, never half of one. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
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
