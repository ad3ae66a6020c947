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
Files are written only inside the run directory, atomically (gtmoe.runfiles).

With `train.routing_snapshots` > 0 (an MoE model, `eval.probe_blocks` > 0) the trainer also routes the
routing probe (gtmoe.probe, validation blocks) in eval mode at step 0 and at the snapshot steps
(`TrainConfig.snapshot_steps`), after that step's logging, and keeps the expert sets on the device; the
checkpoints hold them (gtmoe.stability.SNAPSHOT_RECORD), so a resumed run ends with the snapshots of an
uninterrupted one. Routing in eval mode changes no weight, router state or random number: the weights
and logs are those of the same run without snapshots.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from gtmoe.config import RunConfig, save_run_config
from gtmoe.contract import (
    CHECKPOINT,
    IGNORE_INDEX,
    RESUME_CHECKPOINT,
    ROUTER_LOG,
    ROUTER_LOG_INDEX,
    RUN_CONFIG,
    SATURATION_CHECKPOINT,
    TRAIN_LOG,
    TRAIN_SUMMARY,
)
from gtmoe.data.shards import TokenBlocks
from gtmoe.device import peak_memory_mb, resolve_device
from gtmoe.errors import ConfigError, DataError
from gtmoe.files import write_atomic
from gtmoe.model import MoETransformer, build_model
from gtmoe.probe import probe_block_ids, route_probe
from gtmoe.runfiles import (
    RUN_IDENTITY,
    SATURATION_RECORD,
    NonFiniteLossError,
    RunError,
    checkpoint_identity,
    config_differences,
    describe_differences,
    load_checkpoint,
    manifest_path,
    prepare_run_dir,
    saturation_record,
    save_checkpoint,
    unwritable,
)
from gtmoe.stability import SNAPSHOT_RECORD, pack_snapshot, snapshot_record
from gtmoe.step import StepResult, build_optimizer, lr_lambda, train_step

log = logging.getLogger("gtmoe.train")


