"""Expert capacity for token-choice (top-k family) routers: drop or re-route what an expert cannot take.

An expert takes at most C = ceil(capacity_factor * T * k / E) assignments of a routing group (the T tokens
of a micro-batch, k assignments each). C counts every position of the group, padding included: the
number of valid tokens lives on the device and C must be a Python int (static shapes, no host read).
Padding never takes a place; its assignments are dropped (they feed no loss).

Priority is token order, and within a token slot order (first choice first): assignment a of the
token-major list (slot a % k of token a // k) comes before a + 1. Over capacity,

- `drop`: the assignment is dropped (expert = E; the MoE layer gives it weight 0, so the token's share
  for that slot passes through the residual connection), as Switch / GShard drop overflow;
- `reroute`: the assignment moves to the token's next-best expert with room, by the same selection
  scores, among the experts the token did not choose. This runs in at most E - k rounds: round 0 places
  every token's own choices (so a re-routed assignment never displaces another token's choice), and
  round r offers each token with an unplaced assignment its r-th best unchosen expert, which accepts
  offers in token order while it has room; a token's first unplaced slot takes the offer. An expert
  full in round r stays full, so each unplaced slot ends at the first alternative, in preference
  order, that still had room when offered. What is still unplaced after the rounds is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import RouterOptions, expert_counts

CAPACITY_POLICIES = ("drop", "reroute")


@dataclass
class CapacityPolicyOptions(RouterOptions):
    """Options of a token-choice router whose experts may have a capacity (unset: dropless)."""

    capacity_factor: float | None = None  # C = ceil(capacity_factor * T * k / E); None: no capacity (dropless)
    capacity_policy: str = "drop"  # what an assignment over capacity does: drop | reroute

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        if self.capacity_factor is not None:
            check(
                math.isfinite(self.capacity_factor) and self.capacity_factor > 0,
                f"{prefix}.capacity_factor",
                self.capacity_factor,
                "must be > 0 (or unset: dropless)",
            )
        check(
            self.capacity_policy in CAPACITY_POLICIES,
            f"{prefix}.capacity_policy",
            self.capacity_policy,
            f"must be one of {', '.join(CAPACITY_POLICIES)}",
        )


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """C = ceil(capacity_factor * T * k / E): assignments one expert takes from a group of T tokens."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def alternatives(selection: Tensor, choice: Tensor) -> Tensor:
    """(T, E - k): each token's unchosen experts, best selection score first.

    Sorted by score, then (stably) by whether chosen, so no tie or -inf score can put a chosen expert here.
    """
    n_experts, top_k = selection.shape[-1], choice.shape[-1]
    order = selection.argsort(dim=-1, descending=True, stable=True)
    chosen = torch.zeros_like(selection, dtype=torch.int32).scatter_(-1, choice, 1).gather(-1, order)
    return order.gather(-1, chosen.argsort(dim=-1, stable=True))[:, : n_experts - top_k]


def apply_capacity(
    choice: Tensor, selection: Tensor, capacity: int, n_experts: int, valid: Tensor | None, policy: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """The experts that take each of the (T, k) chosen assignments, n_experts where dropped, and the
    shares `dropped_share`, `rerouted_share` of valid assignments (scalars, for the training log)."""
    n_tokens, top_k = choice.shape
    live = torch.ones_like(choice, dtype=torch.bool) if valid is None else valid.unsqueeze(-1).expand_as(choice)

    # Round 0: every assignment's position in its expert's queue, in token-major order; padding joins none.
    flat = choice.reshape(-1)
    one_hot = F.one_hot(flat, n_experts) * live.reshape(-1, 1)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # 1-based; 0 for padding
    kept = (position >= 1) & (position <= capacity)
    routed = torch.where(kept, flat, n_experts).view(n_tokens, top_k)

    if policy == "reroute" and n_experts > top_k:
        used = expert_counts(routed.reshape(-1), n_experts)
        pending = live & (routed == n_experts)
        slot_ids = torch.arange(top_k, device=choice.device)
        for offered in alternatives(selection.detach(), choice).unbind(dim=-1):  # at most E - k rounds
            asking = pending.any(dim=-1)
            offers = F.one_hot(offered, n_experts) * asking.unsqueeze(-1)
            rank = (offers.cumsum(dim=0) * offers).sum(dim=-1)  # 1-based among this round's offers to that expert
            accepted = asking & (rank <= (capacity - used).gather(0, offered))
            slot = pending.int().argmax(dim=-1)  # the token's first unplaced slot (argmax: first maximum)
            take = (slot_ids == slot.unsqueeze(-1)) & accepted.unsqueeze(-1)
            routed = torch.where(take, offered.unsqueeze(-1), routed)
            pending = pending & ~take
            used = used + expert_counts(torch.where(accepted, offered, n_experts), n_experts)

    n_valid = live.sum().clamp_min(1).float()
    dropped = live & (routed == n_experts)
    rerouted = live & (routed != n_experts) & (routed != choice)
    metrics = {"dropped_share": dropped.sum() / n_valid, "rerouted_share": rerouted.sum() / n_valid}
    return routed, metrics
