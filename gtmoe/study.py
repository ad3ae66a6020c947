"""The study: `config.yaml` (after JSON-schema validation) resolved into one RunConfig per (variant, seed).

The Snakefile calls `Study.from_config(config)` at parse time, so every
semantic error (unknown router, k > E, duplicate variant, reference not in the
variants, sequence longer than the model's positions, ...) stops the workflow
before any job runs, naming the key and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gtmoe import routers, sweeps, tuning
from gtmoe.checks import fail, known_names
from gtmoe.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RouterConfig,
    RunConfig,
    TrainConfig,
    check,
    check_name,
    from_dict,
    load_yaml,
    memory_estimate_mb,
)
from gtmoe.contract import (
    EVAL_SPLITS,
    LOAD_METRICS,
    SPECIALISATION_METRICS,
    STABILITY_METRICS,
    STUDY_RECORD_FORMAT,
    UTILISATION_METRICS,
    StudyLayout,
)
from gtmoe.files import write_atomic

DEFAULT_STUDY_NAME = "default"
# config.yaml `statistics` defaults: the declared primary endpoints, test level and power of the MDD, the split
# the comparisons are made on, the confirmatory contrasts `[a, b]` (a − b; none here: they name variants, so
# config.yaml declares them) and each endpoint's equivalence margin for TOST, `{relative: x}` (x times b's mean)
# or `{absolute: x}` (config.yaml justifies the values).
STATISTICS_DEFAULTS = {
    "primary": ["ppl", "gini", "maxvio_global"],
    "alpha": 0.05,
    "power": 0.8,
    "split": "test",
    "contrasts": [],
    "margins": {"ppl": {"relative": 0.02}, "gini": {"absolute": 0.01}, "maxvio_global": {"absolute": 0.05}},
}
MARGIN_KINDS = ("relative", "absolute")  # a margin is a share of b's mean, or in the metric's own units
# The metrics a primary endpoint or a margin may name: what the evaluation writes per run.
ENDPOINT_METRICS = (
    "ppl",
    "word_ppl",
    "nll",
    *LOAD_METRICS,
    "router_saturation",
    *SPECIALISATION_METRICS,
    *UTILISATION_METRICS,
    *STABILITY_METRICS,
)
# config.yaml `findings` defaults: the training-horizon check, `{variant, longer, max_gain}` (the same router
# trained longer; none by default) that says how much perplexity more steps would still buy.
FINDINGS_DEFAULTS: dict[str, Any] = {"horizon": None}


@dataclass(frozen=True)
class Study:
    """The study, resolved once from the config into typed, frozen values: what `study.json` records."""

    name: str
    stage: str  # "confirmation" or "tuning" (gtmoe.tuning)
    layout: StudyLayout
    variants: Mapping[str, RouterConfig]  # name -> router and its options, resolved for the run's horizon
    seeds: tuple[int, ...]  # the runs' seeds: `seeds` in a confirmation study, `tuning.seeds` in a tuning study
    # variant -> the seeds it sets itself (`variants[].seeds`: more seeds where a contrast needs the power)
    seed_overrides: Mapping[str, tuple[int, ...]]
    eval_splits: tuple[str, ...]  # the splits every run is scored on (a tuning study never scores test)
    tuning: tuning.Tuning
    # variant -> the train settings it sets itself over the shared ones (`variants[].train`: a longer run)
    train_overrides: Mapping[str, Mapping[str, Any]]
    # variant -> the model sizes it sets itself (`variants[].model`: a FLOP-matched top-1 with twice d_expert)
    model_overrides: Mapping[str, Mapping[str, Any]]
    reference: str
    ablation_base: str | None
    ablations: tuple[str, ...]
    statistics: Mapping[str, Any]
    findings: Mapping[str, Any]
    sweeps: Mapping[str, tuple[str, ...]]  # sweep name -> its variants (base first)
    sweep_design: tuple[Mapping[str, Any], ...]  # one row per (sweep, option, value)
    sweep_of: Mapping[str, str]  # sweep point variant -> its sweep
    run: RunConfig  # the sections every run shares (model, train, data, eval); router and seed vary
    # Every name that becomes a target of the workflow -> the config key that set it.
    target_keys: Mapping[str, str]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Study:
        """Resolve and check the whole config (after its JSON schema), naming the key of any problem."""
        name = config.get("name", DEFAULT_STUDY_NAME)
        check_name(name, "name")
        layout = StudyLayout.for_study(name)
        shared = _shared_sections(config, layout)

        variants: dict[str, RouterConfig] = {}
        raw_variants: dict[str, dict[str, Any]] = {}
        train_overrides: dict[str, dict[str, Any]] = {}  # variant -> its own train settings over the shared ones
        model_overrides: dict[str, dict[str, Any]] = {}  # variant -> its own model sizes over the shared ones
        seed_overrides: dict[str, tuple[int, ...]] = {}  # variant -> its own confirmation seeds
        target_keys: dict[str, str] = {}
        entries = config.get("variants")
        check(isinstance(entries, list) and len(entries) > 0, "variants", entries, "must be a non-empty list")
        for i, entry in enumerate(entries):
            key = f"variants[{i}]"
            check(isinstance(entry, dict), key, entry, "must be a mapping with 'name' and 'router'")
            entry = dict(entry)
            variant = entry.pop("name", None)
            check_name(variant, f"{key}.name")
            check(variant not in raw_variants, f"{key}.name", variant, "duplicate variant name")
            router = entry.pop("router", None)
            check(isinstance(router, str), f"{key}.router", router, "must be a router name")
            routers.get(router, key=f"{key}.router")
            own_train, own_model = entry.pop("train", None), entry.pop("model", None)
            if "seeds" in entry:
                seed_overrides[variant] = tuple(tuning.variant_seeds(config, entry.pop("seeds"), f"{key}.seeds"))
            train, model = shared.train, shared.model
            if own_train is not None:
                train = _variant_train(shared.train, own_train, f"{key}.train")
                train_overrides[variant] = dict(own_train)
            if own_model is not None:
                model = _variant_model(shared.model, own_model, f"{key}.model")
                model_overrides[variant] = dict(own_model)
            raw_variants[variant] = {"name": router, **entry}
            variants[variant] = _router_config(router, entry, model, key, train.max_steps)
            target_keys[variant] = f"{key}.name"
        stage = tuning.stage_setting(config)
        tuned = tuning.tuning_settings(config, raw_variants, stage, shared.train.max_steps)
        for variant, own_seeds in seed_overrides.items():
            check(
                stage != "tuning",
                f"{target_keys[variant].removesuffix('.name')}.seeds",
                list(own_seeds),
                "a tuning study runs every variant on tuning.seeds alike (equal budgets)",
            )
        entries = config.get("sweeps")
        if stage == "tuning":  # the knobs are sweeps like any other: targets, dose-response, variants
            check(entries is None or isinstance(entries, list), "sweeps", entries, "must be a list of sweeps")
            entries = [*(entries or []), *tuned.sweep_entries()]
        # A sweep's points share the shared train settings: a base with its own is not swept (nor tuned), and no
        # point is taken for it (its options alone would not say that its runs differ).
        for i, entry in enumerate(entries or []):
            base = entry.get("base") if isinstance(entry, dict) else None
            if base in train_overrides or base in model_overrides:
                where = f"sweeps[{i}].base" if i < len(config.get("sweeps") or []) else "tuning.knobs"
                fail(
                    where,
                    base,
                    "has train or model settings of its own (variants[].train, .model): sweep or tune one without",
                )
        shared_variants = {
            v: raw for v, raw in raw_variants.items() if v not in train_overrides and v not in model_overrides
        }
        expansion = sweeps.expand(entries, shared_variants, shared.train.max_steps, every=raw_variants)
        sweep_of = {}
        for sweep, members in expansion.members.items():
            for member in members:
                if member in expansion.variants:
                    sweep_of[member] = sweep
        for variant, mapping in expansion.variants.items():
            options = {k: v for k, v in mapping.items() if k != "name"}
            variants[variant] = _router_config(mapping["name"], options, shared.model, "sweeps", shared.train.max_steps)
        n_configured = len(config.get("sweeps") or [])  # the tuning knobs' sweeps come after the configured ones
        for i, sweep in enumerate(expansion.members):
            target_keys[sweep] = (
                f"sweeps[{i}].name" if i < n_configured else f"tuning.knobs[{i - n_configured}].variant"
            )

        confirmation_seeds = tuning.confirmation_seeds(config)
        seeds = list(tuned.seeds) if stage == "tuning" else confirmation_seeds

        known = ", ".join(variants)
        reference = config.get("reference", "topk")
        check(reference in variants, "reference", reference, f"must be one of the variants: {known}")
        ablation = config.get("ablation") or {}
        base = ablation.get("base")
        members = list(ablation.get("variants", []))
        if base is not None:
            check(base in variants, "ablation.base", base, f"must be one of the variants: {known}")
        for member in members:
            check(member in variants, "ablation.variants", member, f"must be one of the variants: {known}")

        statistics = statistics_settings(config, variants, [(member, base) for member in members])
        if stage == "tuning":
            tuning.check_compared_are_tuned(tuned, statistics["contrasts"], raw_variants)
            statistics["split"] = tuning.TUNING_SPLIT  # whatever statistics.split says: test is for confirmation
        eval_splits = eval_splits_setting(config, stage, statistics["split"], swept=bool(expansion.members))
        study = cls(
            name=name,
            stage=stage,
            train_overrides=MappingProxyType({v: MappingProxyType(o) for v, o in train_overrides.items()}),
            model_overrides=MappingProxyType({v: MappingProxyType(o) for v, o in model_overrides.items()}),
            layout=layout,
            variants=MappingProxyType(variants),
            seeds=tuple(seeds),
            seed_overrides=MappingProxyType(seed_overrides),
            eval_splits=eval_splits,
            tuning=tuned,
            reference=reference,
            ablation_base=base,
            ablations=tuple(members),
            statistics=MappingProxyType(
                {
                    **statistics,
                    "primary": tuple(statistics["primary"]),
                    "contrasts": tuple(tuple(pair) for pair in statistics["contrasts"]),
                    "margins": MappingProxyType({m: MappingProxyType(x) for m, x in statistics["margins"].items()}),
                }
            ),
            findings=MappingProxyType(
                findings_settings(config, raw_variants, train_overrides, shared.train, model_overrides)
            ),
            sweeps=MappingProxyType({sweep: tuple(members) for sweep, members in expansion.members.items()}),
            sweep_design=tuple(MappingProxyType(row) for row in expansion.design),
            sweep_of=MappingProxyType(sweep_of),
            run=shared,
            target_keys=MappingProxyType(target_keys),
        )
        data = config.get("data", {})
        from gtmoe.data.corpus import CORPORA, DEFAULT_CORPUS

        corpus = data.get("corpus", DEFAULT_CORPUS)
        check(corpus in CORPORA, "data.corpus", corpus, f"must be one of {', '.join(CORPORA)}")
        seq_len = data.get("seq_len")
        model = shared.model
        check(
            seq_len <= model.max_seq_len, "data.seq_len", seq_len, f"must be <= model.max_seq_len = {model.max_seq_len}"
        )
        check(
            data.get("vocab_size") <= model.vocab_size,
            "data.vocab_size",
            data.get("vocab_size"),
            f"must be <= model.vocab_size = {model.vocab_size} (the embedding table)",
        )
        for variant in variants:  # every run config fits before any job starts (sections and options are checked)
            cfg = study.run_config(variant, seeds[0])
            try:
                cfg.check_size()
            except ConfigError as exc:
                # Name the variant: its router options came from variants[...], the rest from the shared sections.
                raise ConfigError(f"variant '{variant}': {exc}") from None
            check_memory(cfg, seq_len, config.get("resources") or {}, variant)
        return study

    @property
    def variant_names(self) -> list[str]:
        return list(self.variants)

    def variant_seeds(self, variant: str) -> tuple[int, ...]:
        """The seeds `variant` runs on: its own (`variants[].seeds`) or the study's."""
        return self.seed_overrides.get(variant, self.seeds)

    def runs(self) -> list[tuple[str, int]]:
        """Every (variant, seed) the study trains, in study order."""
        return [(v, s) for v in self.variants for s in self.variant_seeds(v)]

    def run_config(self, variant: str, seed: int) -> RunConfig:
        """The run config of (variant, seed): the shared sections with the variant's own train settings and model
        sizes, the variant's router, the seed."""
        train, model = self.run.train, self.run.model
        if variant in self.train_overrides:
            train = _variant_train(train, self.train_overrides[variant], f"variants.{variant}.train")
        if variant in self.model_overrides:
            model = _variant_model(model, self.model_overrides[variant], f"variants.{variant}.model")
        return dataclasses.replace(
            self.run,
            variant=variant,
            model=model,
            router=self.variants[variant],
            train=dataclasses.replace(train, seed=seed),
        )

    def record(self) -> dict[str, Any]:
        """The study as `study.json` records it (gtmoe.contract.STUDY_RECORD_FORMAT; docs/configuration.md)."""
        shared = self.run.to_dict()
        del shared["train"]["seed"], shared["variant"], shared["router"]
        variants = {}
        for variant, router in self.variants.items():
            entry = {"router": router.name, "options": dataclasses.asdict(router.resolve())}
            if variant in self.train_overrides:
                entry["train"] = dict(self.train_overrides[variant])
            if variant in self.model_overrides:
                entry["model"] = dict(self.model_overrides[variant])
            if variant in self.seed_overrides:
                entry["seeds"] = list(self.seed_overrides[variant])
            if variant in self.sweep_of:
                entry["sweep"] = self.sweep_of[variant]
            variants[variant] = entry
        return {
            "format": STUDY_RECORD_FORMAT,
            "name": self.name,
            "stage": self.stage,
            "root": self.layout.root,
            "seeds": list(self.seeds),
            "eval_splits": list(self.eval_splits),
            "reference": self.reference,
            "ablation": {"base": self.ablation_base, "variants": list(self.ablations)},
            "statistics": {
                **self.statistics,
                "primary": list(self.statistics["primary"]),
                "contrasts": [list(pair) for pair in self.statistics["contrasts"]],
                "margins": {metric: dict(margin) for metric, margin in self.statistics["margins"].items()},
            },
            "findings": dict(self.findings),
            "routers": {name: routers.describe(name) for name in dict.fromkeys(r.name for r in self.variants.values())},
            "variants": variants,
            "sweeps": [dict(row) for row in self.sweep_design],
            "tuning": {
                **self.tuning.record(),
                # The declared contrasts whose two variants are both tuned: their frontiers are compared.
                "pairs": [list(p) for p in tuning.frontier_pairs(self.tuning, self.statistics["contrasts"])],
            },
            "run": shared,
        }


