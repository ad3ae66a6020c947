"""Top-k token-choice routing (GShard / Mixtral), dropless, with the balance loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.routers.base import Router, RouterOptions, Routing, softmax
from gtmoe.routers.registry import register


@dataclass
class TopKOptions(RouterOptions):
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001


@register("topk")
class TopKRouter(Router):
    """Select the top-k experts of `g(x) + selection_bias()`; weights = softmax of g over the selected.

    Subclasses that steer selection with per-expert state (loss-free bias,
    RD-ESI incentives) override `selection_terms` (or `selection_bias`) and
    nothing else in routing. Each named term's flip rate, the fraction of
    tokens whose top-k set changes when that term is removed from the score,
    is reported in `Routing.metrics` as `flip_rate_<term>`: it shows whether a
    term can matter at all.
    """

    Config = TopKOptions
    label = "top-k"

    def selection_terms(self) -> dict[str, Tensor]:
        """Named per-expert terms (E,) whose sum is added to the logits for selection only."""
        return {}

    def selection_bias(self) -> Tensor | None:
        """Per-expert term (E,) added to the logits for selection only; None for plain top-k."""
        terms = list(self.selection_terms().values())
        return torch.stack(terms).sum(dim=0) if terms else None

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        logits = self.gate(x).float()  # routing in fp32 even under bf16 autocast
        bias = self.selection_bias()
        scores = logits if bias is None else logits + bias
        choice = scores.topk(self.top_k, dim=-1).indices  # (T, k)
        weight = softmax(logits.gather(-1, choice))
        loss, metrics = self.aux_losses(logits, None, choice)
        metrics.update(self.flip_rates(scores, choice, valid))

        n_tokens = x.shape[0]
        token = torch.arange(n_tokens, device=x.device).repeat_interleave(self.top_k)
        expert = choice.reshape(-1)
        self.record(expert, token)
        return Routing(
            expert=expert, token=token, weight=weight.reshape(-1).to(x.dtype), loss=loss, metrics=metrics, choice=choice
        )

    @torch.no_grad()
    def flip_rates(self, scores: Tensor, choice: Tensor, valid: Tensor | None) -> dict[str, Tensor]:
        """`flip_rate_<term>`: fraction of (valid) tokens whose top-k set changes without that term."""
        terms = self.selection_terms()
        if not terms:
            return {}
        chosen = choice.sort(dim=-1).values
        weight = None if valid is None else valid.float() / valid.sum().clamp_min(1)
        rates = {}
        for name, term in terms.items():
            without = (scores - term).topk(self.top_k, dim=-1).indices.sort(dim=-1).values
            flipped = (without != chosen).any(dim=-1).float()
            rates[f"flip_rate_{name}"] = flipped.mean() if weight is None else (flipped * weight).sum()
        return rates
