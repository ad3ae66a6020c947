"""Typed run configuration: dataclasses loaded from YAML and validated.

One run = one (variant, seed). The workflow resolves `config.yaml` into one
`RunConfig` per run and writes it next to the run's outputs; the engine reads
only that file. Every error names the dotted key and the offending value.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _fail(key: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def check(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise a ConfigError naming `key` and `value` unless `ok`."""
    if not ok:
        _fail(key, value, why)


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 128
    positional: str = "rope"  # "rope" | "learned"
    dropout: float = 0.0
    moe_every: int = 1  # every n-th block's FFN is an MoE layer (1 = all of them)
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 256  # hidden size of one SwiGLU expert

    def validate(self, prefix: str = "model") -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "moe_every", "n_experts", "top_k", "d_expert"):
            value = getattr(self, name)
            check(value > 0, f"{prefix}.{name}", value, "must be > 0")
        check(self.vocab_size >= 258, f"{prefix}.vocab_size", self.vocab_size,
              "must be >= 258 (256 byte symbols + <unk> + <|endoftext|>)")
        check(self.d_model % self.n_heads == 0, f"{prefix}.d_model", self.d_model,
              f"must be divisible by model.n_heads = {self.n_heads}")
        check((self.d_model // self.n_heads) % 2 == 0 or self.positional != "rope", f"{prefix}.d_model", self.d_model,
              "head dimension d_model / n_heads must be even for rotary positions")
        check(self.positional in ("rope", "learned"), f"{prefix}.positional", self.positional, "must be 'rope' or 'learned'")
        check(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        check(self.top_k <= self.n_experts, f"{prefix}.top_k", self.top_k,
              f"must be <= model.n_experts = {self.n_experts}")


@dataclass
class RouterConfig:
    """The router's registered name plus its own options (validated by the router's Config dataclass)."""

    name: str = "topk"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Any, prefix: str = "router") -> "RouterConfig":
        check(isinstance(raw, dict), prefix, raw, "must be a mapping with at least 'name'")
        raw = dict(raw)
        name = raw.pop("name", None)
        check(isinstance(name, str), f"{prefix}.name", name, "must be a router name (string)")
        cfg = cls(name=name, options=raw)
        cfg.resolve(prefix)  # fail early on unknown names / options
        return cfg

    def resolve(self, prefix: str = "router"):
        """The router's typed options (its `Config` dataclass), validated."""
        from gtmoe import routers

        entry = routers.get(self.name, key=f"{prefix}.name")
        options = from_dict(entry.Config, self.options, prefix)
        options.validate(prefix)
        return options

    def for_horizon(self, max_steps: int) -> "RouterConfig":
        """Resolve options that depend on the run's length (e.g. the loss-free bias rate) to numbers, so the
        run config records what the run used; returns self."""
        self.options.update(self.resolve().at_horizon(max_steps))
        self.resolve()
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.resolve())}


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    checkpoint_every: int = 100
    saturation_checkpoint: float = 0.5  # fraction of max_steps at which a checkpoint is kept for router saturation
    log_every: int = 10
    router_log_every: int = 10
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    compile: bool = False
    nonfinite: str = "stop"  # "stop": raise naming the step; "skip": drop that step's update (costs one host sync per step)
    max_skipped_steps: int = 10

    def validate(self, prefix: str = "train") -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every", "router_log_every", "max_skipped_steps"):
            value = getattr(self, name)
            check(value > 0, f"{prefix}.{name}", value, "must be > 0")
        check(self.seed >= 0, f"{prefix}.seed", self.seed, "must be >= 0")
        check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(0 <= self.warmup_steps < self.max_steps, f"{prefix}.warmup_steps", self.warmup_steps,
              f"must be in [0, train.max_steps = {self.max_steps})")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, f"{prefix}.beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, f"{prefix}.beta2", self.beta2, "must be in [0, 1)")
        check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0")
        check(0 < self.saturation_checkpoint < 1, f"{prefix}.saturation_checkpoint", self.saturation_checkpoint,
              "must be in (0, 1)")
        check(self.device in ("auto", "cpu", "cuda"), f"{prefix}.device", self.device, "must be 'auto', 'cpu' or 'cuda'")
        check(self.nonfinite in ("stop", "skip"), f"{prefix}.nonfinite", self.nonfinite, "must be 'stop' or 'skip'")


@dataclass
class DataConfig:
    shards: str = "results/data/shards"  # directory holding one shard directory per split

    def validate(self, prefix: str = "data") -> None:
        check(bool(self.shards), f"{prefix}.shards", self.shards, "must be a directory path")


@dataclass
class EvalConfig:
    # Blocks evaluated per split (0 = all): evenly spaced over the split, the same for every run.
    # Routing groups are always the training micro-batch (train.batch_size blocks).
    max_blocks: dict[str, int] = field(default_factory=lambda: {"validation": 0, "test": 0})
    # Router saturation needs a second forward pass (the intermediate checkpoint); it is
    # estimated on the first `saturation_blocks` evaluated blocks (0 = all of them).
    saturation_blocks: int = 512

    def validate(self, prefix: str = "eval") -> None:
        for split, blocks in self.max_blocks.items():
            check(split in ("train", "validation", "test"), f"{prefix}.max_blocks", split,
                  "keys must be splits: train, validation, test")
            check(isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 0,
                  f"{prefix}.max_blocks.{split}", blocks, "must be an integer >= 0 (0 = the whole split)")
        check(self.saturation_blocks >= 0, f"{prefix}.saturation_blocks", self.saturation_blocks, "must be >= 0")


@dataclass
class RunConfig:
    variant: str = "topk"
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "RunConfig":
        check(bool(self.variant) and isinstance(self.variant, str), "variant", self.variant, "must be a non-empty name")
        self.model.validate()
        self.train.validate()
        self.router.for_horizon(self.train.max_steps)
        self.data.validate()
        self.eval.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["router"] = self.router.to_dict()
        return out


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is not None:
        return isinstance(value, origin)
    if annotation is float:  # YAML writes 1 for 1.0; ints are fine where floats are expected
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is type(None):
        return value is None
    return isinstance(value, annotation)


def from_dict(cls: type, raw: Any, prefix: str):
    """Build dataclass `cls` from a mapping: unknown keys and wrong types are errors naming the key."""
    if raw is None:
        raw = {}
    check(isinstance(raw, dict), prefix or "config", raw, f"must be a mapping of {cls.__name__} options")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            _fail(where, raw[key], f"unknown key; known keys here: {', '.join(sorted(known))}")
    values = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else key
        annotation = hints[key]
        if annotation is RouterConfig:
            values[key] = RouterConfig.from_mapping(value, where)
        elif dataclasses.is_dataclass(annotation):
            values[key] = from_dict(annotation, value, where)
        else:
            if annotation is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            check(_type_ok(value, annotation), where, value, f"must be of type {getattr(annotation, '__name__', annotation)}")
            values[key] = value
    return cls(**values)


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run's YAML (as the workflow writes it)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"run config {path} does not exist") from None
    return from_dict(RunConfig, raw, "").validate()


def parse_run_config(text: str, origin: str) -> RunConfig:
    """Validate a run config given as JSON text (`origin` names where it came from, for the error)."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{origin} is not valid JSON ({exc})") from None
    return from_dict(RunConfig, raw, "").validate()


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