def _shared_sections(config: dict[str, Any], layout: StudyLayout) -> RunConfig:
    """model, train, data and eval as every run shares them, typed and checked (router and seed vary per run)."""
    train = config.get("train")
    check(train is None or isinstance(train, dict), "train", train, "must be a mapping")
    shared = from_dict(
        RunConfig,
        {
            "variant": "shared",
            "model": copy.deepcopy(config.get("model", {})),
            "train": copy.deepcopy(train or {}),
            "eval": copy.deepcopy(config.get("eval", {})),
        },
        "",
    )
    shared = dataclasses.replace(shared, data=DataConfig(shards=layout.shards))
    shared.model.validate()
    shared.train.validate()
    shared.eval.validate()
    return shared


def _router_config(router: str, options: dict[str, Any], model: ModelConfig, key: str, max_steps: int) -> RouterConfig:
    """A variant's router with its options typed, checked (also against its model's sizes) and resolved for its
    run's horizon."""
    config = RouterConfig(router, dict(options))
    config.resolve(key).validate_for_model(model, key)
    return config.for_horizon(max_steps)


def eval_splits_setting(
    config: Mapping[str, Any], stage: str, statistics_split: str, *, swept: bool
) -> tuple[str, ...]:
    """The splits every run is scored on, in gtmoe.contract's order. A tuning study scores the validation split
    only, whatever `eval_splits` says (the test split is for confirmation). A confirmation study scores
    `eval_splits` (default both), which must hold the split its statistics are made on, and validation where it
    has sweeps (their best values are chosen there)."""
    if stage == "tuning":
        return (tuning.TUNING_SPLIT,)
    splits = config.get("eval_splits", list(EVAL_SPLITS))
    check(
        isinstance(splits, list)
        and len(splits) > 0
        and all(isinstance(s, str) and s in EVAL_SPLITS for s in splits)
        and len(set(splits)) == len(splits),
        "eval_splits",
        splits,
        f"must be a non-empty list of distinct splits from {', '.join(EVAL_SPLITS)}",
    )
    check(
        statistics_split in splits,
        "eval_splits",
        splits,
        f"must include statistics.split ({statistics_split}), the split the comparisons are made on",
    )
    check(
        not swept or tuning.TUNING_SPLIT in splits,
        "eval_splits",
        splits,
        f"must include {tuning.TUNING_SPLIT}: the study's sweeps choose their best values there",
    )
    return tuple(s for s in EVAL_SPLITS if s in splits)


