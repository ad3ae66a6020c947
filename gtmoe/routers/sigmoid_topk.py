"""DeepSeek-V3 routing (DeepSeek-AI 2024, arXiv 2412.19437, §2.1.1-2.1.2): sigmoid affinities, the
loss-free bias, normalised gating weights, and an optional sequence-wise balance loss.

    s_{i,t} = sigmoid(g_{i,t})                          affinities (Eq. 15)
    chosen  = top-k of s_{i,t} + b_i                     the bias steers selection only (Eq. 16)
    w_{i,t} = weight_scale * s_{i,t} / sum_{j chosen} s_{j,t}   (Eq. 13; weight_scale: `route_scale`)
    b_i    += u * sign(mean_j c_j - c_i) after each optimizer step (u: "bias update speed" gamma)

Complementary sequence-wise balance loss (Eqs. 17-20), per sequence of T tokens, averaged over sequences:

    L_bal = alpha * sum_i f_i P_i,  f_i = E / (k T) * sum_t 1[s_{i,t} in TopK({s_{j,t}}_j, k)],
    P_i = (1/T) sum_t s'_{i,t},  s'_{i,t} = s_{i,t} / sum_j s_{j,t}

The TopK of Eq. 18 is over the affinities without the bias, as the paper writes it and as Megatron-Core
computes it (`compute_routing_scores_for_aux_loss`: top-k of the unbiased scores; sigmoid scores
normalised over all experts). Padding positions (valid False) count in neither f nor P nor T, and a
sequence of padding alone is left out of the mean.
Weights follow DeepSeek-V3's inference code (`Gate.forward`: original_scores.gather, divided by their
sum for sigmoid, times route_scale), which normalises for every k (for k = 1 the weight is weight_scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.lossfree import BiasBalanceOptions, LossFreeRouter
from gtmoe.routers.registry import register

# Keeps s / sum(s) finite where every chosen sigmoid underflows to 0 (torchtitan and Megatron add 1e-20 too).
_NORM_EPS = 1e-20


@dataclass
class SigmoidTopKOptions(BiasBalanceOptions):
    weight_scale: float = 1.0  # DeepSeek-V3's routed scaling factor (route_scale) on the normalised weights
    seq_aux_loss_coef: float = 0.0  # alpha of the sequence-wise balance loss; DeepSeek-V3 uses an extremely small one

    @property
    def score_function(self) -> str:
        return "sigmoid"

    @property
    def bias_on(self) -> str:
        return "scores"

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(
            math.isfinite(self.weight_scale) and self.weight_scale > 0,
            f"{prefix}.weight_scale",
            self.weight_scale,
            "must be > 0",
        )
        check(self.seq_aux_loss_coef >= 0, f"{prefix}.seq_aux_loss_coef", self.seq_aux_loss_coef, "must be >= 0")


def sequence_balance_loss(scores: Tensor, top_k: int, seq_len: int, valid: Tensor | None) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i (without alpha), averaged over sequences.

    `scores` (T, E) are the sigmoid affinities of T = n_sequences * seq_len tokens, row-major by sequence.
    """
    n_tokens, n_experts = scores.shape
    shape = (n_tokens // seq_len, seq_len, n_experts)
    top = scores.detach().topk(top_k, dim=-1).indices
    hits = torch.zeros_like(scores).scatter_(-1, top, 1.0).view(shape)
    normalised = (scores / scores.sum(dim=-1, keepdim=True).clamp_min(_NORM_EPS)).view(shape)
    weight = scores.new_ones(n_tokens) if valid is None else valid.to(scores.dtype)
    weight = weight.view(shape[0], seq_len, 1)
    tokens = weight.sum(dim=1)  # (sequences, 1): T of each sequence
    f = n_experts / top_k * (hits * weight).sum(dim=1) / tokens.clamp_min(1.0)
    p = (normalised * weight).sum(dim=1) / tokens.clamp_min(1.0)
    counted = (tokens.squeeze(-1) > 0).to(scores.dtype)  # a sequence of padding alone has no loss to average in
    return ((f * p).sum(dim=-1) * counted).sum() / counted.sum().clamp_min(1.0)


@register("sigmoid_topk")
class SigmoidTopKRouter(LossFreeRouter):
    Config = SigmoidTopKOptions
    label = "sigmoid top-k (DeepSeek-V3)"
    balance_knob = "bias_update_rate"
    option_terms = {"bias_update_rate": "bias"}

    def __init__(self, options: SigmoidTopKOptions, d_model: int, n_experts: int, top_k: int):
        super().__init__(options, d_model, n_experts, top_k)
        self.seq_len: int | None = None  # tokens per sequence of the micro-batch being routed

    def observe_batch(self, token_ids: Tensor, targets: Tensor | None) -> None:
        self.seq_len = token_ids.shape[-1]  # a static shape: no host read

    def combine_weights(self, logits: Tensor, choice: Tensor) -> Tensor:
        chosen = torch.sigmoid(logits.gather(-1, choice))
        return self.options.weight_scale * chosen / chosen.sum(dim=-1, keepdim=True).clamp_min(_NORM_EPS)

    def routing_losses(
        self, logits: Tensor, scores: Tensor, choice: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, terms = super().routing_losses(logits, scores, choice, valid)
        if self.training and self.options.seq_aux_loss_coef > 0:
            n_tokens = scores.shape[0]
            seq_len = n_tokens if self.seq_len is None else self.seq_len  # routed alone: one sequence
            if n_tokens % seq_len:
                raise ValueError(
                    f"{self.name}: {n_tokens} routed tokens are not whole sequences of {seq_len} "
                    "(observe_batch's token ids must be the batch being routed)"
                )
            terms["seq_aux_loss"] = sequence_balance_loss(scores, self.top_k, seq_len, valid)
            loss = loss + self.options.seq_aux_loss_coef * terms["seq_aux_loss"]
        return loss, terms
