"""Top-k token-choice routing (GShard / Mixtral), dropless unless given a capacity, with the balance loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.routers.base import Router, Routing, softmax
from gtmoe.routers.capacity import CapacityPolicyOptions, apply_capacity, expert_capacity
from gtmoe.routers.registry import register


@dataclass
class TopKOptions(CapacityPolicyOptions):
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001


@register("topk")
class TopKRouter(Router):
    """Select the top-k experts of `scores(g) + selection_bias()`; weights = softmax of g over the selected.

    Routing is split into hooks a subclass overrides alone:

    - `scores(logits)`: the (T, E) scores the selection terms are added to (the logits g here; the gate
      scores G(g) for loss-free balancing);
    - `selection_terms()` (or `selection_bias()`): per-expert terms (E,) added to the scores for selection
      only (loss-free bias, RD-ESI incentives);
    - `select(selection)`: the (T, k) chosen experts (top-k here; group-limited top-k, say);
    - `combine_weights(logits, choice)`: the (T, k) weights of the chosen experts' outputs;
    - `routing_losses(logits, scores, choice, valid)`: the weighted auxiliary losses and their terms.

    Each named term's flip rate, the fraction of tokens whose top-k set changes when that term is
    removed from the selection scores, is reported in `Routing.metrics` as `flip_rate_<term>`: it shows
    whether a term can matter at all. With `capacity_factor` set, experts take at most their capacity of
    the group (gtmoe.routers.capacity); `Routing.choice` stays the selection, `expert` says who took it.
    """

    Config = TopKOptions
    label = "top-k"

    def selection_terms(self) -> dict[str, Tensor]:
        """Named per-expert terms (E,) whose sum is added to the scores for selection only."""
        return {}

    def selection_bias(self) -> Tensor | None:
        """Per-expert term (E,) added to the scores for selection only; None for plain top-k."""
        terms = list(self.selection_terms().values())
        return torch.stack(terms).sum(dim=0) if terms else None

    def scores(self, logits: Tensor) -> Tensor:
        """The (T, E) scores the selection terms are added to: the gate logits for plain top-k."""
        return logits

    def select(self, scores: Tensor) -> Tensor:
        """The (T, k) experts chosen from the selection scores (T, E): the top k of each row."""
        return scores.topk(self.top_k, dim=-1).indices

    def combine_weights(self, logits: Tensor, choice: Tensor) -> Tensor:
        """(T, k) weights of the chosen experts' outputs: softmax of the gate logits over the chosen."""
        return softmax(logits.gather(-1, choice))

    def routing_losses(
        self, logits: Tensor, scores: Tensor, choice: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted auxiliary losses (scalar) and each unweighted term, for the chosen (T, k) experts."""
        return self.aux_losses(logits, None, choice)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        logits = self.gate(x).float()  # routing in fp32 even under bf16 autocast
        scores = self.scores(logits)
        bias = self.selection_bias()
        selection = scores if bias is None else scores + bias
        choice = self.select(selection)  # (T, k)
        loss, metrics = self.routing_losses(logits, scores, choice, valid)
        metrics.update(self.flip_rates(selection, choice, valid))

        routed, weighted = choice, choice
        capacity_factor = getattr(self.options, "capacity_factor", None)
        if capacity_factor is not None:
            policy = self.options.capacity_policy
            capacity = expert_capacity(capacity_factor, x.shape[0], self.top_k, self.n_experts)
            routed, shares = apply_capacity(choice, selection, capacity, self.n_experts, valid, policy)
            metrics.update(shares)
            if policy == "reroute":  # a re-routed slot is weighted as its new expert; a dropped one keeps its own
                weighted = torch.where(routed == self.n_experts, choice, routed)
        weight = self.combine_weights(logits, weighted)

        return self.token_choice_routing(choice, routed, weight, loss, metrics, x.dtype)

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
            without = self.select(scores - term).sort(dim=-1).values
            flipped = (without != chosen).any(dim=-1).float()
            rates[f"flip_rate_{name}"] = flipped.mean() if weight is None else (flipped * weight).sum()
        return rates