# Model keys a variant may not set itself: the data stage (tokenizer, shards) is the study's, one for all variants.
SHARED_MODEL_KEYS = ("vocab_size", "max_seq_len")


def _variant_model(shared: ModelConfig, own: Any, key: str) -> ModelConfig:
    """A variant's model: the shared sizes with its own (`variants[i].model`) over them, checked; the vocabulary and
    the positions stay the study's, as its data does."""
    check(isinstance(own, Mapping) and len(own) > 0, key, own, "must be a non-empty mapping of model settings")
    for name in SHARED_MODEL_KEYS:
        check(name not in own, f"{key}.{name}", own.get(name), "is the study's, as its tokenizer and shards are")
    model = from_dict(ModelConfig, {**dataclasses.asdict(shared), **own}, key)
    model.validate(key)
    return model


def _variant_train(shared: TrainConfig, own: Any, key: str) -> TrainConfig:
    """A variant's train settings: the shared ones with its own (`variants[i].train`) over them, checked. The seed
    is not among them: it comes from `seeds`."""
    check(isinstance(own, Mapping) and len(own) > 0, key, own, "must be a non-empty mapping of train settings")
    check("seed" not in own, f"{key}.seed", own.get("seed"), "the seed comes from `seeds`, for every variant alike")
    train = from_dict(TrainConfig, {**dataclasses.asdict(shared), **own}, key)
    train.validate(key)
    return train