class DataOrder:
    """Block indices of micro-batch m: epoch e is a permutation drawn from (seed, e) alone.

    The order depends on nothing but the seed, so every variant with the same
    seed sees the same batches, and resuming at micro-batch m needs no state.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        if n_blocks < 1:
            raise DataError("the training split has no full block; lower data.seq_len or check the corpus")
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


@dataclass(frozen=True)
class Probe:
    """The routing probe on the device: its validation block ids, inputs and targets (blocks, seq_len), and which
    of its tokens count (`valid`, (N,): not padding)."""

    blocks: np.ndarray
    inputs: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor


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
                    # "load", then the router's declared state (Router.state_names), as logged
                    self.router_rows.append(
                        {
                            "step": step,
                            "layer": layer,
                            "expert": expert,
                            **{name: float(values[expert]) for name, values in host.items()},
                        }
                    )
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


class Trainer:
    """One run's training: setup and resume, the step loop, logging, checkpoints and the outputs.

    State lives on the instance (no closures), and every boundary reads the device only there:
    the non-finite flag at log and checkpoint steps, the log rows when they are flushed.
    """

    def __init__(self, cfg: RunConfig, out_dir: Path):
        self.cfg, self.tcfg, self.out_dir = cfg, cfg.train, out_dir
        prepare_run_dir(out_dir)
        self.device = resolve_device(self.tcfg.device)
        try:
            write_atomic(out_dir / RUN_CONFIG, lambda tmp: save_run_config(cfg, tmp))
        except OSError as exc:
            raise unwritable(out_dir, exc, "the run directory") from None
        self.data = TokenBlocks(Path(cfg.data.shards) / "train")
        if self.data.seq_len > cfg.model.max_seq_len:
            raise ConfigError(
                f"config key 'model.max_seq_len' = {cfg.model.max_seq_len}: shorter than the shards' "
                f"sequence length {self.data.seq_len}"
            )
        self.order = DataOrder(self.data.n_full_blocks, self.tcfg.batch_size, self.tcfg.seed)
        torch.manual_seed(self.tcfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.optimizer = build_optimizer(self.model, self.tcfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.tcfg))
        self.forward = torch.compile(self.model) if self.tcfg.compile else self.model
        self.final_path, self.checkpoint_path = out_dir / CHECKPOINT, out_dir / RESUME_CHECKPOINT
        self.trainlog, self.step, self.skipped, self.elapsed_before = TrainLog(), 0, 0, 0.0
        self.last_saved: int | None = None
        self.saturation: dict | None = None  # runfiles.saturation_record of the saturation checkpoint, once written
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.tokens_per_step = self.tcfg.batch_size * self.tcfg.grad_accum * self.data.seq_len
        self.probe, self.snapshot_steps = self.load_probe(), frozenset(self.tcfg.snapshot_steps())
        self.snapshots: dict[int, torch.Tensor] = {}  # step -> packed expert sets, kept on the device
        self.resume()
        if self.step == 0:  # a resumed run restores what its routers were fitted to from the checkpoint
            self.fit_routers_to_data(cfg.model.vocab_size)
        self.start_step, self.t0 = self.step, time.perf_counter()

    def load_probe(self) -> Probe | None:
        """The routing probe's blocks on the device where this run takes routing snapshots (train.routing_snapshots
        > 0, MoE layers, eval.probe_blocks > 0); else None."""
        cfg = self.cfg
        if not (self.tcfg.routing_snapshots > 0 and self.model.moe_layers and cfg.eval.probe_blocks > 0):
            return None
        data = TokenBlocks(Path(cfg.data.shards) / "validation")
        blocks = probe_block_ids(len(data), cfg.eval.probe_blocks)
        if len(blocks) == 0:
            return None
        inputs, targets = (tensor.to(self.device) for tensor in data.batch(blocks))
        return Probe(blocks, inputs, targets, (targets != IGNORE_INDEX).reshape(-1))

    def take_snapshot(self) -> None:
        """Route the probe with the model as it is after this step (eval mode, the uncompiled module) and keep its
        expert sets, packed, on the device: no host sync."""
        probe = self.probe
        sets, _ = route_probe(self.model, probe.inputs, probe.targets, self.tcfg.batch_size, self.device)
        self.snapshots[self.step] = pack_snapshot(sets)

    def snapshot_record(self) -> dict | None:
        """The snapshots taken so far, for a checkpoint (gtmoe.stability.snapshot_record); None without any."""
        if not self.snapshots:
            return None
        steps = sorted(self.snapshots)
        packed = torch.stack([self.snapshots[step] for step in steps])
        return snapshot_record(steps, packed, self.probe.valid, self.probe.blocks, self.cfg.model.n_experts)

    def restore_snapshots(self, record: dict | None) -> None:
        """The snapshots a checkpoint holds, where they are of this run's probe and schedule: a run resumed with
        another eval.probe_blocks (other tokens) drops them, one with another train.routing_snapshots keeps those
        at steps of its own schedule."""
        if not record or self.probe is None:
            return
        if list(record["probe_blocks"]) != self.probe.blocks.tolist():
            log.warning("%s: routing snapshots before step %d were of another probe; dropped", self.out_dir, self.step)
            return
        for step, packed in zip(record["steps"], record["sets"].to(self.device)):
            if step in self.snapshot_steps:
                self.snapshots[step] = packed

    def fit_routers_to_data(self, vocab_size: int) -> None:
        """Hand the routers that ask for it (hash routing) the train split's routed-token counts."""
        fitted = [layer.router for layer in self.model.moe_layers if layer.router.wants_train_token_counts]
        if fitted:
            counts = self.data.routed_token_counts(vocab_size)
            for router in fitted:
                router.fit_to_token_counts(counts)

    def resume(self) -> None:
        """Continue from the run directory's checkpoint, if it has one (the finished one first)."""
        path = self.final_path if self.final_path.exists() else self.checkpoint_path
        if not path.exists():
            return
        state = load_checkpoint(path, self.device, repair_manifest=True)
        # The same run (gtmoe.contract.weight_config): a new logging or checkpoint interval resumes.
        differences = config_differences(state["config"], self.cfg.to_dict())
        if differences:
            raise RunError(
                f"{path} was written by a different run: "
                f"{describe_differences(differences, path.name, 'this config')}; "
                f"delete {self.out_dir} (or use another --out) to start this run afresh"
            )
        self.model.load_state_dict(state["model"])
        self.saturation = state.get(SATURATION_RECORD)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], self.device)
        self.step = self.last_saved = state["step"]
        self.skipped, self.elapsed_before = state["skipped_steps"], state["elapsed_s"]
        self.trainlog.rows, self.trainlog.router_rows = state["log"], state["router_log"]
        self.restore_snapshots(state.get(SNAPSHOT_RECORD))
        log.info("resuming %s from step %d", self.out_dir, self.step)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def diverged(self, what: str) -> NonFiniteLossError:
        kept = (
            f"the last good checkpoint {self.checkpoint_path} (step {self.last_saved}) was kept"
            if self.last_saved is not None and self.checkpoint_path.exists()
            else "no checkpoint was written yet"
        )
        return NonFiniteLossError(
            f"{what} in {self.out_dir}; {kept}. On CPU a rerun repeats the same steps: to get past it, delete "
            f"{self.out_dir} and retrain with a lower train.lr, or with train.nonfinite: skip to drop such steps"
        )

    def check_finite(self) -> None:
        bad = int(self.first_bad_step)  # one host sync, at log and checkpoint boundaries only
        if bad >= 0:
            raise self.diverged(f"non-finite loss at step {bad}")

    def save(self, path: Path, complete: bool = False) -> None:
        self.trainlog.flush()
        save_checkpoint(
            {
                RUN_IDENTITY: checkpoint_identity(self.cfg, self.step),
                SATURATION_RECORD: self.saturation,
                "config": self.cfg.to_dict(),
                "step": self.step,
                "complete": complete,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(self.device),
                "skipped_steps": self.skipped,
                "log": self.trainlog.rows,
                "router_log": self.trainlog.router_rows,
                SNAPSHOT_RECORD: self.snapshot_record(),
                "elapsed_s": self.elapsed(),
            },
            path,
        )
        self.last_saved = self.step

    def save_saturation(self) -> None:
        """The mid-training model router saturation is measured against, tied to this run: it records the
        run's identity and config, and the later checkpoints its step and sha256 (runfiles.saturation_record)."""
        state = {
            RUN_IDENTITY: checkpoint_identity(self.cfg, self.step),
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
        }
        self.saturation = saturation_record(self.step, save_checkpoint(state, self.out_dir / SATURATION_CHECKPOINT))

    def train_one_step(self) -> StepResult:
        tcfg, first = self.tcfg, self.step * self.tcfg.grad_accum
        batches = (self.data.batch(self.order.micro_batch(first + micro)) for micro in range(tcfg.grad_accum))
        result = train_step(self.model, self.forward, self.optimizer, batches, tcfg, self.device)
        if result.applied:
            self.first_bad_step = torch.where(
                (self.first_bad_step < 0) & ~result.finite, self.step, self.first_bad_step
            )
        else:
            self.skipped += 1
            log.warning("step %d: non-finite loss, update skipped (%d skipped so far)", self.step, self.skipped)
            if self.skipped > tcfg.max_skipped_steps:
                raise self.diverged(
                    f"non-finite loss at step {self.step}: more than train.max_skipped_steps = "
                    f"{tcfg.max_skipped_steps} steps skipped"
                )
        self.scheduler.step()
        self.step += 1
        return result

    def log_step(self, result: StepResult, progress: tqdm, since: tuple[float, int]) -> tuple[float, int]:
        """Append and flush the training log row of this step; returns the new (time, step) of the last flush."""
        self.trainlog.pending.append(
            (
                self.step,
                {
                    "loss": result.loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": result.grad_norm,
                    "aux_loss": float("nan"),
                    "z_loss": float("nan"),
                    **result.router_metrics,
                },
            )
        )
        now = time.perf_counter()
        self.trainlog.flush()
        self.check_finite()
        row = self.trainlog.rows[-1]
        row["tokens_per_s"] = (self.step - since[1]) * self.tokens_per_step / max(now - since[0], 1e-9)
        row["elapsed_s"] = self.elapsed()
        progress.set_postfix(loss=f"{row['loss']:.3f}")
        tcfg = self.tcfg
        if progress.disable and (
            self.step % max(tcfg.log_every, tcfg.max_steps // 20) == 0 or self.step == tcfg.max_steps
        ):
            log.info(
                "%s seed %d step %d/%d loss %.4f lr %.2e %.0f tok/s",
                self.cfg.variant,
                tcfg.seed,
                self.step,
                tcfg.max_steps,
                row["loss"],
                row["lr"],
                row["tokens_per_s"],
            )
        return now, self.step

    def log_routers(self) -> None:
        self.trainlog.pending_router.append(
            (
                self.step,
                [
                    {
                        "load": layer.router.last_step_load.clone(),
                        **{k: v.detach().clone() for k, v in layer.router.logged_state().items()},
                    }
                    for layer in self.model.moe_layers
                ],
            )
        )

    def run(self, stop_after: int | None = None) -> dict:
        tcfg = self.tcfg
        saturation_step = max(1, round(tcfg.saturation_checkpoint * tcfg.max_steps))
        self.model.train()
        progress = tqdm(
            total=tcfg.max_steps,
            initial=self.step,
            desc=f"{self.cfg.variant} seed {tcfg.seed}",
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        )
        since = (time.perf_counter(), self.step)
        if self.probe is not None and self.step == 0 and 0 in self.snapshot_steps:
            self.take_snapshot()  # the routing at initialisation, before the first update
        while self.step < tcfg.max_steps:
            result = self.train_one_step()
            progress.update(1)
            step, last = self.step, self.step == tcfg.max_steps
            stopping = stop_after is not None and step >= stop_after and not last
            if step % tcfg.log_every == 0 or last:
                since = self.log_step(result, progress, since)
            if self.model.moe_layers and (step % tcfg.router_log_every == 0 or last):
                self.log_routers()
            # After the logging (the probe's forward replaces each layer's last routing), before any checkpoint.
            if self.probe is not None and step in self.snapshot_steps:
                self.take_snapshot()
            if step == saturation_step:
                self.check_finite()
                self.save_saturation()
            if (step % tcfg.checkpoint_every == 0 and not last) or stopping:
                self.check_finite()
                self.save(self.checkpoint_path)
            if stopping:
                progress.close()
                return {"stopped_at": step}
        progress.close()
        return self.finish()

    def finish(self) -> dict:
        self.check_finite()
        if self.start_step < self.tcfg.max_steps or not self.final_path.exists():
            self.save(self.final_path, complete=True)
        summary = write_outputs(self.out_dir, self.cfg, self.model, self.trainlog, self.device, self.skipped)
        # Only now: a kill while the outputs were written (Snakemake then deletes them all,
        # checkpoint.pt included) still resumes from here rather than from step 0.
        for path in (self.checkpoint_path, manifest_path(self.checkpoint_path)):
            path.unlink(missing_ok=True)
        return summary


def train(cfg: RunConfig, out_dir: str | Path, *, stop_after: int | None = None) -> dict:
    """Train one run into `out_dir` (resuming if it holds a checkpoint). Returns the train summary.

    `stop_after` ends the process's work after that many optimizer steps in
    total (checkpointing first), to test resumption without killing a process.
    """
    return Trainer(cfg, Path(out_dir)).run(stop_after)


def write_outputs(
    out_dir: Path, cfg: RunConfig, model: MoETransformer, trainlog: TrainLog, device: torch.device, skipped: int
) -> dict:
    trainlog.flush()
    train_log = pd.DataFrame(trainlog.rows)
    # Written for every variant (empty for dense) so the workflow can declare it.
    state_names = model.moe_layers[0].router.state_names if model.moe_layers else ()
    router_log = pd.DataFrame(trainlog.router_rows, columns=[*ROUTER_LOG_INDEX, *state_names])
    n_params, n_active = model.parameter_counts()
    last = trainlog.rows[-1] if trainlog.rows else {}
    summary = {
        "variant": cfg.variant,
        "seed": cfg.train.seed,
        "router": cfg.router.name,
        "steps": cfg.train.max_steps,
        "final_loss": last.get("loss"),
        "wall_s": last.get("elapsed_s"),
        "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in trainlog.rows])) if trainlog.rows else None,
        "skipped_steps": skipped,
        "n_params": n_params,
        "n_active_params": n_active,
        "peak_mem_mb": peak_memory_mb(device),
        "device": str(device),
    }
    for name, write in (
        (TRAIN_LOG, lambda tmp: train_log.to_parquet(tmp, index=False)),
        (ROUTER_LOG, lambda tmp: router_log.to_parquet(tmp, index=False)),
        (TRAIN_SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=2))),
    ):
        try:
            write_atomic(out_dir / name, write)
        except OSError as exc:
            raise unwritable(out_dir / name, exc, "the run output") from None
    return summary
