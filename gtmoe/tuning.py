"""The tuning stage: every router tuned on its own balance knob, with the same budget, on validation only.

A study is one of two stages (config `stage`):

- **tuning**: each variant of `tuning.knobs` runs at every value of its router's declared balance knob
  (`balance_knob`, `python -m gtmoe routers`), all with the same number of values, on the tuning seeds
  `tuning.seeds`. Runs are scored on the validation split only; the test split is never evaluated. The
  analysis draws each router's perplexity-balance frontier and picks each knob's value by the declared rule
  `tuning.select`.
- **confirmation** (the default): the variants as configured, on `seeds`, scored on validation and test; the
  declared contrasts are tested on `statistics.split`.

`tuning.seeds` and `seeds` are checked disjoint in every stage, so no confirmation run ever informed a choice.

    stage: tuning
    tuning:
      seeds: [100, 101]
      select: {minimize: ppl, subject_to: {maxvio_global: 0.25}}
      knobs:                      # a list, so a preset replaces it whole
        - {variant: topk, values: [0.001, 0.003, 0.01, 0.03]}
        - {variant: lossfree, values: [0.0001, 0.0003, 0.001, 0.003]}

Each knob entry becomes a sweep `tune_{variant}` (gtmoe.sweeps): its points are ordinary variants named
`{variant}-{knob}{value}`, the configured value being the variant itself.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gtmoe import routers, sweeps
from gtmoe.checks import check, known_names
from gtmoe.config import INT64_LIMIT

STAGES = ("confirmation", "tuning")
DEFAULT_STAGE = "confirmation"
TUNING_SPLIT = "validation"  # every choice is made here; the test split is for confirmation only
# The metrics a selection rule may minimise or bound: model-level numbers every routed evaluation writes.
SELECT_METRICS = (
    "ppl",
    "word_ppl",
    "nll",
    "gini",
    "maxvio_global",
    "maxvio_batch",
    "load_entropy",
    "experts_per_token",  # the active expert compute: a bound keeps the rule from buying perplexity with FLOPs
)
SWEEP_PREFIX = "tune_"
TUNING_DEFAULTS: dict[str, Any] = {"seeds": [], "select": {"minimize": "ppl", "subject_to": {}}, "knobs": []}


@dataclass(frozen=True)
class Knob:
    """One tuned variant: its router's balance knob and the values it is run at."""

    variant: str
    router: str
    option: str
    values: tuple[float, ...]  # as given: an integer knob (sinkhorn_iters) keeps integers

    @property
    def sweep(self) -> str:
        return f"{SWEEP_PREFIX}{self.variant}"


@dataclass(frozen=True)
class Tuning:
    """`tuning`, checked: the seeds, the selection rule and the knobs (empty outside a tuning study's needs)."""

    seeds: tuple[int, ...]
    minimize: str
    subject_to: Mapping[str, float]
    knobs: tuple[Knob, ...]

    def sweep_entries(self) -> list[dict[str, Any]]:
        """The knobs as `sweeps` entries (gtmoe.sweeps.expand): one single-option sweep per tuned variant."""
        return [{"name": k.sweep, "base": k.variant, "grid": {k.option: list(k.values)}} for k in self.knobs]

    def record(self) -> dict[str, Any]:
        return {
            "seeds": list(self.seeds),
            "select": {"minimize": self.minimize, "subject_to": dict(self.subject_to)},
            "knobs": [
                {
                    "variant": k.variant,
                    "router": k.router,
                    "option": k.option,
                    "values": list(k.values),
                    "sweep": k.sweep,
                }
                for k in self.knobs
            ],
        }


def stage_setting(config: Mapping[str, Any]) -> str:
    stage = config.get("stage", DEFAULT_STAGE)
    check(stage in STAGES, "stage", stage, f"must be one of {', '.join(STAGES)}")
    return stage


