"""The study record, `results/<name>/study.json`: what the study is, for every analysis step.

The workflow resolves the config once, when it parses, and writes the record (gtmoe.study). The
analysis reads nothing else about the study: the variants with their routers and resolved options,
the seeds, the reference, the ablations, the statistics settings, the sweep design, each router's
display names, and the study's root, under which every input and output lies (StudyLayout).

Standard library only. A record that cannot be read or lacks what the analysis needs is a
ConfigError naming the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.outputs import record_part
from gtmoe.contract import EVAL_SPLITS, STUDY_RECORD_FORMAT, StudyLayout
from gtmoe.errors import ConfigError

REWRITE = "run snakemake (a dry run is enough) to write it again"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Record:
    """A checked study record; `data` is the JSON object as written."""

    path: Path
    data: Mapping[str, Any]

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.data["root"])

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def variants(self) -> list[str]:
        """The variants in study order."""
        return list(self.data["variants"])

    @property
    def seeds(self) -> list[int]:
        """The study's seeds; a variant may run on seeds of its own (`variant_seeds`)."""
        return list(self.data["seeds"])

    def variant_seeds(self, variant: str) -> list[int]:
        """The seeds `variant` ran on: its own (`variants[].seeds`) or the study's."""
        return list(self.data["variants"][variant].get("seeds", self.data["seeds"]))

    def seeds_by_variant(self) -> dict[str, list[int]]:
        return {v: self.variant_seeds(v) for v in self.variants}

    @property
    def stage(self) -> str:
        """ "confirmation" or "tuning" (gtmoe.tuning); a record written before stages is a confirmation."""
        return self.data.get("stage", "confirmation")

    @property
    def eval_splits(self) -> list[str]:
        """The splits every run is scored on: a tuning study's never include test."""
        return list(self.data.get("eval_splits", EVAL_SPLITS))

    @property
    def tuning(self) -> Mapping[str, Any]:
        """seeds, select (minimize, subject_to), knobs (variant, router, option, values, sweep) and pairs (the
        declared contrasts' sweeps, whose frontiers are compared)."""
        return self.data.get("tuning") or {
            "seeds": [],
            "select": {"minimize": "ppl", "subject_to": {}},
            "knobs": [],
            "pairs": [],
        }

    @property
    def max_steps(self) -> int:
        """Training steps of every run (run.train.max_steps)."""
        return int(self.data["run"]["train"]["max_steps"])

    @property
    def reference(self) -> str:
        return self.data["reference"]

    @property
    def ablation_base(self) -> str | None:
        return self.data["ablation"]["base"]

    @property
    def ablations(self) -> list[str]:
        return list(self.data["ablation"]["variants"])

    @property
    def statistics(self) -> Mapping[str, Any]:
        """primary (endpoints), alpha, power and split of the comparisons."""
        return self.data["statistics"]

    @property
    def split(self) -> str:
        return self.data["statistics"]["split"]

    @property
    def horizon(self) -> Mapping[str, Any] | None:
        """The training-horizon check `{variant, longer, max_gain}` (config findings.horizon), or None."""
        return self.data["findings"].get("horizon")

    @property
    def sweeps(self) -> list[dict[str, Any]]:
        """The sweep design, one row per (sweep, option, value) point; empty without sweeps."""
        return list(self.data["sweeps"])

    def router(self, variant: str) -> str:
        return self.data["variants"][variant]["router"]

    def options(self, variant: str) -> dict[str, Any]:
        """The variant's router options, fully resolved."""
        return dict(self.data["variants"][variant]["options"])

    def describe(self, variant: str) -> Mapping[str, Any]:
        """How the variant's router declares itself: label, routed, balanced_by_construction, terms, states."""
        return self.data["routers"][self.router(variant)]

    def routed(self) -> dict[str, bool]:
        """Variant -> whether a router routes it (an unrouted variant has no router log and no load metrics)."""
        return {v: bool(self.describe(v)["routed"]) for v in self.variants}

    def state_labels(self, variant: str) -> dict[str, str]:
        return dict(self.describe(variant)["states"])

    def term_labels(self) -> dict[str, str]:
        """Selection term -> its label, over the study's routers (the first router to declare a term names it)."""
        labels: dict[str, str] = {}
        for router in self.data["routers"].values():
            for term, label in router["terms"].items():
                labels.setdefault(term, label)
        return labels

    def balanced_by_construction(self) -> list[str]:
        """Variants whose router balances load by construction, choosing tokens over the whole routing group."""
        return [v for v in self.variants if self.describe(v)["balanced_by_construction"]]

    def run_dirs(self) -> list[str]:
        """The run directory of every (variant, seed), in study order."""
        return [self.layout.run_dir(v, s) for v in self.variants for s in self.variant_seeds(v)]


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self, ok: bool, key: str, value: object, why: str) -> None:
        if not ok:
            shown = repr(value)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            raise ConfigError(f"study record {self.path}: '{key}' = {shown}: {why}; {REWRITE}")


