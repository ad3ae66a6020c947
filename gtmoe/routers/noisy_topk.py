"""Noisy top-k gating with the importance and load losses (Shazeer et al. 2017, "Outrageously Large Neural
Networks: The Sparsely-Gated Mixture-of-Experts Layer", arXiv 1701.06538, §2.1, §4 and Appendix A).

    H(x)_i = (x W_g)_i + eps * softplus((x W_noise)_i),  eps ~ N(0, 1)   (training; evaluation: no noise)
    G(x)   = softmax(KeepTopK(H(x), k))                                  (-inf outside the top k)
    Importance(X)_i = sum_x G(x)_i,            L_importance = w_importance * CV(Importance(X))^2
    P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / softplus((x W_noise)_i))
    Load(X)_i = sum_x P(x, i),                 L_load = w_load * CV(Load(X))^2

kth_excluding(v, k, i) is the k-th greatest component of v leaving out component i: the (k+1)-th of
H(x) when i is in the top k, the k-th otherwise. P(x, i) is the probability, over a fresh draw of the
noise on component i alone, that i is in the top k: a smooth estimate of the load the gate can learn
from. Checked against the authors' code, tensor2tensor/utils/expert_utils.py (`NoisyTopKGating`,
`_ProbInTopK`, `CVSquared`): CV^2 is the population variance over the squared mean (+ 1e-10), and the
noise scale is softplus(.) + noise_epsilon (their `noise_epsilon` = 0.01), which keeps Phi's denominator
away from 0 where softplus underflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gtmoe.checks import check
from gtmoe.routers.base import Router, RouterOptions, Routing, softmax
from gtmoe.routers.registry import register

CV_EPSILON = 1e-10  # tensor2tensor's CVSquared epsilon


@dataclass
class NoisyTopKOptions(RouterOptions):
    aux_loss_coef: float = 0.0  # the paper balances with its own two losses, not the Switch loss
    z_loss_coef: float = 0.0
    # w_importance, w_load: 0.1 each, one of the paper's Appendix A (Table 6) settings; every setting with
    # either loss gave similar perplexity there and none was much worse (tensor2tensor's default is 0.01).
    importance_loss_coef: float = 0.1
    load_loss_coef: float = 0.1
    noise_epsilon: float = 0.01  # added to softplus(x W_noise), as the authors' code does; 0 = the formula alone

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        for name in ("importance_loss_coef", "load_loss_coef", "noise_epsilon"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{prefix}.{name}", value, "must be >= 0")


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation of (E,) values: population variance / (mean^2 + 1e-10)."""
    mean = values.mean()
    return (values - mean).square().mean() / (mean.square() + CV_EPSILON)


@register("noisy_topk")
class NoisyTopKRouter(Router):
    """Top-k of the noisy logits H; weights the softmax of H over the chosen; importance and load losses."""

    Config = NoisyTopKOptions
    label = "noisy top-k"
    # The load loss acts on what the study measures (how many tokens each expert gets); equal importance
    # (gate mass) can coexist with unequal loads, which is why the paper adds the load loss (§4).
    balance_knob = "load_loss_coef"

    def __init__(self, options: NoisyTopKOptions, d_model: int, n_experts: int, top_k: int):
        super().__init__(options, d_model, n_experts, top_k)
        self.noise = nn.Linear(d_model, n_experts, bias=False)  # W_noise

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        clean = self.gate(x).float()  # x W_g, routed in fp32 even under bf16 autocast
        if self.training:
            noise_std = F.softplus(self.noise(x).float()) + self.options.noise_epsilon
            noisy = clean + torch.randn_like(clean) * noise_std
        else:
            noisy = clean
        # The top k + 1 values: the (k+1)-th is the threshold of a component already in the top k.
        top = noisy.topk(min(self.top_k + 1, self.n_experts), dim=-1)
        choice = top.indices[:, : self.top_k]  # (T, k)
        weight = softmax(top.values[:, : self.top_k])

        loss, metrics = self.aux_losses(clean, None, choice, valid)
        if self.training:
            losses, terms = self.balance_losses(clean, noisy, noise_std, top.values, choice, weight, valid)
            loss, metrics = loss + losses, {**metrics, **terms}

        return self.token_choice_routing(choice, choice, weight, loss, metrics, x.dtype)

    def prob_in_top_k(self, clean: Tensor, noisy: Tensor, noise_std: Tensor, top_values: Tensor) -> Tensor:
        """P(x, i) (T, E): Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i)."""
        if self.top_k >= self.n_experts:  # every expert is always chosen
            return torch.ones_like(clean)
        threshold_if_in = top_values[:, self.top_k : self.top_k + 1]  # (k+1)-th of H: i's rivals without i
        threshold_if_out = top_values[:, self.top_k - 1 : self.top_k]  # k-th of H
        threshold = torch.where(noisy > threshold_if_in, threshold_if_in, threshold_if_out)
        return torch.special.ndtr((clean - threshold) / noise_std)

    def balance_losses(
        self,
        clean: Tensor,
        noisy: Tensor,
        noise_std: Tensor,
        top_values: Tensor,
        choice: Tensor,
        weight: Tensor,
        valid: Tensor | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """w_importance CV(Importance)^2 + w_load CV(Load)^2 over the real tokens (padding counts in neither)."""
        gates = torch.zeros_like(clean).scatter(-1, choice, weight)  # G(x), (T, E)
        prob = self.prob_in_top_k(clean, noisy, noise_std, top_values)
        if valid is not None:
            real = valid.unsqueeze(-1).to(clean.dtype)
            gates, prob = gates * real, prob * real
        terms = {"importance_loss": cv_squared(gates.sum(dim=0)), "load_loss": cv_squared(prob.sum(dim=0))}
        total = self.options.importance_loss_coef * terms["importance_loss"]
        total = total + self.options.load_loss_coef * terms["load_loss"]
        return total, terms
