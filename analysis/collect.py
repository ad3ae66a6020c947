"""Read run directories into a tidy table of numbers and a table of run statuses.

A run directory is ``.../{variant}/seed{seed}/`` and holds ``eval_validation.json``,
``eval_test.json``, ``train_log.parquet`` and, for routed variants, ``router_log.parquet``.

The tidy table has one row per number: ``variant, seed, split, metric, layer, value,
source, run_status``. ``layer`` is ``"all"`` for model-level values and the layer index
(as a string) for per-layer ones; per-expert token counts of a layer are metrics
``load_e{i}`` (and, for a token-choice router, the counts it asked for before any capacity cut,
``requested_load_e{i}``: every count vector of ``gtmoe.contract.PER_LAYER_LOADS``). ``source`` is the
file plus a fragment (a JSON pointer for eval files, the column and step for the training log), so every
number can be traced back.

Every readable value of every run is kept, whatever the run's status; the statistics
select ``run_status == "ok"`` explicitly, and the status table says why a run is out. An evaluation JSON
with a required metric missing, not a number or null, or any metric outside its range
(``gtmoe.contract.metric_range``: PPL in (1, 1e100], Gini in [0, 1), counts >= 0, ...) fails its run, the
status detail naming the file and the key.

``variant_columns`` turns the study record's variants into one row per variant with its
``router`` and one column per resolved router option; ``join_variants`` adds them to the tidy
table (``runs.parquet``) and to the summary, so every option is a column of every table.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.parquet as pq

from gtmoe.contract import (
    EVAL_ID_KEYS,
    EVAL_REQUIRED_METRICS,
    EVAL_SPLITS,
    LOAD_COUNT_RANGE,
    LOAD_METRICS,
    PER_LAYER_ARRAYS,
    PER_LAYER_ID_KEYS,
    PER_LAYER_LOADS,
    PROBE_SPLIT,
    ROUTER_LOG,
    ROUTER_LOG_INDEX,
    RUN_FAILED,
    RUN_MISSING,
    RUN_OK,
    TRAIN_LOG,
    eval_file,
    metric_range,
)
from gtmoe.errors import ConfigError, DataError
from gtmoe.probe import unpack_expert_sets

if TYPE_CHECKING:
    from analysis.record import Record

TIDY_COLUMNS = ["variant", "seed", "split", "metric", "layer", "value", "source", "run_status"]
STATUS_COLUMNS = ["variant", "seed", "status", "detail", "router", "run_dir"]
MODEL_LEVEL = "all"
ROUTER = "router"  # column of each variant's router name, beside its options

# Eval-JSON keys that identify a run rather than measure it (everything else numeric is kept), and the
# model-level load metrics every routed run's JSON must hold as finite numbers: gtmoe.contract's.
_EVAL_ID_KEYS = frozenset(EVAL_ID_KEYS)
_PER_LAYER_ID_KEYS = frozenset(PER_LAYER_ID_KEYS)
_SEED_DIR = re.compile(r"^seed(\d+)$")


def parse_run_dir(run_dir: str | Path) -> tuple[str, int]:
    """Return ``(variant, seed)`` from a path ending in ``{variant}/seed{seed}``."""
    path = Path(run_dir)
    match = _SEED_DIR.match(path.name)
    if match is None or not path.parent.name:
        raise ConfigError(f"run directory {str(run_dir)!r} does not end in '{{variant}}/seed{{seed}}'")
    return path.parent.name, int(match.group(1))


def _is_number(value: object) -> bool:
    # bool is an int subclass but never a measurement here.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value: object) -> float:
    """JSON null (metric undefined, e.g. load metrics of an unrouted model) becomes NaN, kept as a row."""
    return float(value) if _is_number(value) else math.nan


def eval_records(evaluation: dict, source: str) -> list[dict]:
    """Tidy records (without variant/seed/run_status) of one parsed ``eval_{split}.json``.

    Model-level numbers get ``layer="all"``; each ``per_layer`` entry contributes its
    scalar metrics and one ``{name}_e{i}`` record per expert of each of its count vectors
    (``load_e{i}``, ``requested_load_e{i}``: token counts; none for a null vector).
    """
    split = evaluation["split"]

    def numbers(mapping: dict, skip: frozenset, layer: str, pointer: str) -> list[dict]:
        return [
            dict(split=split, metric=key, layer=layer, value=_as_float(value), source=f"{pointer}/{key}")
            for key, value in mapping.items()
            if key not in skip and (value is None or _is_number(value))
        ]

    records = numbers(evaluation, _EVAL_ID_KEYS, MODEL_LEVEL, f"{source}#")
    for index, entry in enumerate(evaluation.get("per_layer") or []):
        layer = str(entry["layer"])
        pointer = f"{source}#/per_layer/{index}"
        records += numbers(entry, _PER_LAYER_ID_KEYS, layer, pointer)
        for name in PER_LAYER_LOADS:
            for expert, count in enumerate(entry.get(name) or []):
                records.append(
                    dict(
                        split=split,
                        metric=f"{name}_e{expert}",
                        layer=layer,
                        value=_as_float(count),
                        source=f"{pointer}/{name}/{expert}",
                    )
                )
    return records


def train_log_records(log: pd.DataFrame, source: str) -> list[dict]:
    """Tidy records (split ``"train"``) summarising one training log.

    ``final_*`` values are read at the last logged step; throughput is the mean over
    logged steps and wall time the largest ``elapsed_s``.
    """
    last = log.loc[log["step"].idxmax()]
    step = int(last["step"])
    records = [dict(metric="final_step", value=float(step), source=f"{source}#max(step)")]
    for column in ("loss", "aux_loss", "z_loss", "grad_norm", "lr"):
        if column in log.columns:
            records.append(
                dict(metric=f"final_{column}", value=float(last[column]), source=f"{source}#{column}@step={step}")
            )
    if "tokens_per_s" in log.columns:
        records.append(
            dict(
                metric="mean_tokens_per_s",
                value=float(log["tokens_per_s"].mean()),
                source=f"{source}#mean(tokens_per_s)",
            )
        )
    if "elapsed_s" in log.columns:
        records.append(
            dict(metric="train_wall_s", value=float(log["elapsed_s"].max()), source=f"{source}#max(elapsed_s)")
        )
    return [dict(split="train", layer=MODEL_LEVEL, **record) for record in records]


@dataclass
class RunReading:
    """What could be read from one run directory, and what went wrong."""

    variant: str
    seed: int
    run_dir: str
    records: list[dict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    router: str | None = None

    @property
    def status(self) -> str:
        # A run with a broken file is "failed" even if another file is also absent.
        if self.failures:
            return RUN_FAILED
        return RUN_MISSING if self.missing else RUN_OK

    @property
    def detail(self) -> str:
        parts = [f"missing {name}" for name in self.missing] + self.failures
        return "; ".join(parts)


def _evaluates_routing(evaluation: dict) -> bool:
    """Whether an eval JSON is of a routed model: it has experts (an unrouted one has none, 0 or null)."""
    return bool(evaluation.get("n_experts"))


MAX_RANGE_PROBLEMS = 5  # per eval file, in the status table's detail; the rest are counted


def _range_problems(mapping: dict, pointer: str, required: Sequence[str]) -> list[str]:
    """Metrics of one mapping (the model level, or one per_layer entry at JSON pointer ``pointer``) that are
    missing or not numbers (``required``), or outside their range (gtmoe.contract.metric_range)."""
    problems = [f"missing {pointer}{key}" for key in required if key not in mapping]
    for key, value in mapping.items():
        limits = metric_range(key)
        if limits is None and key not in required:
            continue
        if value is None or (_is_number(value) and not math.isfinite(value)):
            if value is not None or key in required:  # null: undefined, allowed where optional
                load = key in LOAD_METRICS
                label, note = ("load metric ", "; null is how gtmoe writes NaN/inf") if load else ("", "")
                problems.append(f"non-finite {label}{pointer}{key} ({value!r}{note})")
        elif not _is_number(value):
            problems.append(f"non-numeric {pointer}{key} ({value!r})")
        elif limits is not None and value not in limits:
            problems.append(f"{pointer}{key} = {value!r} outside {limits}")
    return problems


def _check_evaluation(evaluation: dict, name: str, variant: str, seed: int, split: str, routed: bool) -> list[str]:
    """Reasons why a parsed eval JSON cannot be trusted (empty list when it can): its status or identity, a
    required metric missing, not a number or null, or any metric outside its range (gtmoe.contract)."""
    problems = []
    if evaluation.get("status") != RUN_OK:
        problems.append(f"status={evaluation.get('status')!r}")
    required = (*EVAL_REQUIRED_METRICS, *LOAD_METRICS) if routed else EVAL_REQUIRED_METRICS
    problems += _range_problems(evaluation, "", required)
    for index, entry in enumerate(evaluation.get("per_layer") or []):
        pointer = f"per_layer/{index}/"
        problems += _range_problems(entry, pointer, ())
        for vector in PER_LAYER_LOADS:
            for expert, count in enumerate(entry.get(vector) or []):
                if count not in LOAD_COUNT_RANGE:
                    problems.append(f"{pointer}{vector}/{expert} = {count!r} outside {LOAD_COUNT_RANGE}")
    found = (evaluation.get("variant"), evaluation.get("seed"), evaluation.get("split"))
    if found != (variant, seed, split):
        problems.append(f"written for (variant, seed, split)={found!r}")
    if len(problems) > MAX_RANGE_PROBLEMS:
        problems[MAX_RANGE_PROBLEMS:] = [f"and {len(problems) - MAX_RANGE_PROBLEMS} more problem(s)"]
    return [f"{name}: {problem}" for problem in problems]


def read_run(
    run_dir: str | Path, variant: str, seed: int, routed: bool | None = None, splits: Sequence[str] = EVAL_SPLITS
) -> RunReading:
    """Read every file of one run; never raises for absent or corrupt files.

    ``routed``: whether the variant's router routes (the study record says; a routed run needs its
    router log and finite load metrics). None: as its eval JSONs say (experts or none), routed
    when neither can be read.
    """
    path = Path(run_dir)
    reading = RunReading(variant=variant, seed=seed, run_dir=str(run_dir))
    if not path.is_dir():
        reading.missing.append("run directory")
        return reading

    for split in splits:
        name = eval_file(split)
        file = path / name
        if not file.is_file():
            reading.missing.append(name)
            continue
        try:
            evaluation = json.loads(file.read_text())
            reading.records += eval_records(evaluation, str(file))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            reading.failures.append(f"{name}: unreadable ({type(error).__name__}: {error})")
            continue
        if routed is None:
            routed = _evaluates_routing(evaluation)
        reading.failures += _check_evaluation(evaluation, name, variant, seed, split, routed)
        reading.router = reading.router or evaluation.get("router")

    file = path / TRAIN_LOG
    if not file.is_file():
        reading.missing.append(TRAIN_LOG)
    else:
        try:
            log = pd.read_parquet(file)
            if log.empty or "step" not in log.columns or "loss" not in log.columns:
                reading.failures.append(f"{TRAIN_LOG}: no rows or no step/loss column")
            else:
                reading.records += train_log_records(log, str(file))
        except Exception as error:  # pyarrow raises several unrelated types for corrupt files
            reading.failures.append(f"{TRAIN_LOG}: unreadable ({type(error).__name__}: {error})")

    # An unrouted variant has no router log.
    file = path / ROUTER_LOG
    if routed is None or routed:
        if not file.is_file():
            reading.missing.append(ROUTER_LOG)
        else:
            try:
                pq.read_schema(file)  # cheap validity check; figures read the content
            except Exception as error:
                reading.failures.append(f"{ROUTER_LOG}: unreadable ({type(error).__name__}: {error})")

    for record in reading.records:
        record.update(variant=variant, seed=seed)
    return reading


def expected_runs(
    run_dirs: Sequence[str | Path],
    variants: Sequence[str] | None,
    seeds: Sequence[int] | Mapping[str, Sequence[int]] | None,
) -> list[tuple[str, int, str | None]]:
    """Pair every expected ``(variant, seed)`` with its run directory (None when not given).

    ``seeds``: every variant's, or variant -> its own (``Record.seeds_by_variant``). Without
    ``variants``/``seeds`` the grid is taken from the run directories. A run directory outside the
    grid, or two for the same run, is a configuration error.
    """
    by_run: dict[tuple[str, int], str] = {}
    for run_dir in run_dirs:
        key = parse_run_dir(run_dir)
        if key in by_run:
            raise ConfigError(f"two run directories for {key}: {by_run[key]!r} and {str(run_dir)!r}")
        by_run[key] = str(run_dir)
    variants = list(variants) if variants else list(dict.fromkeys(v for v, _ in by_run))
    if not isinstance(seeds, Mapping):
        common = list(seeds) if seeds else sorted({s for _, s in by_run})
        seeds = {v: common for v in variants}
    grid = [(v, s) for v in variants for s in seeds[v]]
    unexpected = sorted(set(by_run) - set(grid))
    if unexpected:
        raise ConfigError(f"run directories outside the variants x seeds grid: {unexpected}")
    return [(v, s, by_run.get((v, s))) for v, s in grid]


def collect_runs(
    run_dirs: Sequence[str | Path],
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    routed: Mapping[str, bool] | None = None,
    splits: Sequence[str] = EVAL_SPLITS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return ``(tidy, status)`` for the expected runs.

    ``tidy.variant`` is an ordered categorical over all expected variants, so a variant
    without any usable run still appears (with n = 0) in the summaries. ``routed``: variant ->
    whether its router routes (``Record.routed``); without it each run's eval JSONs say. ``splits``: the
    evaluations every run must have (``Record.eval_splits``: a tuning study's runs are scored on validation only).
    """
    runs = expected_runs(run_dirs, variants, seeds)
    variant_order = list(dict.fromkeys(v for v, _, _ in runs))
    records, statuses = [], []
    for variant, seed, run_dir in runs:
        if run_dir is None:
            statuses.append(
                dict(
                    variant=variant,
                    seed=seed,
                    status=RUN_MISSING,
                    detail="no run directory given",
                    router=None,
                    run_dir=None,
                )
            )
            continue
        reading = read_run(run_dir, variant, seed, None if routed is None else routed[variant], splits)
        for record in reading.records:
            record["run_status"] = reading.status
        records += reading.records
        statuses.append(
            dict(
                variant=variant,
                seed=seed,
                status=reading.status,
                detail=reading.detail,
                router=reading.router,
                run_dir=reading.run_dir,
            )
        )

    tidy = pd.DataFrame.from_records(records, columns=TIDY_COLUMNS)
    tidy = tidy.astype(
        {
            "seed": "int64",
            "value": "float64",
            "split": "str",
            "metric": "str",
            "layer": "str",
            "source": "str",
            "run_status": "str",
        }
    )
    tidy["variant"] = pd.Categorical(tidy["variant"], categories=variant_order, ordered=True)
    status = pd.DataFrame.from_records(statuses, columns=STATUS_COLUMNS)
    return tidy, status


