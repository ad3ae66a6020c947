"""Analysis stage of GT-MoE: collect run outputs, compute statistics, write tables, figures and findings.

Every step reads the study record (``study.json``, written by the workflow) and the files under the
study's root; the command line (``python -m analysis --help``) is in ``__main__``.

Modules
-------
record    -- read and check the study record: variants, routers, seeds, settings, sweeps, the root.
outputs   -- names of the files the analysis writes (the workflow declares them from here).
collect   -- read run directories into a tidy table and a run-status table; join each variant's
             router and options; read the n-gram baselines and the run logs.
stats     -- per-variant summaries (Student t CIs) and seed-paired comparisons;
             ``stats.sensitivity``: dose-response statistics of the sweeps; ``stats.specialisation``: what the
             experts learned (co-activation by rank, each expert's top tokens, the exploratory table).
tables    -- parquet, CSV and self-contained HTML tables for the report (the sensitivity tables too).
figures   -- seaborn figures (PNG) for the report; ``figures.canvas``: backend, theme, colours, saving;
             ``figures.forest``: forest plots of the comparisons; ``figures.sensitivity``: dose-response
             figures of the sweeps; ``figures.coactivation``: expert co-activation per router.
findings  -- the findings in words, rendered from ``templates/findings.html.j2`` (Jinja2).
compute   -- job-seconds per stage from Snakemake's benchmark files.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from gtmoe.contract import RUN_FAILED, RUN_MISSING, RUN_OK  # the run-directory contract (torch-free)
from gtmoe.errors import OutputError  # the analysis's write error, one of gtmoe's

__all__ = ["RUN_OK", "RUN_MISSING", "RUN_FAILED", "OutputError", "writing"]


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