def run_config_from_record(record: Mapping[str, Any], variant: str, seed: int) -> RunConfig:
    """The run config of (variant, seed) from a study record (`read_record`), typed and checked."""
    check(variant in record["variants"], "--variant", variant, f"not a variant of study '{record['name']}'")
    entry = record["variants"][variant]
    check(
        seed in entry.get("seeds", record["seeds"]),
        "--seed",
        seed,
        f"not a seed of variant '{variant}' in study '{record['name']}'",
    )
    run = copy.deepcopy(record["run"])
    raw = {
        **run,
        "variant": variant,
        "router": {"name": entry["router"], **entry["options"]},
        "model": {**run["model"], **entry.get("model", {})},  # a variant's own model sizes
        "train": {**run["train"], **entry.get("train", {}), "seed": seed},  # a variant's own train settings
    }
    return from_dict(RunConfig, raw, "").validate()


def read_record(path: str | Path) -> dict[str, Any]:
    """Read a `study.json` the workflow wrote; a missing, malformed or foreign file is a ConfigError naming it."""
    path = Path(path)
    record = load_yaml(path, f"study record {path}")  # JSON is YAML; the strict, bounded reader
    check(
        isinstance(record, dict) and record.get("format") == STUDY_RECORD_FORMAT,
        str(path),
        record.get("format") if isinstance(record, dict) else record,
        f"is not a study record of format {STUDY_RECORD_FORMAT}; rerun snakemake to write it again",
    )
    return record


