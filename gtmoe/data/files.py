"""Data-stage writes: atomic (gtmoe.files), and a failed write becomes a :class:`DataError` naming the file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gtmoe.data.errors import DataError
from gtmoe.files import atomic_path, write_manifest


def _cannot_write(path: Path, exc: OSError) -> DataError:
    return DataError(
        f"cannot write {path} ({exc.strerror or exc}); free space or fix the permissions there "
        "(or pass another --out) and rerun"
    )


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while the block writes ``path`` (full disk, permissions) into a DataError naming it."""
    try:
        yield
    except OSError as exc:
        raise _cannot_write(path, exc) from None


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and move it into place only if the block succeeds.

    A failed write (disk full, permissions) is a DataError naming ``path``.
    """
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            yield tmp


def _write_manifest(path: Path, manifest: dict) -> None:
    """:func:`gtmoe.files.write_manifest`, into a directory created if need be; a failed write is a DataError."""
    with _writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_manifest(path, manifest)