def usable(tidy: pd.DataFrame) -> pd.DataFrame:
    """Rows of successful, complete runs: the only ones that enter statistics."""
    return tidy[tidy["run_status"] == RUN_OK]


def variant_order(frame: pd.DataFrame) -> list[str]:
    """Variants in study order: the categorical order when set, else first appearance."""
    column = frame["variant"]
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(v) for v in column.cat.categories]
    return [str(v) for v in pd.unique(column)]


def _in_study_order(logs: pd.DataFrame, variants: Sequence[str] | None, what: str) -> pd.DataFrame:
    """`variant` as an ordered categorical in study order (unchanged when `variants` is None)."""
    if variants is not None:
        unknown = set(logs["variant"]) - set(variants)
        if unknown:
            raise ConfigError(f"{what} of variants outside {list(variants)}: {sorted(unknown)}")
        logs["variant"] = pd.Categorical(logs["variant"], categories=list(variants), ordered=True)
    return logs


def _read_run_logs(run_dirs: Iterable[str | Path], name: str, keep: set[tuple[str, int]] | None):
    """(variant, seed, log) for each run directory holding the parquet log `name`, restricted to `keep`."""
    for run_dir in run_dirs:
        variant, seed = parse_run_dir(run_dir)
        file = Path(run_dir) / name
        if (keep is None or (variant, seed) in keep) and file.is_file():
            yield variant, seed, pd.read_parquet(file)