def write_record(study: Study) -> Path:
    """Write `study.json` into the study's root, atomically and only when its content changed (its mtime
    moves only when the study did, so the analysis reruns exactly then)."""
    path = Path(study.layout.record)
    text = json.dumps(study.record(), indent=2, ensure_ascii=False) + "\n"
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def check_memory(cfg: RunConfig, seq_len: int, resources: dict[str, Any], variant: str) -> None:
    """The `train` and `evaluate` jobs of `cfg` must fit their resources.<stage>.mem_mb by
    gtmoe.config.memory_estimate_mb (for a GPU job, gpu > 0: without the activations, which live on the device)."""
    for stage in ("train", "evaluate"):
        job = resources.get(stage) or {}
        limit = job.get("mem_mb")
        if not isinstance(limit, (int, float)) or isinstance(limit, bool):
            continue  # the schema requires it for the workflow; absent in in-process checks without resources
        estimate = memory_estimate_mb(cfg, seq_len, stage, activations=not job.get("gpu"))
        check(
            estimate <= limit,
            f"resources.{stage}.mem_mb",
            limit,
            f"variant '{variant}' needs an estimated {estimate:,.0f} MB for one {stage} job (model "
            f"{cfg.model.n_layers}x{cfg.model.d_model}, {cfg.model.n_experts} experts, vocab {cfg.model.vocab_size}, "
            f"batch {cfg.train.batch_size}x{seq_len}); shrink the model or batch, or raise resources.{stage}.mem_mb",
        )


