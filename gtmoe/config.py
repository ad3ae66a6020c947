"""Typed run configuration: dataclasses loaded from YAML and validated.

One run = one (variant, seed). The workflow resolves `config.yaml` into one
`RunConfig` per run and writes it next to the run's outputs; the engine reads
only that file. Every error names the dotted key and the offending value.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import stat
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gtmoe.checks import ConfigError, check, check_name, fail, short_repr  # noqa: F401  (re-exported)
from gtmoe.contract import (
    MAX_COACTIVATION_EXPERTS,
    MAX_PROBE_BLOCKS,
    MAX_ROUTING_SNAPSHOTS,
    weight_config,  # noqa: F401  (re-exported)
)

# ------------------------------------------------------------------ strict YAML

MAX_YAML_BYTES = 1 << 20  # a config file is a few KB; refuse anything over 1 MiB before parsing it


# Keys that switch on YTE templating (Python expressions in a config file: Snakemake renders any YAML config
# with a top-level `__use_yte__: true` as it loads it) or that only a YTE template uses. Refused anywhere.
TEMPLATING_KEYS = ("__use_yte__", "__definitions__", "__variables__")


def templating_refused(key: Any) -> str | None:
    """Why a mapping key is refused as a templating switch, or None."""
    if isinstance(key, str) and key.strip().lower() in TEMPLATING_KEYS:
        return (
            f"key {short_repr(key)} enables YTE templating (Python code run from a config file), which is refused; "
            "remove it and write the values out"
        )
    return None


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate mapping keys, YAML anchors/aliases, merge keys and YTE templating
    keys (TEMPLATING_KEYS).

    Aliases are refused outright (not just limited): a few hundred bytes of nested aliases
    expand to gigabytes once anything walks the value, and no gtmoe config needs them.
    """

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            kind, name = (
                ("alias", f"*{event.anchor}") if isinstance(event, yaml.AliasEvent) else ("anchor", f"&{event.anchor}")
            )
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"YAML {kind} {name} is not accepted (anchors and aliases are refused); write the value out in full",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.constructor.ConstructorError(
                        None, None, "YAML merge key '<<' is not accepted; write the keys out", key_node.start_mark
                    )
                key = self.construct_object(key_node, deep=True)
                if refused := templating_refused(key):
                    raise yaml.constructor.ConstructorError(None, None, refused, key_node.start_mark)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeLoader reports it below
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {short_repr(key)} (first on line {first}); keep only one",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        if len(str(node.value)) > 40:  # far beyond int64; Python would refuse to parse > 4300 digits anyway
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(str(node.value))} characters is out of range", node.start_mark
            )
        return super().construct_yaml_int(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def _unique_json_keys(pairs: list[tuple[str, Any]], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if refused := templating_refused(key):
            raise ConfigError(f"{where}: {refused}")
        if key in out:
            raise ConfigError(f"{where}: duplicate key {short_repr(key)} in a JSON object; keep only one")
        out[key] = value
    return out


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int, where: str) -> ConfigError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    return ConfigError(f"{where} is {kind}, not a regular file; pass the YAML config file itself")


def _read_config_file(path: Path, where: str) -> bytes:
    """The bytes of a config file: a regular file of at most MAX_YAML_BYTES, counted as read (a device or a file
    of /proc says size 0). A FIFO, device or socket is refused before it is opened (a FIFO would block the
    open, /dev/zero never ends); opened with O_NONBLOCK, and checked again, in case it was swapped meanwhile."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{where} is a directory, not a YAML file; pass the config file itself")
    if not stat.S_ISREG(mode):
        raise _not_regular(mode, where)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as stream:
        mode = os.fstat(stream.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(mode, where)
        data = stream.read(MAX_YAML_BYTES + 1)  # a regular file: read() returns what is there, up to the bound
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{where} holds more than {MAX_YAML_BYTES} bytes, the limit for a config file; is it the right file?"
        )
    return data


def load_yaml(source: str | Path, origin: str | None = None) -> Any:
    """Parse YAML strictly (StrictLoader): `source` is a file if a Path, else the YAML text itself.

    Every problem is a ConfigError naming the file (or `origin`) and the line: a missing file, a
    directory, a FIFO, device or socket, an unreadable file or one over MAX_YAML_BYTES (counted as read),
    malformed YAML, a duplicate key, an anchor or alias.
    """
    if isinstance(source, Path):
        where = origin or str(source)
        try:
            text = _read_config_file(source, where).decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{where} does not exist") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); pass the YAML config file"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot read {where}: {exc.strerror or exc}; check the path and its permissions"
            ) from None
    else:
        where, text = origin or "<config>", source
        if len(text) > MAX_YAML_BYTES:
            raise ConfigError(f"{where} is {len(text)} characters, over the {MAX_YAML_BYTES} limit for a config")
    if text.lstrip().startswith("{"):  # a JSON config (Snakemake accepts those too; JSON may hold tabs YAML refuses)
        try:
            return json.loads(text, object_pairs_hook=lambda pairs: _unique_json_keys(pairs, where))
        except json.JSONDecodeError:
            pass  # YAML flow mapping: parsed below
        except ConfigError:
            raise
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ConfigError(f"{where}: invalid JSON: {short_repr(str(exc))}") from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None
    except (ValueError, RecursionError) as exc:  # e.g. nesting deeper than Python's recursion limit
        problem = "nested too deeply" if isinstance(exc, RecursionError) else short_repr(str(exc))
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None


# ------------------------------------------------------------------ bounds

INT64_LIMIT = 2**63  # every integer option must fit a signed 64-bit integer (seeds: [0, 2**63))
# Hard caps, checked before anything is allocated: far beyond what one device can train, so they only stop
# typos and absurd values (`n_experts: 100000`, `max_seq_len: 1000000000`); memory_estimate_mb checks the rest.
MODEL_LIMITS = {
    "vocab_size": 1 << 20,
    "d_model": 1 << 16,
    "n_layers": 1024,
    "n_heads": 1024,
    "max_seq_len": 1 << 20,
    "moe_every": 1024,
    "n_experts": 4096,
    "top_k": 4096,
    "d_expert": 1 << 18,
    "n_shared_experts": 4096,
}
# The model sizes that may be 0 (every other size of MODEL_LIMITS must be > 0): no shared experts.
MODEL_SIZES_ALLOWING_ZERO = ("n_shared_experts",)
TRAIN_LIMITS = {"batch_size": 1 << 16, "grad_accum": 1 << 16}
# torch's grouped_mm (the MoE experts' matmuls, gtmoe.moe) refuses operands whose rows are not a multiple of 16
# bytes: d_model and d_expert must be multiples of 4 in fp32 and of 8 in bf16 (CUDA autocast); 8 covers both.
GROUPED_MM_MULTIPLE = 8


def _round_up(value: int, multiple: int = GROUPED_MM_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


MAX_PARAMETERS = 1 << 33  # 8.6e9 parameters = 137 GB of fp32 weights, gradients and AdamW state: no single device


def check_number(value: Any, key: str) -> None:
    """A float must be finite (no nan, inf) and an int must lie in (-2**63, 2**63)."""
    if isinstance(value, bool):
        return
    if isinstance(value, float):
        check(math.isfinite(value), key, value, "must be a finite number (not nan or inf)")
    elif isinstance(value, int):
        check(-INT64_LIMIT < value < INT64_LIMIT, key, value, "must be an integer in (-2**63, 2**63)")


def check_numbers(options: Any, prefix: str) -> None:
    """check_number on every field of dataclass `options` (model, train, router options)."""
    for f in dataclasses.fields(options):
        check_number(getattr(options, f.name), f"{prefix}.{f.name}")


def check_counts(options: Any, prefix: str, names: Iterable[str], limits: Mapping[str, int]) -> None:
    """Each named field of `options` is > 0, and at most its bound where `limits` gives one."""
    for name in names:
        value = getattr(options, name)
        check(value > 0, f"{prefix}.{name}", value, "must be > 0")
        if name in limits:
            check(value <= limits[name], f"{prefix}.{name}", value, f"must be <= {limits[name]}")


@dataclass(frozen=True)
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
    # DeepSeekMoE's shared experts: SwiGLU experts of hidden d_expert that every token of an MoE layer passes
    # through, beside its top_k routed ones (any router). Fine-grained experts are n_experts, d_expert and
    # top_k at equal active parameters: 8 experts x d_expert 256, top-2 and 32 x 64, top-8 both give a token
    # 512 hidden units of 3 d_model x 512 weights, from 2 or from 8 experts, out of 2048 in all.
    n_shared_experts: int = 0

    def validate(self, prefix: str = "model") -> None:
        check_numbers(self, prefix)
        positive = [name for name in MODEL_LIMITS if name not in MODEL_SIZES_ALLOWING_ZERO]
        check_counts(self, prefix, positive, MODEL_LIMITS)  # every size of the model has a bound
        for name in MODEL_SIZES_ALLOWING_ZERO:
            value = getattr(self, name)
            check(0 <= value <= MODEL_LIMITS[name], f"{prefix}.{name}", value, f"must be in [0, {MODEL_LIMITS[name]}]")
        check(
            self.vocab_size >= 258,
            f"{prefix}.vocab_size",
            self.vocab_size,
            "must be >= 258 (256 byte symbols + <unk> + <|endoftext|>)",
        )
        check(
            self.d_model % self.n_heads == 0,
            f"{prefix}.d_model",
            self.d_model,
            f"must be divisible by model.n_heads = {self.n_heads}",
        )
        check(
            (self.d_model // self.n_heads) % 2 == 0 or self.positional != "rope",
            f"{prefix}.d_model",
            self.d_model,
            "head dimension d_model / n_heads must be even for rotary positions",
        )
        check(
            self.positional in ("rope", "learned"),
            f"{prefix}.positional",
            self.positional,
            "must be 'rope' or 'learned'",
        )
        check(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        check(
            self.top_k <= self.n_experts,
            f"{prefix}.top_k",
            self.top_k,
            f"must be <= model.n_experts = {self.n_experts}",
        )
        for name in ("d_model", "d_expert"):  # the two sizes the experts' grouped GEMM (gtmoe.moe) multiplies by
            value = getattr(self, name)
            check(
                value % GROUPED_MM_MULTIPLE == 0,
                f"{prefix}.{name}",
                value,
                f"must be a multiple of {GROUPED_MM_MULTIPLE}: the experts' grouped GEMM (torch grouped_mm) needs "
                f"rows of 16 bytes, {GROUPED_MM_MULTIPLE} values in bf16 (e.g. {_round_up(value)})",
            )


@dataclass(frozen=True)
class RouterConfig:
    """The router's registered name plus its own options (validated by the router's Config dataclass)."""

    name: str = "topk"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Any, prefix: str = "router") -> RouterConfig:
        check(isinstance(raw, dict), prefix, raw, "must be a mapping with at least 'name'")
        raw = dict(raw)
        name = raw.pop("name", None)
        check(isinstance(name, str), f"{prefix}.name", name, "must be a router name (string)")
        cfg = cls(name=name, options=raw)
        cfg.resolve(prefix)  # fail early on unknown names / options
        return cfg

    def resolve(self, prefix: str = "router"):
        """The router's typed options (its `Config` dataclass), validated on the first call (errors name
        `prefix`) and kept: a frozen RouterConfig is checked once, however often it is read."""
        typed = self.__dict__.get("_typed")  # not a field: asdict, replace and == ignore it
        if typed is None:
            from gtmoe import routers

            entry = routers.get(self.name, key=f"{prefix}.name")
            typed = from_dict(entry.Config, self.options, prefix)
            check_numbers(typed, prefix)
            typed.validate(prefix)
            self.__dict__["_typed"] = typed
        return typed

    def for_horizon(self, max_steps: int) -> RouterConfig:
        """A copy whose options that depend on the run's length (e.g. the loss-free bias rate) are resolved to
        numbers, so the run config records what the run used. Leaves self unchanged."""
        resolved = RouterConfig(self.name, {**self.options, **self.resolve().at_horizon(max_steps)})
        resolved.resolve()
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.resolve())}


@dataclass(frozen=True)
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
    nonfinite: str = (
        "stop"  # "stop": raise naming the step; "skip": drop that step's update (costs one host sync per step)
    )
    max_skipped_steps: int = 10
    # Snapshots of the routing probe (eval.probe_blocks) during training, for routing stability (gtmoe.stability):
    # at step 0 and at round(i * max_steps / routing_snapshots), i = 1..routing_snapshots; 0 = none.
    routing_snapshots: int = 0

    def validate(self, prefix: str = "train") -> None:
        check(
            isinstance(self.seed, int) and 0 <= self.seed < INT64_LIMIT,
            f"{prefix}.seed",
            self.seed,
            "must be an integer in [0, 2**63)",
        )
        check_numbers(self, prefix)
        check_counts(
            self,
            prefix,
            (
                "batch_size",
                "grad_accum",
                "max_steps",
                "checkpoint_every",
                "log_every",
                "router_log_every",
                "max_skipped_steps",
            ),
            TRAIN_LIMITS,
        )
        check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(
            0 <= self.warmup_steps < self.max_steps,
            f"{prefix}.warmup_steps",
            self.warmup_steps,
            f"must be in [0, train.max_steps = {self.max_steps})",
        )
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, f"{prefix}.beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, f"{prefix}.beta2", self.beta2, "must be in [0, 1)")
        check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "must be >= 0")
        check(
            0 < self.saturation_checkpoint < 1,
            f"{prefix}.saturation_checkpoint",
            self.saturation_checkpoint,
            "must be in (0, 1)",
        )
        check(
            self.device in ("auto", "cpu", "cuda"), f"{prefix}.device", self.device, "must be 'auto', 'cpu' or 'cuda'"
        )
        check(self.nonfinite in ("stop", "skip"), f"{prefix}.nonfinite", self.nonfinite, "must be 'stop' or 'skip'")
        most = min(self.max_steps, MAX_ROUTING_SNAPSHOTS)
        check(
            isinstance(self.routing_snapshots, int)
            and not isinstance(self.routing_snapshots, bool)
            and 0 <= self.routing_snapshots <= most,
            f"{prefix}.routing_snapshots",
            self.routing_snapshots,
            f"must be an integer in [0, {most}] (0 = none; at most train.max_steps and {MAX_ROUTING_SNAPSHOTS})",
        )

    def snapshot_steps(self) -> list[int]:
        """The steps after which the routing probe is snapshotted, ascending: 0 (before the first update) and
        round(i * max_steps / routing_snapshots) for i = 1..routing_snapshots (distinct, as routing_snapshots <=
        max_steps); empty when routing_snapshots is 0."""
        if self.routing_snapshots <= 0:
            return []
        n = self.routing_snapshots
        return sorted({0, *(round(i * self.max_steps / n) for i in range(1, n + 1))})


@dataclass(frozen=True)
class DataConfig:
    shards: str = "results/data/shards"  # directory holding one shard directory per split

    def validate(self, prefix: str = "data") -> None:
        check(bool(self.shards), f"{prefix}.shards", self.shards, "must be a directory path")


@dataclass(frozen=True)
class EvalConfig:
    # Blocks evaluated per split (0 = all): evenly spaced over the split, the same for every run.
    # Routing groups are always the training micro-batch (train.batch_size blocks).
    max_blocks: dict[str, int] = field(default_factory=lambda: {"validation": 0, "test": 0})
    # Router saturation needs a second forward pass (the intermediate checkpoint); it is
    # estimated on the first `saturation_blocks` evaluated blocks (0 = all of them).
    saturation_blocks: int = 512
    # The routing probe (gtmoe.probe): validation blocks, evenly spaced, whose expert sets are recorded token by
    # token, for agreement across seeds and routing snapshots during training; 0 = none.
    probe_blocks: int = 16

    def validate(self, prefix: str = "eval") -> None:
        for split, blocks in self.max_blocks.items():
            check(
                split in ("train", "validation", "test"),
                f"{prefix}.max_blocks",
                split,
                "keys must be splits: train, validation, test",
            )
            check(
                isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 0,
                f"{prefix}.max_blocks.{split}",
                blocks,
                "must be an integer >= 0 (0 = the whole split)",
            )
            check_number(blocks, f"{prefix}.max_blocks.{split}")
        check(self.saturation_blocks >= 0, f"{prefix}.saturation_blocks", self.saturation_blocks, "must be >= 0")
        check(
            isinstance(self.probe_blocks, int) and 0 <= self.probe_blocks <= MAX_PROBE_BLOCKS,
            f"{prefix}.probe_blocks",
            self.probe_blocks,
            f"must be an integer in [0, {MAX_PROBE_BLOCKS}] (0 = no routing probe)",
        )


@dataclass(frozen=True)
class RunConfig:
    variant: str = "topk"
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def at_horizon(self) -> RunConfig:
        """A copy with the router's horizon-dependent options resolved for train.max_steps (see
        RouterConfig.for_horizon); a run config read from a file or built from the study goes through this once."""
        return dataclasses.replace(self, router=self.router.for_horizon(self.train.max_steps))

    def validate(self) -> RunConfig:
        """Check every section; raises ConfigError naming the key, changes nothing, returns self."""
        check(bool(self.variant) and isinstance(self.variant, str), "variant", self.variant, "must be a non-empty name")
        self.model.validate()
        self.train.validate()
        self.router.resolve().validate_for_model(self.model)
        self.data.validate()
        self.eval.validate()
        return self.check_size()

    def check_size(self) -> RunConfig:
        """The model this config builds has at most MAX_PARAMETERS; returns self."""
        params = parameter_count(self)
        check(
            params <= MAX_PARAMETERS,
            "model",
            f"{params:,} parameters",
            f"more than {MAX_PARAMETERS:,} ({MAX_PARAMETERS * 16 // 10**9} GB of weights, gradients and AdamW "
            "state); lower model.n_experts, d_expert, d_model, n_layers or vocab_size",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["router"] = self.router.to_dict()
        return out

    def weights(self) -> dict[str, Any]:
        """The part of this run config that can change the trained weights: "the same run" (weight_config)."""
        return weight_config(self.to_dict())


RUNTIME_OVERHEAD_MB = 500  # Python + PyTorch + pandas/pyarrow resident before the model (torch alone: ~300 MB)


def parameter_count(cfg: RunConfig) -> int:
    """Trainable parameters of the model `cfg` builds, counted on the model itself built on the meta device.

    Shapes without storage (gtmoe.model.shape_only_model): every router's own parameters (a noise
    projection, no gate at all) and the shared experts count as built, with no formula to keep in step
    with the model. Milliseconds at the study's sizes, nothing allocated for a model far past
    MAX_PARAMETERS; the count of a (model, router, options) is kept, as every seed of a variant asks again.
    """
    from gtmoe import routers

    entry = routers.get(cfg.router.name, key="router.name")
    try:
        options = json.dumps(cfg.router.options, sort_keys=True)
    except (TypeError, ValueError):  # options built in code rather than read from a file: count afresh
        return _count_parameters(cfg.model, cfg.router)
    return _cached_parameter_count(cfg.model, entry, cfg.router.name, options)


@functools.lru_cache(maxsize=256)
def _cached_parameter_count(model: ModelConfig, entry: type, name: str, options: str) -> int:
    """`entry`, the registered class, is part of the key: a name re-registered (a test's plug-in) recounts."""
    return _count_parameters(model, RouterConfig(name, json.loads(options)))


def _count_parameters(model: ModelConfig, router: RouterConfig) -> int:
    from gtmoe.model import shape_only_model

    return sum(p.numel() for p in shape_only_model(model, router).parameters())


def _ffn_rows(cfg: RunConfig) -> float:
    """Expert rows of width d_expert a token's FFN activations span in one MoE block (memory_estimate_mb):
    top_k (or up to capacity_factor x top_k) routed plus the shared experts; for a dense entry its FFN's
    hidden size over d_expert, read from the FFN built on the meta device (dense_total is E + n_shared)."""
    from gtmoe import routers

    m = cfg.model
    entry = routers.get(cfg.router.name, key="router.name")
    if not issubclass(entry, routers.Router):
        import torch

        with torch.device("meta"):
            ffn = entry.build_ffn(cfg.router.resolve(), m)
        return sum(p.numel() for p in ffn.parameters()) / (3 * m.d_model * m.d_expert)  # SwiGLU: 3 d h weights
    rows = float(m.top_k)
    capacity = cfg.router.options.get("capacity_factor")
    if isinstance(capacity, (int, float)) and math.isfinite(capacity):
        rows = max(rows, min(float(m.n_experts), capacity * m.top_k))
    return rows + m.n_shared_experts


def memory_estimate_mb(cfg: RunConfig, seq_len: int, stage: str = "train", activations: bool = True) -> float:
    """A rough upper bound of the peak memory (MB) of one `train` or `evaluate` job of `cfg`.

    All in fp32 (4 bytes), P = parameter_count(cfg), T = batch_size * seq_len tokens per micro-batch
    (training and evaluation route in groups of one training micro-batch), H heads, L layers:

    - train: 7 P (weights, gradients, AdamW's two moments, and a transient copy of weights + moments
      while a checkpoint is saved or loaded for a resume).
    - evaluate (gtmoe.evaluate), the larger of its two phases on top of 2 P (the final model and the
      saturation checkpoint's model; P for a dense run). Loading: P, the weights of the checkpoint being
      loaded (mapped, so AdamW's moments beside them are never read), and the training logs the checkpoint
      holds as Python objects (about 1 kB per train_log row, 640 B per router_log row: one per expert, MoE
      layer and router_log_every steps). Evaluating: per MoE layer the (token id, expert) counts V (E + 1), each
      token id's occurrences V, the co-activation counts (E + 1)^2 and each routing group's per-expert counts
      G (E + 1) (G = the largest evaluated split's tokens / T), all int64, on the host for a CPU job (on the
      device for a GPU one, as the temporaries of their summary: 24 B per group and expert, 16 B per pair of
      experts, 8 V); on the host in any job the mutual information's temporaries (40 B for each of up to 2**20
      counts in flight, 8 V, and 16 B per nonzero count: at most min(V E, top_k tokens) for the largest
      evaluated split, eval.max_blocks * seq_len tokens or 2**23 for a split evaluated whole), each token id's
      occurrences (8 V) and the co-activation counts the JSON holds (E <= 256); and one layer's activations
      plus the logits and a group's (T, E + 1) float32 co-activation membership.
    - activations kept for the backward pass (train), per layer: ~16 d per token on the attention path,
      3 E for the gate, r (2 d + 4 d_expert) for the r expert rows a token is dispatched to (r = top_k, or
      up to capacity_factor * top_k for capacity routers, plus n_shared_experts; for a dense FFN its hidden
      size / d_expert: top_k + n_shared, or E + n_shared for dense_total), plus 2 B H S^2 for attention scores
      (materialised by the math kernel on CPU); and 3 T V for logits, log-softmax and their gradient.
    - the rotary tables (2 L S_max d/H / 2) and RUNTIME_OVERHEAD_MB for the interpreter and libraries.
    - the routing snapshots (`routing_snapshot_bytes`): twice in training (kept on the device, copied to the host
      for each checkpoint), nine times in evaluation (read from the checkpoint, and one layer's unpacked a byte
      per bit).

    `activations=False` leaves activations out: for a GPU job they live on the device, not in the host
    memory that resources.*.mem_mb reserves. The estimate errs high (evaluate: within 1.5x of the measured
    peak, docs/performance.md "Evaluation memory"); it exists to refuse a configuration that cannot fit
    before a job allocates until the OS kills it.
    """
    m, t = cfg.model, cfg.train
    params = parameter_count(cfg)
    d, e, k, de, layers = m.d_model, m.n_experts, m.top_k, m.d_expert, m.n_layers
    tokens = t.batch_size * seq_len
    rows = _ffn_rows(cfg)
    per_layer = tokens * (16 * d + 3 * e + rows * (2 * d + 4 * de)) + 2 * t.batch_size * m.n_heads * seq_len**2
    logits = 3 * tokens * m.vocab_size
    buffers = layers * m.max_seq_len * (d // m.n_heads) if m.positional == "rope" else 0
    snapshots = routing_snapshot_bytes(cfg, seq_len)
    if stage == "train":
        floats = 7 * params + buffers + (layers * per_layer + logits if activations else 0)
        return RUNTIME_OVERHEAD_MB + (4 * floats + 2 * snapshots) / 2**20
    from gtmoe import routers

    moe_layers = layers // m.moe_every if issubclass(routers.get(cfg.router.name), routers.Router) else 0
    models = 4 * (2 if moe_layers else 1) * (params + buffers)
    logged = math.ceil(t.max_steps / t.log_every) * 1024
    logged += math.ceil(t.max_steps / t.router_log_every) * moe_layers * e * 640
    loading = 4 * params + logged
    blocks = {"validation": 0, "test": 0, **cfg.eval.max_blocks}.values()  # the splits the workflow evaluates
    evaluated = max(n * seq_len if n > 0 else 2**23 for n in blocks)
    nonzero = min(m.vocab_size * e, k * evaluated)
    chunk = min(m.vocab_size * e, 2**20)  # gtmoe.evaluate.MI_CHUNK_ELEMENTS entries of about 40 B in flight
    written = min(e, MAX_COACTIVATION_EXPERTS) ** 2  # co-activation counts as the JSON's Python ints
    information = (40 * chunk + 16 * m.vocab_size + 16 * nonzero + 64 * written) if moe_layers else 0
    groups = math.ceil(evaluated / tokens)
    counted = m.vocab_size * (e + 2) + (e + 1) ** 2 + groups * (e + 1)  # gtmoe.evaluate.LayerStats, int64
    # one layer's summary: utilisation percentiles, co-activation shares, each token id's best expert
    summarised = 24 * groups * e + 16 * e * e + 8 * m.vocab_size
    evaluating = ((8 * moe_layers * counted + summarised) if activations and moe_layers else 0) + information
    evaluating += 4 * (per_layer + logits + (tokens * (e + 1) if moe_layers else 0)) if activations else 0
    return RUNTIME_OVERHEAD_MB + (models + max(loading, evaluating) + 9 * snapshots) / 2**20


def routing_snapshot_bytes(cfg: RunConfig, seq_len: int) -> int:
    """The bytes of a run's routing snapshots (train.routing_snapshots): a bit per (probe token, expert) of each
    MoE layer at each snapshot step, each token's row padded to whole bytes (gtmoe.stability.pack_snapshot); 0
    without snapshots, a probe or MoE layers."""
    from gtmoe import routers

    m = cfg.model
    routed = issubclass(routers.get(cfg.router.name), routers.Router)
    moe_layers = m.n_layers // m.moe_every if routed else 0
    tokens = cfg.eval.probe_blocks * seq_len
    return len(cfg.train.snapshot_steps()) * moe_layers * tokens * -(-m.n_experts // 8)


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
            fail(where, raw[key], f"unknown key; known keys here: {', '.join(sorted(known))}")
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
            check(
                _type_ok(value, annotation),
                where,
                value,
                f"must be of type {getattr(annotation, '__name__', annotation)}",
            )
            check_number(value, where)
            values[key] = value
    return cls(**values)


REQUIRED_RUN_KEYS = ("variant", "router")  # a run file must say what it is: no default model, no default router


def _run_config(raw: Any, origin: str) -> RunConfig:
    raw = {} if raw is None else raw  # an empty file
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{origin} must be a mapping of run config sections (variant, model, router, train, "
            f"data, eval), not {short_repr(raw)}"
        )
    for key in REQUIRED_RUN_KEYS:
        if key not in raw:
            raise ConfigError(
                f"config key '{key}' is missing in {origin}: a run config must name its variant and "
                "its router explicitly (e.g. variant: topk and router: {name: topk}); "
                "write the run config the workflow writes (results/<name>/runs/VARIANT/seedN/config.yaml)"
            )
    return from_dict(RunConfig, raw, "").at_horizon().validate()


def load_run_config(path: str | Path) -> RunConfig:
    """Read (strictly, see load_yaml) and validate a run's YAML (as the workflow writes it)."""
    path = Path(path)
    raw = load_yaml(path, f"run config {path}")
    return _run_config(raw, f"run config {path}")


def save_run_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
