"""Switch Transformer routing (Fedus et al. 2021): top-1 with an expert capacity.

C = ceil(cf * T / E), with cf = `capacity_factor` in training and `eval_capacity_factor` at evaluation
(ST-MoE, Zoph et al. 2022, trains at 1.25 and evaluates at 2.0; DeepSpeed's TopKGate and fairseq's
Top1Gate take `capacity_factor if self.training else eval_capacity_factor` the same way). Tokens past an
expert's capacity (in token order) are dropped: they skip the layer through the residual connection.
`Routing.choice` keeps the argmax before the capacity cut, so evaluation reports the load the router asked
for beside the load the experts got.

`jitter_eps` > 0 is the paper's multiplicative input jitter (its 1e-2): in training only, the router's
input is x * U(1 - eps, 1 + eps), elementwise, before the gate; the experts still get x itself
(transformers' SwitchTransformersTop1Router and DeepSpeed's `multiplicative_jitter` jitter the gate's
input only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import CapacityOptions, Router, Routing, softmax
from gtmoe.routers.registry import register


@dataclass
class SwitchOptions(CapacityOptions):
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    capacity_factor: float = 1.25  # training (Switch, ST-MoE)
    eval_capacity_factor: float = 2.0  # evaluation (ST-MoE): fewer drops where no gradient needs a fixed budget
    jitter_eps: float = 0.0  # multiplicative jitter of the router input in training; the paper's is 1e-2

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(
            math.isfinite(self.eval_capacity_factor) and self.eval_capacity_factor > 0,
            f"{prefix}.eval_capacity_factor",
            self.eval_capacity_factor,
            "must be > 0",
        )
        # Below 1: the jitter factor 1 +- eps stays positive, so it never flips the sign of an input.
        check(0 <= self.jitter_eps < 1, f"{prefix}.jitter_eps", self.jitter_eps, "must be in [0, 1)")


@register("switch")
class SwitchRouter(Router):
    Config = SwitchOptions
    label = "Switch (top-1)"

    def active_experts_per_token(self) -> float:
        return 1.0

    def capacity_factor(self) -> float:
        """The capacity factor in force: training's, or evaluation's in eval mode."""
        return self.options.capacity_factor if self.training else self.options.eval_capacity_factor

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.capacity_factor() * n_tokens / self.n_experts)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        gate_input = x
        if self.training and self.options.jitter_eps > 0:
            # Drawn in fp32: bf16 spaces values near 1 by 2^-7, coarser than the paper's eps of 1e-2.
            eps = self.options.jitter_eps
            noise = torch.empty(x.shape, dtype=torch.float32, device=x.device).uniform_(1 - eps, 1 + eps)
            gate_input = (x.float() * noise).to(x.dtype)
        logits = self.gate(gate_input).float()
        probs = softmax(logits)
        choice = logits.argmax(dim=-1, keepdim=True)  # (T, 1): the expert asked for, before the capacity cut
        weight = probs.gather(-1, choice).squeeze(-1)  # the gate value itself, as in Switch

        # Position of each token in its expert's queue, in token order; padding joins no queue.
        one_hot = F.one_hot(choice.squeeze(-1), self.n_experts)
        if valid is not None:
            one_hot = one_hot * valid.unsqueeze(-1)
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
        kept = (position >= 0) & (position < self.capacity(x.shape[0]))
        expert = torch.where(kept, choice.squeeze(-1), self.n_experts)

        loss, metrics = self.aux_losses(logits, probs, choice)
        token = torch.arange(x.shape[0], device=x.device)
        self.record(expert, token)
        return Routing(expert=expert, token=token, weight=weight.to(x.dtype), loss=loss, metrics=metrics, choice=choice)