def _with_defaults(config: dict[str, Any], section: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """A config section over its defaults (a copy); an unknown key or a non-mapping names the key."""
    given = config.get(section) or {}
    check(isinstance(given, dict), section, given, f"must be a mapping with {', '.join(defaults)}")
    for key in given:
        check(key in defaults, f"{section}.{key}", given[key], f"unknown key; expected {', '.join(defaults)}")
    return {**copy.deepcopy(defaults), **given}


def statistics_settings(
    config: dict[str, Any], variants: Collection[str] = (), ablation_pairs: Iterable[tuple[str, str]] = ()
) -> dict[str, Any]:
    """The `statistics` section with defaults filled in, checked: primary endpoints must be metrics
    the evaluation writes, 0 < alpha < power < 1, every contrast names two different variants of `variants` once
    (and is not one of the ablation family's `ablation_pairs`, `(ablation, base)`), and every primary endpoint
    has one margin > 0."""
    settings = _with_defaults(config, "statistics", STATISTICS_DEFAULTS)
    check(
        settings["split"] in EVAL_SPLITS,
        "statistics.split",
        settings["split"],
        f"must be an evaluation split: {', '.join(EVAL_SPLITS)}",
    )
    known = ENDPOINT_METRICS
    primary = settings["primary"]
    check(isinstance(primary, list), "statistics.primary", primary, "must be a list of metric names")
    check(
        len(primary) > 0,
        "statistics.primary",
        primary,
        "must name at least one metric (the confirmatory endpoints; leave the key out for the default "
        f"{', '.join(STATISTICS_DEFAULTS['primary'])})",
    )
    for metric in primary:
        check(metric in known, "statistics.primary", metric, f"unknown metric; known: {known_names(known, metric)}")
    check(len(set(primary)) == len(primary), "statistics.primary", primary, "metrics must be unique")
    for key in ("alpha", "power"):
        value = settings[key]
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1,
            f"statistics.{key}",
            value,
            "must be a number strictly between 0 and 1",
        )
    check(
        settings["power"] > settings["alpha"],
        "statistics.power",
        settings["power"],
        f"must exceed statistics.alpha = {settings['alpha']} (the power of a test at no difference)",
    )
    settings["contrasts"] = _contrasts(settings["contrasts"], variants, ablation_pairs)
    # Per metric over the defaults: a config that declares one margin keeps the others'.
    margins = settings["margins"]
    if isinstance(margins, dict):
        margins = {**STATISTICS_DEFAULTS["margins"], **margins}
    settings["margins"] = _margins(margins, primary)
    return settings


