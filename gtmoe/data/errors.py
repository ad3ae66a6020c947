"""DataError, the one exception of the data path: a problem the user can fix, named with how to fix it."""

from __future__ import annotations


class DataError(RuntimeError):
    """A data problem the user can fix; the message names the file or key and how to rebuild it."""