def load_train_logs(
    run_dirs: Iterable[str | Path], keep: set[tuple[str, int]] | None = None, variants: Sequence[str] | None = None
) -> pd.DataFrame:
    """Concatenate the training logs of the given runs, with ``variant`` and ``seed`` columns.

    Columns are the union over runs (a flip-rate column of one router is NaN for the
    others); ``keep`` and ``variants`` work as in ``load_router_logs``. A resumed run can
    log a step twice: the last entry of each step is kept.
    """
    frames = [
        log.drop_duplicates("step", keep="last").assign(variant=variant, seed=seed)
        for variant, seed, log in _read_run_logs(run_dirs, TRAIN_LOG, keep)
    ]
    if frames:
        logs = pd.concat(frames, ignore_index=True)
        logs = logs[["variant", "seed", *(c for c in logs.columns if c not in ("variant", "seed"))]]
    else:
        logs = pd.DataFrame(
            {
                "variant": pd.Series(dtype="str"),
                "seed": pd.Series(dtype="int64"),
                "step": pd.Series(dtype="int64"),
                "loss": pd.Series(dtype="float64"),
            }
        )
    return _in_study_order(logs, variants, "training logs")


def load_router_logs(
    run_dirs: Iterable[str | Path], keep: set[tuple[str, int]] | None = None, variants: Sequence[str] | None = None
) -> pd.DataFrame:
    """Concatenate the router logs of the given runs, with ``variant`` and ``seed`` columns.

    Runs without a router log (unrouted, or missing) contribute nothing; ``keep``
    restricts the result to the listed ``(variant, seed)`` runs (e.g. the ok ones);
    ``variants`` makes ``variant`` an ordered categorical in study order (figure colours
    and legends then match the other figures).
    """
    # Each log has the index columns, then its router's declared state (Router.state_names); the union
    # over runs keeps every state, NaN where a router has no such state.
    frames = [
        log.assign(variant=variant, seed=seed) for variant, seed, log in _read_run_logs(run_dirs, ROUTER_LOG, keep)
    ]
    columns = ["variant", "seed", *ROUTER_LOG_INDEX]
    if frames:
        logs = pd.concat(frames, ignore_index=True)
        logs = logs[[*columns, *(c for c in logs.columns if c not in columns)]]
    else:
        logs = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns}).astype(
            {"variant": "str", "seed": "int64"}
        )
    return _in_study_order(logs, variants, "router logs")


