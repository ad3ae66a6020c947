"""Analysis stage of GT-MoE: collect run outputs, compute statistics, write tables and figures.

Modules
-------
collect  -- read run directories into a tidy table and a run-status table.
stats    -- per-variant summaries (Student t CIs) and seed-paired comparisons.
tables   -- CSV and self-contained HTML tables for the report.
figures  -- seaborn figures (PNG) for the report.

The command line interface (``python -m analysis --help``) is in ``__main__``.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from gtmoe.contract import RUN_FAILED, RUN_MISSING, RUN_OK  # the run-directory contract (torch-free)

__all__ = ["RUN_OK", "RUN_MISSING", "RUN_FAILED", "OutputError", "writing"]


class OutputError(RuntimeError):
    """An output file could not be written (full disk, permissions); the message names it and the fix."""


@contextmanager
def writing(path) -> Iterator[None]:
    """Turn an OSError while the block writes `path` into an OutputError naming `path` and the recovery."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or exc.__class__.__name__
        raise OutputError(
            f"cannot write {path} ({reason}); free space or fix the permissions there and rerun "
            "(snakemake reruns this job)"
        ) from None