def _check(data: Mapping[str, Any], check: _Checker) -> None:
    """Everything the analysis relies on, with the type it relies on."""
    check(isinstance(data.get("root"), str) and data["root"] != "", "root", data.get("root"), "must be a path")
    check(isinstance(data.get("name"), str), "name", data.get("name"), "must be the study's name")
    variants = data.get("variants")
    check(isinstance(variants, dict) and len(variants) > 0, "variants", variants, "must be a non-empty mapping")
    routers = data.get("routers")
    check(isinstance(routers, dict), "routers", routers, "must map each router to its description")
    for variant, entry in variants.items():
        key = f"variants.{variant}"
        check(isinstance(entry, dict), key, entry, "must be a mapping with 'router' and 'options'")
        check(isinstance(entry.get("router"), str), f"{key}.router", entry.get("router"), "must be a router name")
        check(isinstance(entry.get("options"), dict), f"{key}.options", entry.get("options"), "must be a mapping")
        check(entry["router"] in routers, "routers", sorted(routers), f"lacks router '{entry['router']}' of {variant}")
        own = entry.get("seeds", [0])
        check(
            isinstance(own, list) and len(own) > 0 and all(isinstance(s, int) and not isinstance(s, bool) for s in own),
            f"{key}.seeds",
            own,
            "must be a non-empty list of integers",
        )
    for name, router in routers.items():
        key = f"routers.{name}"
        check(isinstance(router, dict), key, router, "must be a mapping")
        check(isinstance(router.get("label"), str), f"{key}.label", router.get("label"), "must be a string")
        for flag in ("routed", "balanced_by_construction"):
            check(isinstance(router.get(flag), bool), f"{key}.{flag}", router.get(flag), "must be true or false")
        for labels in ("terms", "states"):
            value = router.get(labels)
            check(
                isinstance(value, dict) and all(isinstance(x, str) for x in (*value, *value.values())),
                f"{key}.{labels}",
                value,
                "must map names to labels",
            )
    seeds = data.get("seeds")
    check(
        isinstance(seeds, list)
        and len(seeds) > 0
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
        "seeds",
        seeds,
        "must be a non-empty list of integers",
    )
    check(data.get("reference") in variants, "reference", data.get("reference"), "must be one of the variants")
    ablation = data.get("ablation")
    check(isinstance(ablation, dict), "ablation", ablation, "must be a mapping with 'base' and 'variants'")
    base, members = ablation.get("base"), ablation.get("variants")
    check(base is None or base in variants, "ablation.base", base, "must be null or one of the variants")
    check(
        isinstance(members, list) and all(m in variants for m in members),
        "ablation.variants",
        members,
        "must be a list of the variants",
    )
    statistics = data.get("statistics")
    check(isinstance(statistics, dict), "statistics", statistics, "must be a mapping")
    primary = statistics.get("primary")
    check(
        isinstance(primary, list) and all(isinstance(m, str) for m in primary),
        "statistics.primary",
        primary,
        "must be a list of metric names",
    )
    alpha, power = statistics.get("alpha"), statistics.get("power")
    for key, value in (("alpha", alpha), ("power", power)):
        check(_is_number(value) and 0 < value < 1, f"statistics.{key}", value, "must be a number in (0, 1)")
    check(power > alpha, "statistics.power", power, f"must exceed statistics.alpha = {alpha}")
    stage = data.get("stage", "confirmation")
    check(stage in ("confirmation", "tuning"), "stage", stage, "must be confirmation or tuning")
    eval_splits = data.get("eval_splits", list(EVAL_SPLITS))
    check(
        isinstance(eval_splits, list) and len(eval_splits) > 0 and set(eval_splits) <= set(EVAL_SPLITS),
        "eval_splits",
        eval_splits,
        f"must be a non-empty list of {', '.join(EVAL_SPLITS)}",
    )
    split = statistics.get("split")
    check(split in eval_splits, "statistics.split", split, f"must be one of the scored splits {', '.join(eval_splits)}")
    findings = data.get("findings")
    check(isinstance(findings, dict), "findings", findings, "must be a mapping")
    horizon = findings.get("horizon")
    check(
        horizon is None
        or (
            isinstance(horizon, dict)
            and horizon.get("variant") in variants
            and horizon.get("longer") in variants
            and _is_number(horizon.get("max_gain"))
            and 0 < horizon["max_gain"] < 1
        ),
        "findings.horizon",
        horizon,
        "must be null or {variant, longer, max_gain} with two of the variants and 0 < max_gain < 1",
    )
    check(isinstance(data.get("sweeps"), list), "sweeps", data.get("sweeps"), "must be a list of design rows")


def load(path: str | Path, keys: tuple[str, ...] | None = None) -> Record:
    """Read and check `study.json`; a missing, malformed or foreign file is a ConfigError naming it. With
    `keys` (analysis.outputs.RECORD_KEYS of a step) the Record holds only that part of the record."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"study record {path} does not exist; {REWRITE}") from None
    except OSError as error:
        raise ConfigError(f"cannot read the study record {path} ({error.strerror or error}); {REWRITE}") from None
    except ValueError as error:
        raise ConfigError(f"study record {path} is not valid JSON ({error}); {REWRITE}") from None
    check = _Checker(path)
    check(isinstance(data, dict), "(the file)", type(data).__name__, "must be a JSON object")
    check(
        data.get("format") == STUDY_RECORD_FORMAT,
        "format",
        data.get("format"),
        f"this analysis reads format {STUDY_RECORD_FORMAT}",
    )
    _check(data, check)
    return Record(path, data if keys is None else record_part(data, keys))
