"""Names of the files the analysis writes under a study's summary/ and figures/ (gtmoe.contract.StudyLayout),
and the parts of the study record each step reads.

The one home of these names: `python -m analysis` writes them and workflow/rules/analysis.smk declares
them as rule outputs. Standard library only, so the workflow can import it when it parses.
"""

from __future__ import annotations

# summary/ (StudyLayout.summary)
TIDY = "runs.parquet"  # aggregate: one row per number of every run, with each variant's router and options
STATUS = "run_status"  # aggregate: .parquet, .csv, .html
STATISTICS = ("summary", "comparisons", "ablations")  # stats: each .parquet (machines), .csv and .html (people)
# stats: the declared contrasts and the ablations on the primary endpoints (Holm, TOST, verdicts), as .parquet, .csv,
# .html and .tex (LaTeX, for the paper)
CONFIRMATORY = "confirmatory"
CONFIRMATORY_SUFFIXES = ("parquet", "csv", "html", "tex")
SENSITIVITY = ("sensitivity", "sensitivity_best")  # sensitivity (studies with sweeps): each .parquet, .csv, .html
# tuning (a tuning study): frontier and tuning_budget as .parquet, .csv, .html; frontier_comparison also .tex
TUNING = ("frontier", "frontier_comparison", "tuning_budget")
FRONTIER_FIGURE = "frontier"  # tuning: figures/frontier.png
FINDINGS = "findings.html"  # findings
# specialisation: what the experts learned and how stable their routing is; each .parquet, .csv, .html, and
# figures/coactivation.png, routing_stability.png, seed_agreement.png
SPECIALISATION = ("specialisation", "vocabulary", "seed_agreement")
COACTIVATION_FIGURE = "coactivation"
STABILITY_FIGURE = "routing_stability"
AGREEMENT_FIGURE = "seed_agreement"
COMPUTE = "compute"  # compute: .csv, .html

# figures/ (StudyLayout.figures): each NAME.png
FIGURES = (
    "perplexity",
    "load_balance",
    "load_heatmap",
    "training_balance",
    "load_over_training",
    "pareto",
    "router_state",
    "ablation_forest",
    "reference_forest",
    "flip_rates",
)


def sensitivity_figure(sweep: str) -> str:
    """File name of a sweep's dose-response figure."""
    return f"sensitivity_{sweep}.png"


# The keys of the study record (study.json) each step reads (dotted: one key of a section). A step is given
# only these (analysis.record.load), and the workflow reruns it when exactly these change (its params
# trigger): an edit of the run settings, say `train.log_every`, reruns no analysis.
RUNS = ("name", "stage", "root", "seeds", "eval_splits", "variants", "routers")
RECORD_KEYS = {
    "aggregate": RUNS,
    "stats": (*RUNS, "reference", "ablation", "statistics"),
    "figures": (*RUNS, "reference", "ablation", "statistics"),
    "findings": (*RUNS, "reference", "ablation", "statistics", "findings", "sweeps", "tuning"),
    "compute": (*RUNS, "sweeps"),
    # chosen on validation by the declared rule, whatever statistics.split says
    "sensitivity": (*RUNS, "reference", "sweeps", "tuning"),
    "tuning": (*RUNS, "sweeps", "tuning", "run.train"),
    "specialisation": (*RUNS, "statistics"),  # the split and the declared primary endpoints
}


def record_part(record: dict, keys: tuple[str, ...]) -> dict:
    """The part of a study record under `keys` (each a top-level key, or `section.key`), nested as in the record."""
    part: dict = {}
    for key in keys:
        section, _, name = key.partition(".")
        if section not in record:  # a key newer than the record (stage, tuning): analysis.record's default
            continue
        if name:
            part.setdefault(section, {})[name] = record[section][name]
        else:
            part[section] = record[section]
    return part
