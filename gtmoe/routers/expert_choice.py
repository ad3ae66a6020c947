"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

C = ceil(capacity_factor * T * k / E), so on average a token gets k experts but
any token may get 0..E. Balanced by construction. Caveat (stated in the
report): choosing over the whole batch lets a token's routing depend on later
tokens, so a causal LM's perplexity under it is not strictly comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.routers.base import CapacityOptions, Router, Routing, softmax
from gtmoe.routers.registry import register


@dataclass
class ExpertChoiceOptions(CapacityOptions):
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    capacity_factor: float = 1.0


@register("expert_choice")
class ExpertChoiceRouter(Router):
    Config = ExpertChoiceOptions
    label = "expert choice"
    balance_knob = "capacity_factor"  # balanced by construction: the capacity sets how many tokens each takes
    balanced_by_construction = True  # every expert takes exactly its capacity C: load Gini 0 by construction

    def capacity(self, n_tokens: int) -> int:
        return min(n_tokens, math.ceil(self.options.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def active_experts_per_token(self) -> float:
        return min(float(self.n_experts), self.options.capacity_factor * self.top_k)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        logits = self.gate(x).float()
        probs = softmax(logits)  # (T, E)
        capacity = self.capacity(x.shape[0])
        # Padding ranks below every real token (probabilities are >= 0), and is dropped if still chosen.
        priority = probs if valid is None else torch.where(valid.unsqueeze(-1), probs, -1.0)
        _, token = priority.topk(capacity, dim=0)  # (C, E): each expert's chosen tokens
        weight = probs.gather(0, token).t().reshape(-1)
        expert = torch.arange(self.n_experts, device=x.device).repeat_interleave(capacity)
        token = token.t().reshape(-1)
        if valid is not None:
            expert = torch.where(valid[token], expert, self.n_experts)
        # Off by default: balanced by construction, but a z-loss can still be switched on.
        loss, metrics = self.aux_losses(logits, probs, expert.view(-1, 1))
        self.record(expert, token)
        return Routing(expert=expert, token=token, weight=weight.to(x.dtype), loss=loss, metrics=metrics)
