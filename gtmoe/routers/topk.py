"""Top-k token-choice routing (GShard / Mixtral), dropless, with the balance loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gtmoe.routers import register
from gtmoe.routers.base import Router, RouterOptions, Routing


@dataclass
class TopKOptions(RouterOptions):
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001


@register("topk")
class TopKRouter(Router):
    """Select the top-k experts of `g(x) + selection_bias()`; weights = softmax of g over the selected.

    Subclasses that steer selection with per-expert state (loss-free bias,
    RD-ESI incentives) override `selection_bias` and nothing else in routing.
    """

    Config = TopKOptions

    def selection_bias(self) -> Tensor | None:
        """Per-expert term (E,) added to the logits for selection only; None for plain top-k."""
        return None

    def forward(self, x: Tensor) -> Routing:
        logits = self.gate(x).float()  # routing in fp32 even under bf16 autocast
        bias = self.selection_bias()
        scores = logits if bias is None else logits + bias
        choice = scores.topk(self.top_k, dim=-1).indices  # (T, k)
        weight = F.softmax(logits.gather(-1, choice), dim=-1)
        loss, metrics = self.aux_losses(logits, F.softmax(logits, dim=-1), choice)

        n_tokens = x.shape[0]
        token = torch.arange(n_tokens, device=x.device).repeat_interleave(self.top_k)
        expert = choice.reshape(-1)
        self.record(expert, token)
        return Routing(expert=expert, token=token, weight=weight.reshape(-1).to(x.dtype),
                       loss=loss, metrics=metrics, choice=choice)
