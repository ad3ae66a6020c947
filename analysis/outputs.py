"""Names of the files the analysis writes under a study's summary/ and figures/ (gtmoe.contract.StudyLayout).

The one home of these names: `python -m analysis` writes them and workflow/rules/analysis.smk declares
them as rule outputs. Standard library only, so the workflow can import it when it parses.
"""

from __future__ import annotations

# summary/ (StudyLayout.summary)
TIDY = "runs.parquet"  # aggregate: one row per number of every run, with each variant's router and options
STATUS = "run_status"  # aggregate: .parquet, .csv, .html
STATISTICS = ("summary", "comparisons", "ablations")  # stats: each .parquet (machines), .csv and .html (people)
SENSITIVITY = ("sensitivity", "sensitivity_best")  # sensitivity (studies with sweeps): each .parquet, .csv, .html
FINDINGS = "findings.html"  # findings
COMPUTE = "compute"  # compute: .csv, .html

# figures/ (StudyLayout.figures): each NAME.png
FIGURES = (
    "perplexity",
    "load_balance",
    "load_heatmap",
    "training_balance",
    "pareto",
    "router_state",
    "ablation_forest",
    "reference_forest",
    "flip_rates",
)


def sensitivity_figure(sweep: str) -> str:
    """File name of a sweep's dose-response figure."""
    return f"sensitivity_{sweep}.png"