def _seeds(value: Any, key: str, allow_empty: bool) -> list[int]:
    check(
        isinstance(value, list) and (allow_empty or len(value) > 0),
        key,
        value,
        "must be a list of integers" if allow_empty else "must be a non-empty list of integers",
    )
    for seed in value:
        check(
            isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < INT64_LIMIT,
            key,
            value,
            "every seed must be an integer in [0, 2**63)",
        )
    check(len(set(value)) == len(value), key, value, "seeds must be unique")
    return list(value)


def confirmation_seeds(config: Mapping[str, Any]) -> list[int]:
    return _seeds(config.get("seeds"), "seeds", allow_empty=False)


def variant_seeds(config: Mapping[str, Any], value: Any, key: str) -> list[int]:
    """A variant's own confirmation seeds (`variants[i].seeds`, replacing `seeds` for it): checked like `seeds`,
    and disjoint from the tuning seeds as they are."""
    seeds = _seeds(value, key, allow_empty=False)
    tuning_seeds = (config.get("tuning") or {}).get("seeds", TUNING_DEFAULTS["seeds"])
    overlap = sorted(
        set(seeds) & {s for s in tuning_seeds if isinstance(s, int)} if isinstance(tuning_seeds, list) else set()
    )
    check(
        not overlap,
        key,
        seeds,
        f"shares seed(s) {', '.join(map(str, overlap))} with tuning.seeds; a run that informed a choice must not "
        "confirm it",
    )
    return seeds


def _select(value: Any) -> tuple[str, dict[str, float]]:
    check(isinstance(value, dict), "tuning.select", value, "must be a mapping with minimize and subject_to")
    for key in value:
        check(
            key in ("minimize", "subject_to"),
            f"tuning.select.{key}",
            value[key],
            "unknown key; expected minimize, subject_to",
        )
    minimize = value.get("minimize", "ppl")
    check(minimize in SELECT_METRICS, "tuning.select.minimize", minimize, f"must be one of {', '.join(SELECT_METRICS)}")
    bounds = value.get("subject_to") or {}
    check(isinstance(bounds, dict), "tuning.select.subject_to", bounds, "must map metrics to upper bounds")
    for metric, bound in bounds.items():
        key = f"tuning.select.subject_to.{metric}"
        check(metric in SELECT_METRICS, key, bound, f"unknown metric; known: {known_names(SELECT_METRICS, metric)}")
        check(metric != minimize, key, bound, f"bounds the metric the rule minimises ({minimize})")
        check(
            isinstance(bound, (int, float)) and not isinstance(bound, bool) and 0 < bound < float("inf"),
            key,
            bound,
            "must be a finite number > 0 (the metric's validation mean may be at most this)",
        )
    return minimize, {metric: float(bound) for metric, bound in bounds.items()}


def _knob(entry: Any, i: int, raw_variants: Mapping[str, Mapping[str, Any]], max_steps: int) -> Knob:
    key = f"tuning.knobs[{i}]"
    check(isinstance(entry, dict), key, entry, "must be a mapping with variant and values")
    for extra in sorted(set(entry) - {"variant", "values"}):
        check(False, f"{key}.{extra}", entry[extra], "unknown key; known keys here: values, variant")
    variant, values = entry.get("variant"), entry.get("values")
    check(variant in raw_variants, f"{key}.variant", variant, f"must be one of the variants: {', '.join(raw_variants)}")
    router = raw_variants[variant]["name"]
    option = routers.get(router).balance_knob
    check(
        option is not None,
        f"{key}.variant",
        variant,
        f"router '{router}' declares no balance knob (balance_knob), so there is nothing to tune",
    )
    check(
        isinstance(values, list) and 0 < len(values) <= sweeps.MAX_VALUES,
        f"{key}.values",
        values,
        f"must be a list of 1 to {sweeps.MAX_VALUES} values of {router}'s balance knob {option}",
    )
    for value in values:
        sweeps.check_value(value, f"{key}.values")
    check(
        len(set(values)) == len(values),
        f"{key}.values",
        values,
        "values must be unique (by value: 30 and 30.0 are one)",
    )
    # The configured value is a point of its own frontier: the budget is exactly these values, and the
    # sweep (which always holds its base) adds no extra point.
    options = {k: v for k, v in raw_variants[variant].items() if k != "name"}
    own = getattr(sweeps.resolved_options(router, options, max_steps, variant), option)
    check(
        own in values,
        f"{key}.values",
        values,
        f"must hold the variant's own {option} = {own!r}, so its frontier passes through the configured router",
    )
    return Knob(variant, router, option, tuple(values))


