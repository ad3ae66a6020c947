"""Training: AdamW, warmup + cosine, clipping, accumulation, atomic checkpoints, exact resume.

A run directory holds `config.yaml` (the resolved run config), the rolling
`checkpoint_last.pt` while training, `checkpoint.pt` once it is complete,
`train_log.parquet`, `router_log.parquet` (empty for dense) and
`train_summary.json`. Rerunning into the same directory resumes from
`checkpoint_last.pt`; on CPU the resumed run ends bitwise-identical to an
uninterrupted one (same data order, RNG states, optimizer, scheduler and
router buffers). The rolling checkpoint is deliberately not a workflow output:
Snakemake deletes the outputs of a killed job, and this file must survive it.
"""

from __future__ import annotations

import contextlib
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

from gtmoe.config import RunConfig, save_run_config
from gtmoe.data import TokenBlocks
from gtmoe.model import MoETransformer

log = logging.getLogger("gtmoe.train")

CHECKPOINT = "checkpoint.pt"  # the finished run
RESUME_CHECKPOINT = "checkpoint_last.pt"  # rolling, while training
ROUTER_LOG_COLUMNS = ("step", "layer", "expert", "load", "reputation", "load_hat", "bonus", "bias")
SATURATION_CHECKPOINT = "checkpoint_saturation.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'train.device' = 'cuda': no CUDA device is available")
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


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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


def train(cfg: RunConfig, out_dir: str | Path, *, stop_after: int | None = None) -> dict:
    """Train one run into `out_dir` (resuming if it holds a checkpoint). Returns the train summary.

    `stop_after` ends the process's work after that many optimizer steps in
    total (checkpointing first), to test resumption without killing a process.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    save_run_config(cfg, out_dir / "config.yaml")

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
        state = load_checkpoint(resume_from, device)
        if state["config"] != cfg.to_dict():
            raise RuntimeError(f"{resume_from} was written by a different run config; delete {out_dir} "
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

    def check_finite() -> None:
        bad = int(first_bad_step)  # one host sync, at log and checkpoint boundaries only
        if bad >= 0:
            raise NonFiniteLossError(f"non-finite loss at step {bad} in {out_dir}; the last good checkpoint "
                                     f"({checkpoint_path.name}, if any) was kept")

    def save(step: int, path: Path, complete: bool = False) -> None:
        trainlog.flush()
        atomic_save({
            "config": cfg.to_dict(), "step": step, "complete": complete, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(device),
            "skipped_steps": skipped, "log": trainlog.rows, "router_log": trainlog.router_rows,
            "elapsed_s": elapsed(),
        }, path)

    model.train()
    progress = tqdm(total=tcfg.max_steps, initial=start_step, desc=f"{cfg.variant} seed {tcfg.seed}",
                    disable=not sys.stderr.isatty(), dynamic_ncols=True)
    plain_every = max(tcfg.log_every, tcfg.max_steps // 20)
    step = start_step
    last_flush_time, last_flush_step = time.perf_counter(), start_step
    while step < tcfg.max_steps:
        loss_sum = torch.zeros((), device=device)
        aux_sums: dict[str, torch.Tensor] = {}
        for micro in range(tcfg.grad_accum):
            x, y = data.batch(order.micro_batch(step * tcfg.grad_accum + micro))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device):
                out = forward(x, y)
            model.observe_token_loss(out.token_loss)
            ((out.loss + out.router_loss) / tcfg.grad_accum).backward()
            loss_sum += out.loss.detach()
            for key, value in out.router_metrics.items():
                aux_sums[key] = aux_sums.get(key, 0) + value.detach()
        loss = loss_sum / tcfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else math.inf)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)

        if tcfg.nonfinite == "skip" and not bool(finite):  # opt-in policy: one host sync per step
            skipped += 1
            log.warning("step %d: non-finite loss, update skipped (%d skipped so far)", step, skipped)
            if skipped > tcfg.max_skipped_steps:
                raise NonFiniteLossError(f"non-finite loss at step {step}: more than train.max_skipped_steps = "
                                         f"{tcfg.max_skipped_steps} steps skipped in {out_dir}")
            optimizer.zero_grad(set_to_none=True)
            for layer in model.moe_layers:
                layer.router.reset_step_statistics()
        else:
            first_bad_step = torch.where((first_bad_step < 0) & ~finite, step, first_bad_step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_router_states()
        scheduler.step()
        step += 1
        progress.update(1)

        if step % tcfg.log_every == 0 or step == tcfg.max_steps:
            trainlog.pending.append((step, {
                "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "aux_loss": aux_sums.get("aux_loss", torch.tensor(float("nan"))) / tcfg.grad_accum,
                "z_loss": aux_sums.get("z_loss", torch.tensor(float("nan"))) / tcfg.grad_accum,
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
            atomic_save({"step": step, "model": model.state_dict()}, out_dir / SATURATION_CHECKPOINT)
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
        save(step, checkpoint_path, complete=True)
        os.replace(checkpoint_path, final_path)
    return write_outputs(out_dir, cfg, model, trainlog, device, skipped)


def write_outputs(out_dir: Path, cfg: RunConfig, model: MoETransformer, trainlog: TrainLog,
                  device: torch.device, skipped: int) -> dict:
    trainlog.flush()
    pd.DataFrame(trainlog.rows).to_parquet(out_dir / "train_log.parquet", index=False)
    # Written for every variant (empty for dense) so the workflow can declare it.
    pd.DataFrame(trainlog.router_rows, columns=list(ROUTER_LOG_COLUMNS)).to_parquet(
        out_dir / "router_log.parquet", index=False)
    n_params, n_active = model.parameter_counts()
    last = trainlog.rows[-1] if trainlog.rows else {}
    summary = {
        "variant": cfg.variant, "seed": cfg.train.seed, "router": cfg.router.name, "steps": cfg.train.max_steps,
        "final_loss": last.get("loss"), "wall_s": last.get("elapsed_s"),
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in trainlog.rows])) if trainlog.rows else None,
        "skipped_steps": skipped, "n_params": n_params, "n_active_params": n_active,
        "peak_mem_mb": peak_memory_mb(device), "device": str(device),
    }
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # a truncated or corrupted file: say which and how to recover
        raise RuntimeError(f"checkpoint {path} is unreadable ({exc.__class__.__name__}: {exc}); delete it to "
                           "retrain the run from scratch") from exc