def _contrasts(contrasts: Any, variants: Collection[str], ablation_pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
    """`statistics.contrasts`, checked: a list of `[a, b]` pairs of two different variants, each pair once in
    either order and none already in the ablation family."""
    check(isinstance(contrasts, list), "statistics.contrasts", contrasts, "must be a list of [a, b] variant pairs")
    known = ", ".join(variants)
    ablations = {frozenset(pair): pair for pair in ablation_pairs}
    seen: dict[frozenset, int] = {}
    for i, pair in enumerate(contrasts):
        key = f"statistics.contrasts[{i}]"
        check(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair),
            key,
            pair,
            "must be a pair [a, b] of variant names (the contrast a − b)",
        )
        for variant in pair:
            check(variant in variants, key, pair, f"'{variant}' is not a variant; known: {known}")
        check(pair[0] != pair[1], key, pair, "compares a variant with itself")
        members = frozenset(pair)
        if members in seen:
            fail(key, pair, f"duplicates statistics.contrasts[{seen[members]}] (a − b and b − a are one)")
        if members in ablations:
            ablation, base = ablations[members]
            fail(key, pair, f"is in the ablation family already ({ablation} − {base}, from ablation)")
        seen[members] = i
    return [list(pair) for pair in contrasts]


def _margins(margins: Any, primary: list[str]) -> dict[str, dict[str, float]]:
    """`statistics.margins`, checked: metric -> one of `{relative: x}` (0 < x < 1) or `{absolute: x}` (x > 0,
    finite), and one for every primary endpoint."""
    check(
        isinstance(margins, dict), "statistics.margins", margins, "must map metrics to {relative: x} or {absolute: x}"
    )
    for metric, margin in margins.items():
        key = f"statistics.margins.{metric}"
        check(
            metric in ENDPOINT_METRICS, key, margin, f"unknown metric; known: {known_names(ENDPOINT_METRICS, metric)}"
        )
        check(
            isinstance(margin, dict) and len(margin) == 1 and next(iter(margin)) in MARGIN_KINDS,
            key,
            margin,
            "must be {relative: x} (a share of b's mean) or {absolute: x} (in the metric's units)",
        )
        kind, value = next(iter(margin.items()))
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"),
            f"{key}.{kind}",
            value,
            "must be a finite number > 0 (the equivalence margin ±m)",
        )
        check(kind != "relative" or value < 1, f"{key}.{kind}", value, "a relative margin must be < 1 (a share)")
    for metric in primary:
        check(
            metric in margins,
            f"statistics.margins.{metric}",
            None,
            "every primary endpoint needs an equivalence margin, {relative: x} or {absolute: x} (TOST)",
        )
    return {metric: {kind: float(value) for kind, value in margin.items()} for metric, margin in margins.items()}


