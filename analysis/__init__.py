"""Analysis stage of GT-MoE: collect run outputs, compute statistics, write tables and figures.

Modules
-------
collect  -- read run directories into a tidy table and a run-status table.
stats    -- per-variant summaries (Student t CIs) and seed-paired comparisons.
tables   -- CSV and self-contained HTML tables for the report.
figures  -- seaborn figures (PNG) for the report.

The command line interface (``python -m analysis --help``) is in ``__main__``.
"""

RUN_OK = "ok"
RUN_MISSING = "missing"
RUN_FAILED = "failed"

__all__ = ["RUN_OK", "RUN_MISSING", "RUN_FAILED"]
