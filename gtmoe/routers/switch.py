"""Switch Transformer routing (Fedus et al. 2021): top-1 with an expert capacity.

C = ceil(capacity_factor * T / E). Tokens past an expert's capacity (in token
order) are dropped: they skip the layer through the residual connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gtmoe.routers.base import CapacityOptions, Router, Routing, softmax
from gtmoe.routers.registry import register


@dataclass
class SwitchOptions(CapacityOptions):
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    capacity_factor: float = 1.25


@register("switch")
class SwitchRouter(Router):
    Config = SwitchOptions
    label = "Switch (top-1)"

    def active_experts_per_token(self) -> float:
        return 1.0

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.options.capacity_factor * n_tokens / self.n_experts)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        logits = self.gate(x).float()
        probs = softmax(logits)
        choice = logits.argmax(dim=-1, keepdim=True)  # (T, 1)
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
