"""One optimizer step, shared by the trainer and the benchmark: the learning-rate schedule, AdamW with the
routers' state update attached to its step, the micro-batch loop (forward, router losses, backward,
clipping, finite flag; also what the compile and host-sync tests run) and the non-finite policy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gtmoe.device import autocast_context
from gtmoe.model import MoETransformer


def lr_lambda(cfg) -> callable:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: MoETransformer, cfg) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms) do not (nanoGPT). Every `step()` is followed by the
    stateful routers' update (an optimizer step post-hook), so no loop that steps the optimizer can
    forget it. torchtitan attaches its expert-bias update to the optimizer too, but as a step
    *pre*-hook (`build_optimizers_with_moe_load_balancing`); either way the update consumes the
    statistics of the step's own forward passes and the next forward sees the new state."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel per parameter group instead of a dozen foreach passes over the optimizer state.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    optimizer.register_step_post_hook(lambda *_: model.update_router_states())
    return optimizer


def accumulate_gradients(model: MoETransformer, forward, batches, tcfg, device: torch.device):
    """Forward and backward of one optimizer step's micro-batches, then gradient clipping.

    `batches` yields (inputs, targets) on the host; `forward` is the model or its compiled
    form. Returns the mean LM loss, the gradient norm before clipping, whether both are
    finite, and the router metrics (auxiliary loss terms, flip rates) averaged over the
    micro-batches, all as device tensors: nothing here reads a value on the host.
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


@dataclass
class StepResult:
    loss: torch.Tensor  # mean LM loss of the micro-batches (device tensor)
    grad_norm: torch.Tensor  # before clipping
    finite: torch.Tensor  # bool: loss and gradient norm finite
    router_metrics: dict[str, torch.Tensor]  # auxiliary loss terms, flip rates
    applied: bool  # False: a non-finite step skipped under train.nonfinite 'skip'


def train_step(
    model: MoETransformer, forward, optimizer: torch.optim.Optimizer, batches, tcfg, device: torch.device
) -> StepResult:
    """One optimizer step: the micro-batches' gradients, then the update (and, by the optimizer's
    post-hook, the routers' state). Under train.nonfinite 'skip' a non-finite step is dropped: no
    update, and the routers forget its statistics; that costs one host sync per step, so only
    then. Otherwise nothing is read on the host: the caller watches `finite`."""
    loss, grad_norm, finite, router_metrics = accumulate_gradients(model, forward, batches, tcfg, device)
    applied = tcfg.nonfinite != "skip" or bool(finite)
    if applied:
        optimizer.step()
    else:
        model.reset_router_step_statistics()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, finite, router_metrics, applied)
