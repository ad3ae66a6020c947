"""Dense softmax mixture over all experts: every expert processes every token (an upper reference).

    y(x) = sum_{i=1..E} p_i(x) E_i(x),    p(x) = softmax(x W_g)

The original mixture of experts (Jacobs et al. 1991, "Adaptive Mixtures of Local Experts": a softmax
gating network over all experts): no selection at all, so E / k times the expert FLOPs of a top-k MoE
with the same experts. It bounds what
routing could gain by consulting every expert, and its load is uniform by construction (every expert
takes all T tokens), so there is nothing to balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import Router, RouterOptions, Routing, softmax
from gtmoe.routers.registry import register


@dataclass
class SoftmaxAllOptions(RouterOptions):
    aux_loss_coef: float = 0.0  # must stay 0: with every expert taking every token, E * sum_i f_i P_i == 1
    z_loss_coef: float = 0.0

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(
            self.aux_loss_coef == 0,
            f"{prefix}.aux_loss_coef",
            self.aux_loss_coef,
            "must be 0: every expert takes every token, so the balance loss is the constant 1 (no gradient)",
        )


@register("softmax_all")
class SoftmaxAllRouter(Router):
    """Token choice with k = E: `Routing.choice` is (T, E), weights the softmax of g over all experts."""

    Config = SoftmaxAllOptions
    label = "softmax over all experts"
    balance_knob = None  # nothing to balance: every expert takes every token
    balanced_by_construction = True  # each expert's load is exactly T: load Gini 0 by construction

    def active_experts_per_token(self) -> float:
        return float(self.n_experts)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        logits = self.gate(x).float()
        probs = softmax(logits)  # (T, E)
        n_tokens = x.shape[0]
        choice = torch.arange(self.n_experts, device=x.device).expand(n_tokens, self.n_experts)
        loss, metrics = self.aux_losses(logits, probs, choice, valid)
        token = torch.arange(n_tokens, device=x.device).repeat_interleave(self.n_experts)
        expert = choice.reshape(-1)
        self.record(expert, token)
        return Routing(
            expert=expert, token=token, weight=probs.reshape(-1).to(x.dtype), loss=loss, metrics=metrics, choice=choice
        )
