"""The study: `config.yaml` (after JSON-schema validation) resolved into one RunConfig per (variant, seed).

The Snakefile calls `Study.from_config(config)` at parse time, so every
semantic error (unknown router, k > E, duplicate variant, reference not in the
variants, sequence longer than the model's positions, ...) stops the workflow
before any job runs, naming the key and the value.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtmoe import routers, sweeps
from gtmoe.config import (
    INT64_LIMIT,
    ConfigError,
    RunConfig,
    TrainConfig,
    check,
    check_numbers,
    from_dict,
    memory_estimate_mb,
)
from gtmoe.contract import LOAD_METRICS

STILL_LEARNING_SLOPE = 1.0  # default of config.yaml findings.still_learning_slope
# Matched with fullmatch (`$` alone would also accept a trailing newline); <= 64 characters keeps run
# directories, rule names and file names far below file-system limits.
VARIANT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# config.yaml `statistics` defaults: the declared primary endpoints, test level and power of the MDD.
STATISTICS_DEFAULTS = {"primary": ["ppl", "gini", "maxvio_global"], "alpha": 0.05, "power": 0.8}


@dataclass
class Study:
    raw: dict[str, Any]
    variants: dict[str, dict[str, Any]]  # name -> router mapping (name + options)
    seeds: list[int]
    reference: str
    ablation_base: str | None
    ablations: list[str]
    statistics: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(STATISTICS_DEFAULTS))
    sweeps: dict[str, list[str]] = field(default_factory=dict)  # sweep name -> its variants (base first)
    sweep_design: list[dict[str, Any]] = field(default_factory=list)  # one row per (sweep, option, value)
    # Every name that becomes a target of the workflow -> the config key that set it.
    target_keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict[str, Any], shards_dir: str = "results/data/shards") -> Study:
        variants: dict[str, dict[str, Any]] = {}
        target_keys: dict[str, str] = {}
        entries = config.get("variants")
        check(isinstance(entries, list) and len(entries) > 0, "variants", entries, "must be a non-empty list")
        for i, entry in enumerate(entries):
            key = f"variants[{i}]"
            check(isinstance(entry, dict), key, entry, "must be a mapping with 'name' and 'router'")
            entry = dict(entry)
            name = entry.pop("name", None)
            check(
                isinstance(name, str) and bool(VARIANT_NAME.fullmatch(name)),
                f"{key}.name",
                name,
                "must start with a letter, contain only letters, digits and '_', and be at most 64 characters",
            )
            check(name not in variants, f"{key}.name", name, "duplicate variant name")
            router = entry.pop("router", None)
            check(isinstance(router, str), f"{key}.router", router, "must be a router name")
            options = from_dict(routers.get(router, key=f"{key}.router").Config, entry, key)
            check_numbers(options, key)
            options.validate(key)
            variants[name] = {"name": router, **entry}
            target_keys[name] = f"{key}.name"
        # Sweep points are resolved for the run's length (e.g. the loss-free bias rate), so the horizon is
        # needed here; an invalid max_steps is reported by the run-config check below.
        max_steps = (config.get("train") or {}).get("max_steps", TrainConfig.max_steps)
        expansion = sweeps.expand(
            config.get("sweeps"), variants, max_steps if isinstance(max_steps, int) and max_steps > 0 else 1
        )
        variants.update(expansion.variants)
        target_keys.update({name: f"sweeps[{i}].name" for i, name in enumerate(expansion.members)})

        seeds = config.get("seeds")
        check(isinstance(seeds, list) and len(seeds) > 0, "seeds", seeds, "must be a non-empty list of integers")
        for seed in seeds:
            check(
                isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < INT64_LIMIT,
                "seeds",
                seeds,
                "every seed must be an integer in [0, 2**63)",
            )
        check(len(set(seeds)) == len(seeds), "seeds", seeds, "seeds must be unique")

        reference = config.get("reference", "topk")
        check(reference in variants, "reference", reference, f"must be one of the variants: {', '.join(variants)}")
        ablation = config.get("ablation") or {}
        base = ablation.get("base")
        members = list(ablation.get("variants", []))
        if base is not None:
            check(base in variants, "ablation.base", base, f"must be one of the variants: {', '.join(variants)}")
        for name in members:
            check(name in variants, "ablation.variants", name, f"must be one of the variants: {', '.join(variants)}")

        findings = config.get("findings") or {}
        slope = findings.get("still_learning_slope", STILL_LEARNING_SLOPE)
        check(
            isinstance(slope, (int, float)) and not isinstance(slope, bool) and 0 < slope < float("inf"),
            "findings.still_learning_slope",
            slope,
            "must be a finite number > 0 (nats per 1000 steps)",
        )

        study = cls(
            config,
            variants,
            list(seeds),
            reference,
            base,
            members,
            statistics_settings(config),
            expansion.members,
            expansion.design,
            target_keys,
        )
        data = config.get("data", {})
        from gtmoe.data.corpus import CORPORA, DEFAULT_CORPUS

        corpus = data.get("corpus", DEFAULT_CORPUS)
        check(corpus in CORPORA, "data.corpus", corpus, f"must be one of {', '.join(CORPORA)}")
        seq_len = data.get("seq_len")
        for name in variants:  # validate every run config before any job starts
            cfg = study.run_config(name, seeds[0], shards_dir)
            check(
                seq_len <= cfg.model.max_seq_len,
                "data.seq_len",
                seq_len,
                f"must be <= model.max_seq_len = {cfg.model.max_seq_len}",
            )
            check(
                data.get("vocab_size") <= cfg.model.vocab_size,
                "data.vocab_size",
                data.get("vocab_size"),
                f"must be <= model.vocab_size = {cfg.model.vocab_size} (the embedding table)",
            )
            check_memory(cfg, seq_len, config.get("resources") or {}, name)
        return study

    @property
    def variant_names(self) -> list[str]:
        return list(self.variants)

    @property
    def still_learning_slope(self) -> float:
        """Final training-loss slope (nats per 1000 steps) above which the findings flag "still learning"."""
        return float((self.raw.get("findings") or {}).get("still_learning_slope", STILL_LEARNING_SLOPE))

    def run_config(self, variant: str, seed: int, shards_dir: str) -> RunConfig:
        raw = self.raw
        resolved = {
            "variant": variant,
            "model": copy.deepcopy(raw.get("model", {})),
            "router": copy.deepcopy(self.variants[variant]),
            "train": {**copy.deepcopy(raw.get("train", {})), "seed": seed},
            "data": {"shards": str(shards_dir)},
            "eval": copy.deepcopy(raw.get("eval", {})),
        }
        try:
            return from_dict(RunConfig, resolved, "").validate()
        except ConfigError as exc:
            # Name the variant: its router options came from variants[...], the rest from the shared sections.
            raise ConfigError(f"variant '{variant}': {exc}") from None


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


def statistics_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The `statistics` section with defaults filled in, checked: primary endpoints must be metrics
    the evaluation writes, and 0 < alpha < power < 1."""
    given = config.get("statistics") or {}
    check(isinstance(given, dict), "statistics", given, "must be a mapping with primary, alpha, power")
    for key in given:
        check(
            key in STATISTICS_DEFAULTS,
            f"statistics.{key}",
            given[key],
            f"unknown key; expected {', '.join(STATISTICS_DEFAULTS)}",
        )
    settings = {**copy.deepcopy(STATISTICS_DEFAULTS), **given}
    known = ("ppl", "word_ppl", "nll", *LOAD_METRICS, "router_saturation")
    primary = settings["primary"]
    check(isinstance(primary, list), "statistics.primary", primary, "must be a list of metric names")
    for metric in primary:
        check(metric in known, "statistics.primary", metric, f"unknown metric; known: {', '.join(known)}")
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
