"""What every router got in a tuning study: its knob values, seeds, runs and training steps (the budget table).

Equal budgets are checked when the config is read (gtmoe.tuning: every knob has as many values as every other);
this table shows what ran. One row per sweep of the study: a tuned knob (``tune_<variant>``) or a sweep of the
config's own (``sweeps``), which gives its base extra budget and is listed so, beside the knobs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from analysis.collect import RUN_OK

BUDGET_COLUMNS = [
    "variant",
    "router",
    "option",
    "kind",
    "sweep",
    "values",
    "n_values",
    "seeds",
    "n_seeds",
    "runs_planned",
    "runs_ok",
    "training_steps",
]
TUNED, SWEPT = "tuned knob", "config sweep"  # values of ``kind``


def budget_table(
    tuning: Mapping[str, Any], design: pd.DataFrame, seeds: Sequence[int], status: pd.DataFrame, max_steps: int
) -> pd.DataFrame:
    """One row per (sweep, option) of ``design`` (sensitivity.read_design): the base variant, its router, the
    option, whether it is a tuned knob (``tuning["knobs"]``) or a config sweep, the values, the seeds, the runs
    planned (values x seeds) and ok (``status``, the aggregate's run status) and the training steps they took
    (``max_steps`` per planned run)."""
    tuned = {(k["sweep"], k["option"]) for k in tuning.get("knobs", [])}
    ok = status[status["status"] == RUN_OK]
    ok_runs = set(zip(ok["variant"].astype(str), ok["seed"].astype(int)))
    rows = []
    for (sweep, option), points in design.groupby(["sweep", "option"], sort=False):
        variants = list(dict.fromkeys(points["variant"]))
        values = sorted(set(points["value"]))
        planned = len(variants) * len(seeds)
        rows.append(
            dict(
                variant=points["base"].iloc[0],
                router=points["router"].iloc[0],
                option=option,
                kind=TUNED if (sweep, option) in tuned else SWEPT,
                sweep=sweep,
                values=", ".join(f"{v:g}" for v in values),
                n_values=len(values),
                seeds=", ".join(map(str, seeds)),
                n_seeds=len(seeds),
                runs_planned=planned,
                runs_ok=sum((v, int(s)) in ok_runs for v in variants for s in seeds),
                training_steps=planned * max_steps,
            )
        )
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS)
