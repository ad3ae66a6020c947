"""Training: AdamW, warmup + cosine, clipping, accumulation, atomic checkpoints, exact resume.

A run directory holds `config.yaml` (the resolved run config), the rolling
`checkpoint_last.pt` while training, `checkpoint.pt` once it is complete,
`train_log.parquet`, `router_log.parquet` (empty for dense) and
`train_summary.json`. Rerunning into the same directory resumes from
`checkpoint_last.pt`; on CPU the resumed run ends bitwise-identical to an
uninterrupted one (same data order, RNG states, optimizer, scheduler and
router buffers). The rolling checkpoint is deliberately not a workflow output:
Snakemake deletes the outputs of a killed job, and this file must survive it;
it is removed only once every output of the finished run is written.

Every checkpoint is written atomically (temporary sibling, fsync, rename) and
has a manifest beside it, `<checkpoint>.manifest.json` (size and sha256), which
`load_checkpoint` verifies, so a truncated or corrupted file is reported by name
with the way to recover instead of being loaded. Files are written only inside
the run directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gtmoe.config import ConfigError, RunConfig, save_run_config
from gtmoe.data import TokenBlocks
from gtmoe.model import MoETransformer

log = logging.getLogger("gtmoe.train")

CHECKPOINT = "checkpoint.pt"  # the finished run
RESUME_CHECKPOINT = "checkpoint_last.pt"  # rolling, while training
SATURATION_CHECKPOINT = "checkpoint_saturation.pt"
MANIFEST_SUFFIX = ".manifest.json"  # checkpoint.pt -> checkpoint.pt.manifest.json
# Every file `train` writes into a run directory (manifests are `<checkpoint>.manifest.json`):
# their temporaries `.<name>.tmp-PID` are cleared when training starts.
RUN_DIR_FILES = (CHECKPOINT, RESUME_CHECKPOINT, SATURATION_CHECKPOINT, "config.yaml", "train_log.parquet",
                 "router_log.parquet", "train_summary.json")
ROUTER_LOG_COLUMNS = ("step", "layer", "expert", "load", "reputation", "load_hat", "bonus", "bias")


class RunError(RuntimeError):
    """A run directory or checkpoint problem the user can fix; the message names the file and the fix."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


def resolve_device(name: str, setting: str = "config key 'train.device'") -> torch.device:
    """The torch device for "auto" / "cpu" / "cuda"; `setting` names where `name` came from, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} = 'cuda': no CUDA device is available here; use 'auto' (CUDA when "
                          "available, else CPU) or 'cpu'")
    return torch.device(name)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bitwise-reproducible resume)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: RunConfig) -> MoETransformer:
    return MoETransformer(cfg.model, cfg.router)


class DataOrder:
    """Block indices of micro-batch m: epoch e is a permutation drawn from (seed, e) alone.

    The order depends on nothing but the seed, so every variant with the same
    seed sees the same batches, and resuming at micro-batch m needs no state.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        if n_blocks < 1:
            raise ValueError("the training split has no full block; lower data.seq_len or check the corpus")
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._perm

    def micro_batch(self, m: int) -> np.ndarray:
        positions = np.arange(m * self.batch_size, (m + 1) * self.batch_size)
        epochs, offsets = np.divmod(positions, self.n_blocks)
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


