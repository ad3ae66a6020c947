"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", arXiv 2106.04426, §3).

A token goes to the experts a fixed map assigns to its token id: no learned gate, no auxiliary loss.
The paper's best map is the balanced assignment: "we build a lookup table before training the model
using the training data distribution by greedily assigning the most frequent tokens to the emptiest
buckets". `fit_to_token_counts` builds it from the train split's token counts; until then (and for
tokens the train split never shows) the map is the fixed hash id mod E, in the spirit of the paper's
random hash (the released code, ParlAI projects/params_vs_compute/hash_ladder, draws one at random with
a fixed seed; a modulus needs no generator and is reproducible anywhere).

Hash layers route each token to one expert. With model.top_k = k > 1 the map gives each token k distinct
experts, so a hash MoE runs the active expert compute of the top-k routers it is compared with: the
greedy assignment gives each token, most frequent first, the k least-loaded experts (ties to the lower
index), and the fallback gives experts (id + j) mod E, j < k. Each chosen expert's output is weighted 1/k
(k = 1: the expert's output itself, as in the paper).

The map is a persistent buffer (vocab_size, k), saved with the model: evaluation and resumed runs route
exactly as training did. The trainer fits it once, at the start of a fresh run (see
`TokenBlocks.routed_token_counts`); the routed token ids come from `observe_batch` (the B x S positions,
flattened row-major, are the routed tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import Router, RouterOptions, Routing
from gtmoe.routers.registry import register


@dataclass
class HashOptions(RouterOptions):
    aux_loss_coef: float = 0.0  # no gate: nothing a loss could train
    z_loss_coef: float = 0.0

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            check(value == 0, f"{prefix}.{name}", value, "must be 0: hash routing has no learned gate")


def fallback_map(vocab_size: int, n_experts: int, top_k: int, device=None) -> Tensor:
    """(vocab_size, k): token id v -> experts (v + j) mod E, j < k (distinct, as k <= E)."""
    if torch.empty(0, device=device).is_meta:  # a shape-only model (config.parameter_count): no values needed
        return torch.empty(vocab_size, top_k, dtype=torch.long, device=device)
    ids = torch.arange(vocab_size, device=device).unsqueeze(1)
    return (ids + torch.arange(top_k, device=device)) % n_experts


def balanced_map(token_counts: Tensor, n_experts: int, top_k: int) -> Tensor:
    """(V, k) greedy balanced assignment: tokens by decreasing count (ties: lower id first) each take the k
    experts with the least count so far (ties: lower index), which then carry its count. Tokens never
    counted keep the fallback map (they would all pile onto one expert otherwise, the loads being equal)."""
    counts = [int(c) for c in token_counts.tolist()]
    expert_map = fallback_map(len(counts), n_experts, top_k).tolist()
    load = [0] * n_experts
    for token in sorted(range(len(counts)), key=lambda t: (-counts[t], t)):
        if counts[token] == 0:
            break  # sorted: every remaining token is unseen
        chosen = sorted(range(n_experts), key=lambda e: (load[e], e))[:top_k]
        expert_map[token] = chosen
        for expert in chosen:
            load[expert] += counts[token]
    return torch.tensor(expert_map, dtype=torch.long)


@register("hash")
class HashRouter(Router):
    """Each token goes to the k experts its token id maps to, each weighted 1/k; no gate, no loss."""

    Config = HashOptions
    label = "hash (balanced)"
    balance_knob = None  # a fixed map: nothing sets how hard it balances
    wants_train_token_counts: ClassVar[bool] = True  # the trainer calls fit_to_token_counts once

    def __init__(self, options: HashOptions, d_model: int, n_experts: int, top_k: int, vocab_size: int):
        super().__init__(options, d_model, n_experts, top_k)
        del self.gate  # no learned routing: the map is the router
        self.register_buffer("expert_map", fallback_map(vocab_size, n_experts, top_k))
        self.token_ids: Tensor | None = None

    @classmethod
    def build(cls, options: HashOptions, model_cfg) -> HashRouter:
        return cls(options, model_cfg.d_model, model_cfg.n_experts, model_cfg.top_k, model_cfg.vocab_size)

    @torch.no_grad()
    def fit_to_token_counts(self, token_counts: Tensor) -> None:
        """Replace the map by the balanced assignment for these (vocab_size,) train-split token counts."""
        if token_counts.shape != (self.expert_map.shape[0],):
            raise ValueError(
                f"hash router: token_counts has shape {tuple(token_counts.shape)}, expected "
                f"({self.expert_map.shape[0]},) (one count per token id of the vocabulary)"
            )
        self.expert_map.copy_(balanced_map(token_counts.cpu(), self.n_experts, self.top_k))

    def observe_batch(self, token_ids: Tensor, targets: Tensor | None) -> None:
        self.token_ids = token_ids

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        n_tokens = x.shape[0]
        if self.token_ids is None or self.token_ids.numel() != n_tokens:
            raise RuntimeError(
                f"hash router: routing {n_tokens} tokens but observe_batch() gave "
                f"{'no token ids' if self.token_ids is None else f'{self.token_ids.numel()} token ids'}; "
                "the model must pass each micro-batch's token ids before routing it"
            )
        choice = self.expert_map.index_select(0, self.token_ids.reshape(-1))  # (T, k)
        weight = x.new_full((n_tokens * self.top_k,), 1.0 / self.top_k)
        token = torch.arange(n_tokens, device=x.device).repeat_interleave(self.top_k)
        expert = choice.reshape(-1)
        self.record(expert, token)
        loss = x.new_zeros((), dtype=torch.float32)  # no auxiliary loss, but every Routing carries one
        return Routing(expert=expert, token=token, weight=weight, loss=loss, choice=choice)