def tuning_settings(
    config: Mapping[str, Any], raw_variants: Mapping[str, Mapping[str, Any]], stage: str, max_steps: int
) -> Tuning:
    """`tuning` over its defaults, checked against the study: the seeds (disjoint from `seeds`), the rule and the
    knobs. Every knob entry names a variant whose router declares a balance knob, once, with the same number of
    values as every other entry (equal budgets).
    """
    given = config.get("tuning") or {}
    check(isinstance(given, dict), "tuning", given, f"must be a mapping with {', '.join(TUNING_DEFAULTS)}")
    for key in given:
        check(
            key in TUNING_DEFAULTS, f"tuning.{key}", given[key], f"unknown key; expected {', '.join(TUNING_DEFAULTS)}"
        )
    settings = {**TUNING_DEFAULTS, **given}
    seeds = _seeds(settings["seeds"], "tuning.seeds", allow_empty=stage != "tuning")
    overlap = sorted(set(seeds) & set(confirmation_seeds(config)))
    check(
        not overlap,
        "tuning.seeds",
        seeds,
        f"shares seed(s) {', '.join(map(str, overlap))} with the confirmation seeds `seeds`; a run that informed a "
        "choice must not confirm it",
    )
    minimize, subject_to = _select(settings["select"])
    entries = settings["knobs"]
    check(isinstance(entries, list), "tuning.knobs", entries, "must be a list of {variant, values}")
    knobs: list[Knob] = []
    for i, entry in enumerate(entries):
        knob = _knob(entry, i, raw_variants, max_steps)
        first = next((j for j, k in enumerate(knobs) if k.variant == knob.variant), None)
        check(first is None, f"tuning.knobs[{i}].variant", knob.variant, f"is tuned already by tuning.knobs[{first}]")
        if knobs:
            check(
                len(knob.values) == len(knobs[0].values),
                f"tuning.knobs[{i}].values",
                list(knob.values),
                f"has {len(knob.values)} values; every router gets the same budget: {len(knobs[0].values)}, as "
                f"tuning.knobs[0] ({knobs[0].variant}) has",
            )
        knobs.append(knob)
    if stage == "tuning":
        check(bool(knobs), "tuning.knobs", entries, "a tuning study tunes at least one variant")
    return Tuning(tuple(seeds), minimize, MappingProxyType(subject_to), tuple(knobs))


def check_compared_are_tuned(
    tuning: Tuning, contrasts: Sequence[Sequence[str]], raw_variants: Mapping[str, Mapping[str, Any]]
) -> None:
    """In a tuning study every variant of a declared contrast whose router has a balance knob is tuned: no compared
    router gets less budget than another."""
    tuned = {k.variant for k in tuning.knobs}
    for i, pair in enumerate(contrasts):
        for variant in pair:
            router = raw_variants[variant]["name"] if variant in raw_variants else None
            knob = routers.get(router).balance_knob if router else None
            check(
                variant in tuned or knob is None,
                "tuning.knobs",
                sorted(tuned),
                f"leaves out '{variant}' of statistics.contrasts[{i}], whose router '{router}' declares the balance "
                f"knob {knob}: every compared router is tuned with the same budget",
            )


def frontier_pairs(tuning: Tuning, contrasts: Collection[Sequence[str]]) -> list[tuple[str, str]]:
    """The declared contrasts [a, b] whose two variants are both tuned, as (sweep of a, sweep of b)."""
    sweep_of = {k.variant: k.sweep for k in tuning.knobs}
    return [(sweep_of[a], sweep_of[b]) for a, b in contrasts if a in sweep_of and b in sweep_of]