def lr_lambda(cfg) -> callable:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms) do not (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


# --------------------------------------------------------------------------- checkpoint files


def manifest_path(checkpoint: Path) -> Path:
    """The manifest of a checkpoint: `checkpoint.pt` -> `checkpoint.pt.manifest.json`."""
    return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class _HashingWriter:
    """Write-only wrapper of a binary file that hashes what passes through.

    `torch.save` writes its zip archive strictly sequentially, so the digest is
    the file's sha256 without reading the file back.
    """

    def __init__(self, handle):
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unwritable(path: Path, exc: OSError, what: str) -> RunError:
    """The RunError for an OSError writing `path`: names it (or the ancestor that is a file) and what to do.

    Only "not a directory" / "exists" errors are blamed on a file in the way; a full disk
    or a permission error over an existing file is reported as what it is.
    """
    reason = exc.strerror or str(exc)
    ancestor = None
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        ancestor = next((p for p in (path, *path.parents) if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        reason = f"{ancestor} is a file, not a directory"
    elif exc.filename and Path(exc.filename) != path:
        reason = f"{reason}: {exc.filename}"
    return RunError(f"cannot write {what} {path} ({reason}); {_WRITE_RECOVERY}")


# How to get past a failed write (full disk, permissions): nothing finished is lost, a rerun continues.
_WRITE_RECOVERY = "pass another --out, or free space or fix the permissions there and rerun"


def prepare_run_dir(out_dir: Path) -> None:
    """Create the run directory, or raise a RunError naming it (a file in the way, read-only, ...)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise unwritable(out_dir, exc, "the run directory") from None
    # Temporary files of a process killed mid-write (checkpoints, manifests, config, logs,
    # summary): never valid, possibly checkpoint-sized.
    for name in RUN_DIR_FILES:
        for stale in out_dir.glob(f".{name}*.tmp-*"):
            stale.unlink(missing_ok=True)


def _write_manifest(checkpoint: Path, entry: dict, replaces: dict | None) -> None:
    manifest = {"file": checkpoint.name, **entry, "replaces": replaces}
    path = manifest_path(checkpoint)
    tmp = _temporary(path)
    try:
        with open(tmp, "w") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_manifest(checkpoint: Path) -> dict | None:
    """The checkpoint's manifest, None if it has none; a RunError if it is unreadable."""
    path = manifest_path(checkpoint)
    try:
        manifest = json.loads(path.read_text())
        for entry in (manifest, manifest.get("replaces") or {"bytes": 0, "sha256": ""}):
            if not (isinstance(entry["bytes"], int) and isinstance(entry["sha256"], str)):
                raise ValueError("'bytes' must be an integer and 'sha256' a string")
        return manifest
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RunError(f"checkpoint manifest {path} is unreadable ({exc.__class__.__name__}: {exc}), so "
                       f"{checkpoint} cannot be verified; {_recovery(checkpoint)}") from exc


def _recovery(checkpoint: Path) -> str:
    """How to get past a bad checkpoint: what to delete, and what reruns."""
    run_dir, manifest = checkpoint.parent, manifest_path(checkpoint)
    if checkpoint.name == RESUME_CHECKPOINT:
        return (f"delete it (`rm {checkpoint} {manifest}`) and rerun snakemake or `python -m gtmoe train "
                f"--out {run_dir}`: the run restarts from step 0")
    return (f"retrain the run: delete {run_dir} and rerun snakemake (or `python -m gtmoe train --out {run_dir}`; "
            f"`snakemake --forcerun {run_dir / CHECKPOINT}` also does it)")


def save_checkpoint(obj, path: Path) -> dict:
    """Write `obj` to `path` atomically, with its manifest. Returns the manifest entry (bytes, sha256).

    Order: the checkpoint to a temporary sibling (hashed on the way) and fsync;
    then the manifest, atomically, naming the new content and the one it
    replaces; then the rename over `path`. A process killed at any point leaves
    `path` holding the old or the new checkpoint, and the manifest matches
    either. A failed write (disk full, ...) leaves the old checkpoint in place.
    """
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as handle:
            writer = _HashingWriter(handle)
            torch.save(obj, writer)
            handle.flush()
            os.fsync(handle.fileno())
        entry = {"bytes": writer.size, "sha256": writer.sha256.hexdigest()}
        try:
            previous = _read_manifest(path) if path.exists() else None
        except RunError:  # an unreadable manifest describes nothing worth keeping
            previous = None
        replaces = {"bytes": previous["bytes"], "sha256": previous["sha256"]} if previous else None
        _write_manifest(path, entry, replaces)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:  # torch.save may wrap a failed write in a RuntimeError
        if isinstance(exc, RunError):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        kept = "the previous checkpoint is kept; " if path.exists() else ""
        raise RunError(f"cannot write checkpoint {path} ({reason}); {kept}free space or fix the "
                       "permissions there and rerun to resume") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return entry


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def verify_checkpoint(path: Path, *, repair_manifest: bool = False) -> None:
    """Check `path` against its manifest (size, then sha256); a RunError naming the file and the fix if not.

    A checkpoint without a manifest (written by an older gtmoe) is accepted with
    a warning. A checkpoint that matches the content its manifest says it
    *replaces* is the old one, left by a kill between the manifest's and the
    checkpoint's renames: valid, and with `repair_manifest` the manifest is
    rewritten to describe it (training does this before it writes again).
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist; train the run first (snakemake, or "
                       f"`python -m gtmoe train --out {path.parent}`)")
    manifest = _read_manifest(path)
    if manifest is None:
        log.warning("checkpoint %s has no manifest %s (written by an older gtmoe?); loading it unverified",
                    path, manifest_path(path).name)
        return
    candidates = [manifest] + ([manifest["replaces"]] if manifest.get("replaces") else [])
    size = path.stat().st_size
    if not any(entry["bytes"] == size for entry in candidates):
        raise RunError(f"checkpoint {path} has {size} bytes but its manifest {manifest_path(path).name} says "
                       f"{manifest['bytes']} (truncated or partly written); {_recovery(path)}")
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    match = next((entry for entry in candidates if entry["bytes"] == size and entry["sha256"] == digest), None)
    if match is None:
        raise RunError(f"checkpoint {path} does not match the sha256 in its manifest {manifest_path(path).name} "
                       f"(corrupted); {_recovery(path)}")
    if match is not manifest and repair_manifest:
        _write_manifest(path, {"bytes": match["bytes"], "sha256": match["sha256"]}, None)


def load_checkpoint(path: Path, device: torch.device | str = "cpu", *, repair_manifest: bool = False) -> dict:
    """Verify a checkpoint against its manifest, then load it. Errors name the file and how to recover."""
    path = Path(path)
    verify_checkpoint(path, repair_manifest=repair_manifest)
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # unverified (no manifest) and unreadable: say which and how to recover
        raise RunError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}: {exc}); "
                       f"{_recovery(path)}") from exc


# Run-config keys that cannot change the trained weights (a top-level section, or a dotted key):
# `evaluate` accepts a run whose config.yaml differs from its checkpoint's config only in these.
WEIGHT_NEUTRAL_KEYS = ("eval", "train.log_every", "train.router_log_every")


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _neutral(key: str) -> bool:
    return any(key == neutral or key.startswith(neutral + ".") for neutral in WEIGHT_NEUTRAL_KEYS)


def config_differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, current value) for every key that differs, weight-neutral keys aside."""
    a, b = _flatten(stored), _flatten(current)
    missing = object()
    return [(key, a.get(key, missing), b.get(key, missing)) for key in sorted(a.keys() | b.keys())
            if not _neutral(key) and a.get(key, missing) != b.get(key, missing)]


def _short(value, limit: int = 40) -> str:
    text = "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_config_matches_checkpoint(config_path: Path, cfg: RunConfig, checkpoint: Path, stored: dict | None) -> None:
    """A RunError naming the keys in which `config_path` differs from the config `checkpoint` was trained with."""
    if stored is None:
        log.warning("checkpoint %s records no run config (older gtmoe); cannot check it against %s",
                    checkpoint, config_path)
        return
    differences = config_differences(stored, cfg.to_dict())
    if not differences:
        return
    shown = ", ".join(f"{key} ({_short(old)} in the checkpoint, {_short(new)} in {config_path.name})"
                      for key, old, new in differences[:5])
    more = f" and {len(differences) - 5} more" if len(differences) > 5 else ""
    raise RunError(f"{config_path} differs from the config {checkpoint} was trained with: {shown}{more}; "
                   f"restore {config_path.name} to the trained values, or retrain the run with the new ones "
                   f"(delete {checkpoint.parent} and rerun snakemake)")


def _write_atomic(path: Path, write) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it over `path`."""
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class TrainLog:
    """Device-side log rows, turned into Python numbers only when flushed (one sync per flush)."""

    rows: list[dict] = field(default_factory=list)
    router_rows: list[dict] = field(default_factory=list)
    pending: list[tuple[int, dict]] = field(default_factory=list)
    pending_router: list[tuple[int, list[dict[str, torch.Tensor]]]] = field(default_factory=list)

    def flush(self) -> None:
        for step, values in self.pending:
            self.rows.append({"step": step, **{k: float(v) for k, v in values.items()}})
        for step, layers in self.pending_router:
            for layer, fields in enumerate(layers):
                host = {name: tensor.float().cpu().numpy() for name, tensor in fields.items()}
                for expert in range(len(host["load"])):
                    row = {"step": step, "layer": layer, "expert": expert}
                    for name in ROUTER_LOG_COLUMNS[3:]:
                        row[name] = float(host[name][expert]) if name in host else float("nan")
                    self.router_rows.append(row)
        self.pending.clear()
        self.pending_router.clear()


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def accumulate_gradients(model: MoETransformer, forward, batches, tcfg, device: torch.device):
    """Forward and backward of one optimizer step's micro-batches, then gradient clipping.

    `batches` yields (inputs, targets) on the host; `forward` is the model or its compiled
    form. Returns the mean LM loss, the gradient norm before clipping, whether both are
    finite, and the router metrics (auxiliary loss terms, flip rates) averaged over the
    micro-batches, all as device tensors: nothing here reads a value on the host. The
    trainer and the benchmark both call this, then `optimizer_step`.
    """
    loss_sum = torch.zeros((), device=device)
    router_sums: dict[str, torch.Tensor] = {}
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device):
            out = forward(x, y)
        model.observe_token_loss(out.token_loss)
        ((out.loss + out.router_loss) / tcfg.grad_accum).backward()
        loss_sum += out.loss.detach()
        for key, value in out.router_metrics.items():
            router_sums[key] = router_sums.get(key, 0) + value.detach()
    loss = loss_sum / tcfg.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    return loss, grad_norm, finite, {key: value / tcfg.grad_accum for key, value in router_sums.items()}


def optimizer_step(model: MoETransformer, optimizer: torch.optim.Optimizer) -> None:
    """Apply the accumulated gradients, then let stateful routers fold in the step's statistics."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_router_states()


def train(cfg: RunConfig, out_dir: str | Path, *, stop_after: int | None = None) -> dict:
    """Train one run into `out_dir` (resuming if it holds a checkpoint). Returns the train summary.

    `stop_after` ends the process's work after that many optimizer steps in
    total (checkpointing first), to test resumption without killing a process.
    """
    out_dir = Path(out_dir)
    prepare_run_dir(out_dir)
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    try:
        _write_atomic(out_dir / "config.yaml", lambda tmp: save_run_config(cfg, tmp))
    except OSError as exc:
        raise unwritable(out_dir, exc, "the run directory") from None

    data = TokenBlocks(Path(cfg.data.shards) / "train")
    if data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"config key 'model.max_seq_len' = {cfg.model.max_seq_len}: shorter than the shards' "
                         f"sequence length {data.seq_len}")
    order = DataOrder(data.n_full_blocks, tcfg.batch_size, tcfg.seed)

    torch.manual_seed(tcfg.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    forward = torch.compile(model) if tcfg.compile else model

    trainlog, start_step, skipped, elapsed_before = TrainLog(), 0, 0, 0.0
    final_path, checkpoint_path = out_dir / CHECKPOINT, out_dir / RESUME_CHECKPOINT
    resume_from = final_path if final_path.exists() else checkpoint_path
    if resume_from.exists():
        state = load_checkpoint(resume_from, device, repair_manifest=True)
        if state["config"] != cfg.to_dict():
            raise RunError(f"{resume_from} was written by a different run config; delete {out_dir} "
                           "(or use another --out) to start this run afresh")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], device)
        start_step, skipped = state["step"], state["skipped_steps"]
        trainlog.rows, trainlog.router_rows = state["log"], state["router_log"]
        elapsed_before = state["elapsed_s"]
        log.info("resuming %s from step %d", out_dir, start_step)

    saturation_step = max(1, round(tcfg.saturation_checkpoint * tcfg.max_steps))
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * data.seq_len
    first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    last_saved = {"step": start_step if resume_from.exists() else None}

    def diverged(what: str) -> NonFiniteLossError:
        kept = (f"the last good checkpoint {checkpoint_path} (step {last_saved['step']}) was kept"
                if last_saved["step"] is not None and checkpoint_path.exists() else "no checkpoint was written yet")
        return NonFiniteLossError(
            f"{what} in {out_dir}; {kept}. On CPU a rerun repeats the same steps: to get past it, delete {out_dir} "
            "and retrain with a lower train.lr, or with train.nonfinite: skip to drop such steps")

    def check_finite() -> None:
        bad = int(first_bad_step)  # one host sync, at log and checkpoint boundaries only
        if bad >= 0:
            raise diverged(f"non-finite loss at step {bad}")

    def save(step: int, path: Path, complete: bool = False) -> None:
        trainlog.flush()
        save_checkpoint({
            "config": cfg.to_dict(), "step": step, "complete": complete, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(device),
            "skipped_steps": skipped, "log": trainlog.rows, "router_log": trainlog.router_rows,
            "elapsed_s": elapsed(),
        }, path)
        last_saved["step"] = step

    model.train()
    progress = tqdm(total=tcfg.max_steps, initial=start_step, desc=f"{cfg.variant} seed {tcfg.seed}",
                    disable=not sys.stderr.isatty(), dynamic_ncols=True)
    plain_every = max(tcfg.log_every, tcfg.max_steps // 20)
    step = start_step
    last_flush_time, last_flush_step = time.perf_counter(), start_step
    while step < tcfg.max_steps:
        batches = (data.batch(order.micro_batch(step * tcfg.grad_accum + micro)) for micro in range(tcfg.grad_accum))
        loss, grad_norm, finite, router_means = accumulate_gradients(model, forward, batches, tcfg, device)

        if tcfg.nonfinite == "skip" and not bool(finite):  # opt-in policy: one host sync per step
            skipped += 1
            log.warning("step %d: non-finite loss, update skipped (%d skipped so far)", step, skipped)
            if skipped > tcfg.max_skipped_steps:
                raise diverged(f"non-finite loss at step {step}: more than train.max_skipped_steps = "
                               f"{tcfg.max_skipped_steps} steps skipped")
            optimizer.zero_grad(set_to_none=True)
            for layer in model.moe_layers:
                layer.router.reset_step_statistics()
        else:
            first_bad_step = torch.where((first_bad_step < 0) & ~finite, step, first_bad_step)
            optimizer_step(model, optimizer)
        scheduler.step()
        step += 1
        progress.update(1)

        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            trainlog.pending.append((step, {
                "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "aux_loss": float("nan"), "z_loss": float("nan"), **router_means,
            }))
            now = time.perf_counter()
            trainlog.flush()
            check_finite()
            row = trainlog.rows[-1]
            row["tokens_per_s"] = (step - last_flush_step) * tokens_per_step / max(now - last_flush_time, 1e-9)
            row["elapsed_s"] = elapsed()
            last_flush_time, last_flush_step = now, step
            progress.set_postfix(loss=f"{row['loss']:.3f}")
            if progress.disable and (step % plain_every == 0 or step == tcfg.max_steps):
                log.info("%s seed %d step %d/%d loss %.4f lr %.2e %.0f tok/s", cfg.variant, tcfg.seed, step,
                         tcfg.max_steps, row["loss"], row["lr"], row["tokens_per_s"])
        if model.moe_layers and (step % tcfg.router_log_every == 0 or step == tcfg.max_steps):
            trainlog.pending_router.append((step, [
                {"load": layer.router.last_step_load.clone(),
                 **{k: v.detach().clone() for k, v in layer.router.state_for_log().items()}}
                for layer in model.moe_layers]))
        if step == saturation_step:
            check_finite()
            save_checkpoint({"step": step, "model": model.state_dict()}, out_dir / SATURATION_CHECKPOINT)
        if step % tcfg.checkpoint_every == 0 and step < tcfg.max_steps:
            check_finite()
            save(step, checkpoint_path)
        if stop_after is not None and step >= stop_after and step < tcfg.max_steps:
            check_finite()
            save(step, checkpoint_path)
            progress.close()
            return {"stopped_at": step}
    progress.close()
    check_finite()
    if start_step < tcfg.max_steps or not final_path.exists():
        save(step, final_path, complete=True)
    summary = write_outputs(out_dir, cfg, model, trainlog, device, skipped)
    # Only now: a kill while the outputs were written (Snakemake then deletes them all,
    # checkpoint.pt included) still resumes from here rather than from step 0.
    for path in (checkpoint_path, manifest_path(checkpoint_path)):
        path.unlink(missing_ok=True)
    return summary


def write_outputs(out_dir: Path, cfg: RunConfig, model: MoETransformer, trainlog: TrainLog,
                  device: torch.device, skipped: int) -> dict:
    trainlog.flush()
    train_log = pd.DataFrame(trainlog.rows)
    # Written for every variant (empty for dense) so the workflow can declare it.
    router_log = pd.DataFrame(trainlog.router_rows, columns=list(ROUTER_LOG_COLUMNS))
    n_params, n_active = model.parameter_counts()
    last = trainlog.rows[-1] if trainlog.rows else {}
    summary = {
        "variant": cfg.variant, "seed": cfg.train.seed, "router": cfg.router.name, "steps": cfg.train.max_steps,
        "final_loss": last.get("loss"), "wall_s": last.get("elapsed_s"),
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in trainlog.rows])) if trainlog.rows else None,
        "skipped_steps": skipped, "n_params": n_params, "n_active_params": n_active,
        "peak_mem_mb": peak_memory_mb(device), "device": str(device),
    }
    for name, write in (("train_log.parquet", lambda tmp: train_log.to_parquet(tmp, index=False)),
                        ("router_log.parquet", lambda tmp: router_log.to_parquet(tmp, index=False)),
                        ("train_summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))):
        try:
            _write_atomic(out_dir / name, write)
        except OSError as exc:
            raise unwritable(out_dir / name, exc, "the run output") from None
    return summary