def findings_settings(
    config: dict[str, Any],
    raw_variants: Mapping[str, Mapping[str, Any]] | None = None,
    train_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    shared_train: TrainConfig | None = None,
    model_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `findings` section with defaults filled in, checked. `horizon`, when set, names a variant and
    `longer`, the same router with the same options trained for more steps (`variants[].train.max_steps`), and
    `max_gain`, the relative perplexity gain of the longer run beyond which the study is flagged as trained too
    short."""
    settings = _with_defaults(config, "findings", FINDINGS_DEFAULTS)
    horizon = settings["horizon"]
    if horizon is None:
        return settings
    raw_variants, train_overrides, model_overrides = raw_variants or {}, train_overrides or {}, model_overrides or {}
    check(
        isinstance(horizon, dict) and set(horizon) == {"variant", "longer", "max_gain"},
        "findings.horizon",
        horizon,
        "must be a mapping with variant, longer and max_gain (or null)",
    )
    for key in ("variant", "longer"):
        check(
            horizon[key] in raw_variants,
            f"findings.horizon.{key}",
            horizon[key],
            f"must be one of the variants: {', '.join(raw_variants)}",
        )
    short, long = horizon["variant"], horizon["longer"]
    check(
        raw_variants[short] == raw_variants[long] and model_overrides.get(short) == model_overrides.get(long),
        "findings.horizon.longer",
        long,
        f"must be '{short}' trained longer: the same router and options ({raw_variants[short]} here, "
        f"{raw_variants[long]} there)",
    )

    def steps(variant: str) -> int:
        own = train_overrides.get(variant, {})
        return int(own.get("max_steps", shared_train.max_steps if shared_train else 0))

    check(
        steps(long) > steps(short),
        "findings.horizon.longer",
        long,
        f"trains {steps(long)} steps, not more than '{short}' ({steps(short)}): set its variants[].train.max_steps",
    )

    def others(variant: str) -> dict[str, Any]:  # what else its own train settings change
        return {k: v for k, v in train_overrides.get(variant, {}).items() if k not in ("max_steps", "checkpoint_every")}

    check(
        others(long) == others(short),
        "findings.horizon.longer",
        long,
        f"must differ from '{short}' in train.max_steps (and checkpoint_every) only; other train settings: "
        f"{others(long)} against {others(short)}",
    )
    gain = horizon["max_gain"]
    check(
        isinstance(gain, (int, float)) and not isinstance(gain, bool) and 0 < gain < 1,
        "findings.horizon.max_gain",
        gain,
        "must be a number strictly between 0 and 1 (a share of the perplexity)",
    )
    settings["horizon"] = {"variant": short, "longer": long, "max_gain": float(gain)}
    return settings


def corpus_problem(data: dict[str, Any], workdir: str | Path = ".") -> str | None:
    """Why the configured corpus cannot be read, or None; cheap enough to run at parse time.

    Checked whenever the local files will be used: source 'local', or 'auto' with all
    three files in data.local_dir. Without them, 'auto' falls back to the Hugging Face
    hub, which only the corpus job can try (its error names the directory and the hub).
    A split file that is empty or holds only blank lines is rejected here, naming it;
    the corpus job also checks every file's published sha256.
    """
    from gtmoe.data.corpus import CORPORA, DEFAULT_CORPUS

    source, local_dir = data.get("source", "auto"), data.get("local_dir")
    spec = CORPORA.get(data.get("corpus", DEFAULT_CORPUS))
    if spec is None:
        return f"config key 'data.corpus' = {data.get('corpus')!r}: must be one of {', '.join(CORPORA)}"
    if source == "hub" or (source == "auto" and not local_dir):
        return None
    if not local_dir:
        return "config key 'data.local_dir' = None: data.source is 'local' but no directory is given"
    path = Path(workdir) / local_dir
    missing = [name for name in spec.local_files.values() if not (path / name).is_file()]
    if missing and source == "auto":
        return None
    if missing:
        return (
            f"config key 'data.local_dir' = {local_dir!r}: missing {', '.join(missing)} in {path.resolve()}; "
            f"set data.source: hub to download {spec.name} from the Hugging Face hub instead"
        )
    for split, name in spec.local_files.items():
        file = path / name
        if _only_blank_lines(file):
            return (
                f"config key 'data.local_dir' = {local_dir!r}: the {split} split {file.resolve()} is empty "
                f"({file.stat().st_size} bytes, no non-blank line); restore the original {spec.name} file "
                f"(checksums: {spec.checksums_from}), or set data.source: hub to download it"
            )
    return None


def _only_blank_lines(path: Path) -> bool:
    """True if `path` has no line with a non-whitespace character (reads up to the first such line)."""
    with open(path, "rb") as handle:
        return not any(line.strip() for line in handle)
