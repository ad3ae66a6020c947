"""Evaluation of a trained run on a split: perplexity and every load metric of SPEC §5.

Routing statistics are gathered per MoE layer over the whole split (padding
positions excluded), turned into metrics by the pure functions of
`gtmoe.metrics`, then averaged over layers; per-layer values are kept.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from gtmoe import metrics
from gtmoe.config import load_run_config
from gtmoe.data import TokenBlocks
from gtmoe.model import IGNORE_INDEX, MoETransformer
from gtmoe.train import (CHECKPOINT, SATURATION_CHECKPOINT, RunError, autocast_context, build_model,
                         load_checkpoint, peak_memory_mb, resolve_device)

LOAD_METRICS = ("gini", "load_entropy", "cv", "maxvio_global", "maxvio_batch", "dead_experts", "drop_rate",
                "token_expert_mi")


class LayerStats:
    """Routing counts of one MoE layer accumulated over evaluation batches (on the host)."""

    def __init__(self, n_experts: int, vocab_size: int):
        self.n_experts = n_experts
        self.counts = np.zeros(n_experts, dtype=np.int64)
        self.joint = np.zeros((vocab_size, n_experts), dtype=np.int64)  # token id x expert
        self.batch_maxvio: list[float] = []
        self.tokens = 0
        self.tokens_without_expert = 0

    def add(self, routing, token_ids: torch.Tensor, valid: torch.Tensor) -> None:
        n_experts = self.n_experts
        kept = (routing.expert < n_experts) & valid[routing.token]
        expert = torch.where(kept, routing.expert, n_experts)  # invalid -> overflow column
        counts = torch.zeros(n_experts + 1, dtype=torch.long, device=expert.device).scatter_add_(
            0, expert, torch.ones_like(expert))[:n_experts].cpu().numpy()
        self.counts += counts
        if counts.sum() > 0:
            self.batch_maxvio.append(metrics.max_violation(counts))
        joint = torch.zeros((self.joint.shape[0], n_experts + 1), dtype=torch.long, device=expert.device)
        joint.index_put_((token_ids[routing.token], expert), torch.ones_like(expert), accumulate=True)
        self.joint += joint[:, :n_experts].cpu().numpy()
        per_token = torch.zeros(valid.numel(), dtype=torch.long, device=expert.device).scatter_add_(
            0, routing.token, kept.long())
        self.tokens += int(valid.sum())
        self.tokens_without_expert += int(((per_token == 0) & valid).sum())

    def summary(self, layer: int) -> dict:
        load = metrics.load_metrics(self.counts)
        return {
            "layer": layer,
            "load": self.counts.tolist(),
            "gini": load["gini"],
            "load_entropy": load["load_entropy"],
            "cv": load["cv"],
            "maxvio_global": load["maxvio"],
            "maxvio_batch": float(np.mean(self.batch_maxvio)) if self.batch_maxvio else float("nan"),
            "dead_experts": load["dead_experts"],
            "drop_rate": self.tokens_without_expert / max(self.tokens, 1),
            "token_expert_mi": metrics.token_expert_mutual_information(self.joint),
        }


def _load_model(cfg, path: Path, device: torch.device) -> MoETransformer:
    model = build_model(cfg).to(device)
    model.load_state_dict(load_checkpoint(path, device)["model"])
    return model.eval()


@torch.no_grad()
def evaluate(run_dir: str | Path, split: str, *, batch_size: int | None = None, device: str | None = None) -> dict:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir / "config.yaml")
    if device:
        dev = resolve_device(device, "--device")
    else:
        dev = resolve_device(cfg.train.device, f"{run_dir / 'config.yaml'} key 'train.device'")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT, dev)
    if not checkpoint.get("complete"):
        raise RunError(f"{run_dir / CHECKPOINT} is from step {checkpoint['step']} of {cfg.train.max_steps}: "
                       f"training is not finished; rerun `python -m gtmoe train --out {run_dir}` first")
    model = build_model(cfg).to(dev)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    early = None
    if (run_dir / SATURATION_CHECKPOINT).exists() and model.moe_layers:
        early = _load_model(cfg, run_dir / SATURATION_CHECKPOINT, dev)

    data = TokenBlocks(Path(cfg.data.shards) / split)
    batch_size = batch_size or cfg.eval.batch_size
    stats = [LayerStats(cfg.model.n_experts, cfg.model.vocab_size) for _ in model.moe_layers]
    # Per layer, (early, final) top-k choices of the same tokens, for router saturation.
    choices: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in model.moe_layers]
    nll_sum, n_tokens, forward_s = 0.0, 0, 0.0

    for start in range(0, len(data), batch_size):
        x, y = data.batch(np.arange(start, min(start + batch_size, len(data))))
        x, y = x.to(dev), y.to(dev)
        valid = (y != IGNORE_INDEX).reshape(-1)
        t0 = time.perf_counter()
        with autocast_context(dev):
            out = model(x, y)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        forward_s += time.perf_counter() - t0
        nll_sum += float(out.token_loss.double().sum())
        n_tokens += int(valid.sum())
        flat_ids = x.reshape(-1)
        for layer_stats, layer in zip(stats, model.moe_layers):
            layer_stats.add(layer.last_routing, flat_ids, valid)
        if early is not None and (not cfg.eval.saturation_blocks or start < cfg.eval.saturation_blocks):
            with autocast_context(dev):
                early(x)
            for (early_layer, final_layer), a, b in zip(choices, early.moe_layers, model.moe_layers):
                if a.last_routing.choice is not None:
                    early_layer.append(a.last_routing.choice[valid].cpu().numpy())
                    final_layer.append(b.last_routing.choice[valid].cpu().numpy())

    per_layer = [s.summary(i) for i, s in enumerate(stats)]
    saturation = [metrics.router_saturation(np.concatenate(e), np.concatenate(f)) for e, f in choices if e]
    n_params, n_active = model.parameter_counts()
    result = {
        "variant": cfg.variant, "seed": cfg.train.seed, "split": split, "router": cfg.router.name, "status": "ok",
        "ppl": metrics.perplexity(nll_sum, n_tokens), "word_ppl": metrics.perplexity(nll_sum, data.n_words),
        "nll": nll_sum / max(n_tokens, 1), "tokens": n_tokens, "words": data.n_words,
    }
    for name in LOAD_METRICS:
        values = [layer[name] for layer in per_layer]
        result[name] = float(np.mean(values)) if values else None
    result.update({
        "router_saturation": float(np.mean(saturation)) if saturation else None,
        "n_params": n_params, "n_active_params": n_active,
        "tokens_per_s": n_tokens / forward_s if forward_s > 0 else None, "wall_s": forward_s,
        "peak_mem_mb": peak_memory_mb(dev), "device": str(dev),
        "n_experts": cfg.model.n_experts if model.moe_layers else 0, "top_k": cfg.model.top_k,
        "train_step": checkpoint["step"], "per_layer": per_layer,
    })
    return _finite_or_none(result)


def _finite_or_none(obj):
    """JSON has no NaN: undefined values (e.g. a metric of an empty layer) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj
