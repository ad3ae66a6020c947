"""S-BASE: Sinkhorn-balanced assignment (Clark et al. 2022, "Unified Scaling Laws for Routed Language Models",
arXiv 2202.01169, §2 and Appendix A).

BASE layers (Lewis et al. 2021) route by solving a balanced linear assignment of tokens to experts;
S-BASE approximates that assignment with Sinkhorn iterations (Cuturi 2013) on the router logits. In
training, the T x E matrix exp(g) is scaled to a transport plan with uniform marginals (each real
token 1/T, each expert 1/E), and each token takes the top k experts of the plan; at evaluation, where
a causal model may not look at other tokens' choices, it takes the top k of its own logits. In the
log domain, with dual potentials u (tokens) and v (experts), v = 0 at the start:

    u_t = -log T - logsumexp_e(g_te + v_e)        (every real token carries mass 1/T)
    v_e = -log E - logsumexp_t(g_te + u_t)        (every expert receives mass 1/E)
    plan_te = exp(g_te + u_t + v_e);   choice(t) = top-k_e plan_te = top-k_e (g_te + v_e)

so v acts as a per-expert selection bias computed afresh for each routing group. The combine weights
come from the gate, not the plan: sigmoid(g) of the chosen expert for k = 1, the softmax of g over all
E at the chosen experts for k > 1, as in the reference implementation, Megatron-Core's "sinkhorn"
load balancing ("the balancing algorithm used in S-BASE": megatron/core/transformer/moe/router.py
`sinkhorn_load_balancing`, moe_utils.py `sinkhorn`). That code iterates until the mean change of the
expert scaling falls below 1e-4, a host-side loop test; here the number of iterations is fixed
(`sinkhorn_iters`), so routing never reads the device, and the loop is in log space, which cannot
overflow where exp(g) would. Padding carries no mass (it neither asks for nor takes any share of an
expert), and is routed like a real token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import Router, RouterOptions, Routing, softmax
from gtmoe.routers.registry import register

NO_MASS = -1e4  # log-mass of a padding row: exp underflows to exactly 0, yet the sums stay finite


@dataclass
class SBaseOptions(RouterOptions):
    aux_loss_coef: float = 0.0  # balanced by the Sinkhorn plan (Megatron-Core refuses an aux loss with it)
    z_loss_coef: float = 0.0
    # Sinkhorn iterations (token then expert scaling) per routing group in training; 0 is plain top-k of the
    # logits. One iteration already gives v_e = -log(E * mean_t softmax(g)_te); more bring the plan to the
    # balanced one. 16: for T = 1024, E = 8 and logits of std up to 4 (an expert favoured by up to 4 logits),
    # the choices equal those of the reference run to its tolerance (which took up to 18 iterations there).
    sinkhorn_iters: int = 16

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(self.sinkhorn_iters >= 0, f"{prefix}.sinkhorn_iters", self.sinkhorn_iters, "must be >= 0")


def sinkhorn_potentials(logits: Tensor, n_iters: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dual potentials (u (T,), v (E,)) of the Sinkhorn plan exp(logits + u + v) with uniform marginals.

    Rows of padding (`valid` False) carry no mass; the real rows share mass 1 equally.
    """
    n_tokens, n_experts = logits.shape
    u = logits.new_zeros(n_tokens)
    v = logits.new_zeros(n_experts)
    if valid is None:
        log_row_mass = logits.new_full((), -math.log(n_tokens))
    else:
        log_row_mass = -valid.sum().clamp_min(1).to(logits.dtype).log()
    for _ in range(n_iters):
        u = log_row_mass - torch.logsumexp(logits + v, dim=1)
        if valid is not None:
            u = torch.where(valid, u, NO_MASS)
        v = -math.log(n_experts) - torch.logsumexp(logits + u.unsqueeze(1), dim=0)
    return u, v


@register("sbase")
class SBaseRouter(Router):
    """Training: top-k of the Sinkhorn plan of the logits; evaluation: top-k of the logits."""

    Config = SBaseOptions
    label = "S-BASE (Sinkhorn)"
    # More iterations bring the plan closer to the balanced assignment; 0 is plain top-k of the logits.
    balance_knob = "sinkhorn_iters"

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        logits = self.gate(x).float()
        if self.training:
            with torch.no_grad():  # the plan only selects; gradients reach the gate through the weights
                _, v = sinkhorn_potentials(logits.detach(), self.options.sinkhorn_iters, valid)
            choice = (logits.detach() + v).topk(self.top_k, dim=-1).indices  # = top-k of the plan, row by row
        else:
            choice = logits.topk(self.top_k, dim=-1).indices
        if self.top_k == 1:
            weight = torch.sigmoid(logits.gather(-1, choice))
        else:
            weight = softmax(logits).gather(-1, choice)

        loss, metrics = self.aux_losses(logits, None, choice, valid)
        return self.token_choice_routing(choice, choice, weight, loss, metrics, x.dtype)