# --------------------------------------------------------------------------- per-layer arrays and the tokenizer

LAYER_ARRAY_COLUMNS = ["variant", "seed", "layer", "load", *PER_LAYER_ARRAYS]


def _evaluations(run_dirs: Iterable[str | Path], split: str, keep: set[tuple[str, int]] | None):
    """(variant, seed, file, parsed JSON object) of each run's ``eval_{split}.json`` that exists, restricted to
    ``keep``; a file that is not a readable JSON object is a DataError naming it."""
    for run_dir in run_dirs:
        variant, seed = parse_run_dir(run_dir)
        file = Path(run_dir) / eval_file(split)
        if (keep is not None and (variant, seed) not in keep) or not file.is_file():
            continue
        try:
            evaluation = json.loads(file.read_text())
            if not isinstance(evaluation, dict):
                raise ValueError(f"a JSON {type(evaluation).__name__}, not an object")
        except (OSError, ValueError) as error:
            raise DataError(f"{file}: unreadable ({type(error).__name__}: {error}); rerun its evaluation") from None
        yield variant, seed, file, evaluation


def load_layer_arrays(
    run_dirs: Iterable[str | Path],
    split: str,
    keep: set[tuple[str, int]] | None = None,
    variants: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per (variant, seed, MoE layer) of the runs' ``eval_{split}.json``: the layer's ``load`` and its arrays
    of gtmoe.contract.PER_LAYER_ARRAYS (co-activation counts, top token ids and their counts) as nested lists, None
    where the file has none (an evaluation written before them, or more experts than the JSON keeps). ``keep`` and
    ``variants`` work as in ``load_router_logs``; a run without the file, or an unrouted one, adds no row."""
    rows = []
    for variant, seed, _, evaluation in _evaluations(run_dirs, split, keep):
        for entry in evaluation.get("per_layer") or []:
            row = {name: entry.get(name) for name in ("load", *PER_LAYER_ARRAYS)}
            rows.append(dict(variant=variant, seed=seed, layer=int(entry["layer"]), **row))
    arrays = pd.DataFrame(rows, columns=LAYER_ARRAY_COLUMNS).astype({"seed": "int64", "layer": "int64"})
    return _in_study_order(arrays, variants, "evaluations")


PROBE_COLUMNS = ["variant", "seed", "layer", "sets", "valid", "probe"]


def load_probe_routings(
    run_dirs: Iterable[str | Path], keep: set[tuple[str, int]] | None = None, variants: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per (variant, seed, MoE layer) of the final model's routing of the probe (gtmoe.probe), from the runs'
    ``eval_{PROBE_SPLIT}.json``: ``sets`` (tokens, experts) bool, ``valid`` (tokens,) bool and ``probe`` the probe
    blocks' sha256 (two runs routed the same tokens when it is equal). ``keep`` and ``variants`` work as in
    ``load_router_logs``; a run without the file or without a probe (unrouted, eval.probe_blocks 0, or evaluated
    before the probe existed) adds no row."""
    rows = []
    for variant, seed, file, evaluation in _evaluations(run_dirs, PROBE_SPLIT, keep):
        try:
            probe, n_experts = evaluation.get("probe"), int(evaluation.get("n_experts") or 0)
            if not probe or not n_experts:
                continue
            tokens = int(probe["tokens"])
            valid = unpack_expert_sets(probe["valid"], tokens, 1)[:, 0]
            for entry in evaluation.get("per_layer") or []:
                if entry.get("probe_sets"):
                    sets = unpack_expert_sets(entry["probe_sets"], tokens, n_experts)
                    rows.append(
                        dict(
                            variant=variant,
                            seed=seed,
                            layer=int(entry["layer"]),
                            sets=sets,
                            valid=valid,
                            probe=str(probe["blocks_sha256"]),
                        )
                    )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DataError(
                f"{file}: unreadable probe ({type(error).__name__}: {error}); rerun its evaluation"
            ) from None
    probes = pd.DataFrame(rows, columns=PROBE_COLUMNS).astype({"seed": "int64", "layer": "int64"})
    return _in_study_order(probes, variants, "evaluations")


# How a token reads in a table: its text with whitespace made visible.
VISIBLE_WHITESPACE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def read_tokenizer(path: str | Path) -> Callable[[int], str] | None:
    """The text of a token id under the study's tokenizer (``StudyLayout.tokenizer``, gtmoe.data's byte-level BPE),
    special tokens included, whitespace made visible; None when the file does not exist (ids are shown instead). A
    file that exists but cannot be read is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises its own error type for a corrupt file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise DataError(f"tokenizer {path} is unreadable ({reason}); rebuild it (snakemake does)") from None

    def decode(token_id: int) -> str:
        return tokenizer.decode([int(token_id)], skip_special_tokens=False).translate(VISIBLE_WHITESPACE)

    return decode


BASELINE_COLUMNS = ["model", "split", "metric", "value", "source"]


def read_baselines(path: str | Path | None) -> pd.DataFrame:
    """The n-gram reference models of ``python -m gtmoe baselines`` as a long table.

    One row per (model, split, metric) number of ``{"models": {model: {split: {metric: value}}}}``
    (``ppl``, ``word_ppl``, ``nll``, ``tokens``, ``words``), with its JSON pointer as ``source``.
    No path gives an empty table: the baselines are optional for the analysis commands.
    """
    if path is None:
        return pd.DataFrame(columns=BASELINE_COLUMNS)
    path = Path(path)
    try:
        models = json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path}: not an n-gram baseline file ({exc.__class__.__name__}: {exc}); "
            "rebuild it with `python -m gtmoe baselines`"
        ) from exc
    rows = [
        dict(
            model=model,
            split=split,
            metric=metric,
            value=float(value),
            source=f"{path}#/models/{model}/{split}/{metric}",
        )
        for model, result in models.items()
        for split in EVAL_SPLITS
        if split in result
        for metric, value in result[split].items()
        if _is_number(value)
    ]
    return pd.DataFrame(rows, columns=BASELINE_COLUMNS)


# --------------------------------------------------------------------------- each variant's router and options


def _option_column(values: list[object]) -> pd.Series:
    """One option over the variants: numbers as float (None as NaN), booleans or strings as they are; a
    column whose values mix types (across routers) as strings (JSON for a number, a boolean or a list)."""
    given = [v for v in values if v is not None]
    kinds = {"number" if _is_number(v) else type(v).__name__ for v in given}
    if kinds <= {"number"}:
        return pd.Series([math.nan if v is None else float(v) for v in values], dtype="float64")
    if kinds == {"bool"}:
        return pd.Series(values, dtype="boolean")
    if kinds == {"str"}:
        return pd.Series(values, dtype="object")
    return pd.Series([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], dtype="object")


def variant_columns(record: Record, reserved: Iterable[str] = ()) -> pd.DataFrame:
    """One row per variant of the study record, in study order: ``variant``, ``router`` and one column per
    router option any variant has (its resolved value; missing for a router without the option).

    An option named like a column of the tables it joins (the tidy table, ``reserved``) would overwrite
    it: a ConfigError naming the option and the variant.
    """
    taken = {*TIDY_COLUMNS, ROUTER, *reserved}
    names: list[str] = []
    for variant in record.variants:
        for name in record.options(variant):
            if name in taken:
                raise ConfigError(
                    f"router option '{name}' of variant '{variant}' ({record.router(variant)}) has the name of a "
                    f"column of the analysis tables ({', '.join(sorted(taken))}); the tables would lose it. "
                    "Rename the option in the router's Config"
                )
            if name not in names:
                names.append(name)
    table = pd.DataFrame(
        {"variant": pd.Series(record.variants, dtype="object"), ROUTER: [record.router(v) for v in record.variants]}
    )
    for name in names:
        table[name] = _option_column([record.options(v).get(name) for v in record.variants])
    return table


def join_variants(frame: pd.DataFrame, variants: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the columns of ``variant_columns`` looked up by its ``variant`` (missing for a row of
    no variant, e.g. a reference baseline of the summary); ``frame``'s rows, order and dtypes unchanged."""
    table = variants.set_index("variant")
    keys = frame["variant"].astype(str)
    columns = {name: keys.map(table[name]).astype(table[name].dtype) for name in table.columns}
    return frame.assign(**columns)
