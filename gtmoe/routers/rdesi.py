"""RD-ESI: Reputation-Driven Expert Selection with Incentives (SPEC §3).

    score_i(x) = g_i(x) + beta * R_i - gamma * Lhat_i + bonus_i
    select S(x) = top-k of score(x); weights = softmax of g over S(x)

R (reputation) answers moral hazard: an EMA of how well the expert's tokens
did; Lhat (load) internalises congestion; bonus is a UCB term that makes a
starved expert worth trying again. The balance loss on g stays on as the
"meta-incentive" that teaches the gate itself to balance. State lives in
buffers (checkpointed, frozen in eval mode) and is updated, vectorised, once
per optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import expert_counts
from gtmoe.routers.registry import register
from gtmoe.routers.topk import TopKOptions, TopKRouter

PERFORMANCE_SIGNALS = ("loss", "activation_norm")


@dataclass
class RDESIOptions(TopKOptions):
    # Weights chosen from the measured dose-response at the default study's size (docs/results.md, "Sensitivity
    # sweeps"): the lowest test Gini with perplexity no worse than topk's; each term then flips > 1% of
    # the tokens' top-k sets. SPEC's starting values (gamma 0.1, c 0.1) left the bonus flipping < 0.1%.
    beta: float = 0.1  # weight of reputation R
    gamma: float = 1.0  # weight of the load penalty Lhat
    c: float = 3.0  # scale of the exploration bonus
    alpha: float = 0.1  # reputation EMA rate for experts used this step
    rho: float = 0.99  # reputation decay for experts not used this step
    lam: float = 0.9  # load EMA decay (lambda)
    performance: str = "loss"  # "loss": batch-mean minus token loss; "activation_norm": mean expert output L2 norm

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        for name in ("beta", "gamma", "c"):
            check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), "must be >= 0")
        check(0 < self.alpha <= 1, f"{prefix}.alpha", self.alpha, "must be in (0, 1]")
        check(0 <= self.rho <= 1, f"{prefix}.rho", self.rho, "must be in [0, 1]")
        check(0 <= self.lam < 1, f"{prefix}.lam", self.lam, "must be in [0, 1)")
        check(
            self.performance in PERFORMANCE_SIGNALS,
            f"{prefix}.performance",
            self.performance,
            f"must be one of {', '.join(PERFORMANCE_SIGNALS)}",
        )


@register("rdesi")
class RDESIRouter(TopKRouter):
    Config = RDESIOptions
    label = "RD-ESI"
    balance_knob = "gamma"
    option_terms = {"beta": "reputation", "gamma": "load", "c": "bonus"}
    term_labels = {"reputation": "reputation β·R", "load": "load penalty γ·L̂", "bonus": "exploration bonus"}
    state_names = ("reputation", "load_hat", "bonus")
    state_labels = {"reputation": "reputation R", "load_hat": "load L̂ = L − 1", "bonus": "exploration bonus"}

    def __init__(self, options: RDESIOptions, d_model: int, n_experts: int, top_k: int):
        super().__init__(options, d_model, n_experts, top_k)
        self.register_buffer("reputation", torch.zeros(n_experts))  # R, kept centred
        self.register_buffer("load_ema", torch.ones(n_experts))  # L; Lhat = L - 1 is 0 at perfect balance
        self.register_buffer("usage", torch.zeros(n_experts))  # n_i: a balanced expert gains 1 per step
        self.register_buffer("steps", torch.zeros(()))  # N
        # Per-step performance accumulators (reset every step, so not checkpointed).
        self.register_buffer("perf_sum", torch.zeros(n_experts), persistent=False)
        self.register_buffer("perf_count", torch.zeros(n_experts), persistent=False)
        self._pending: tuple[Tensor, Tensor] | None = None
        self.wants_expert_output_norm = options.performance == "activation_norm"

    def load_penalty(self) -> Tensor:
        return self.load_ema - 1.0

    def bonus(self) -> Tensor:
        return self.options.c * torch.sqrt(torch.log(self.steps + 1.0) / (self.usage + 1.0))

    def selection_terms(self) -> dict[str, Tensor]:
        o = self.options
        return {"reputation": o.beta * self.reputation, "load": -o.gamma * self.load_penalty(), "bonus": self.bonus()}

    def record(self, expert: Tensor, token: Tensor) -> None:
        super().record(expert, token)
        if self.training:
            self._pending = (token, expert)

    def _accumulate_performance(self, expert: Tensor, perf: Tensor) -> None:
        # One slot past the last expert collects dropped assignments, so no boolean masking (a host sync).
        sums = torch.zeros(self.n_experts + 1, device=perf.device).scatter_add_(0, expert, perf.float())
        self.perf_sum += sums[: self.n_experts]
        self.perf_count += expert_counts(expert, self.n_experts).to(self.perf_count.dtype)

    @torch.no_grad()
    def observe_token_loss(self, token_loss: Tensor) -> None:
        if self.options.performance != "loss" or self._pending is None:
            return
        token, expert = self._pending
        self._pending = None
        perf = token_loss.mean() - token_loss  # > 0: the token did better than the batch average
        self._accumulate_performance(expert, perf[token])

    @torch.no_grad()
    def observe_expert_output_norm(self, expert: Tensor, norm: Tensor) -> None:
        if self.training and self.options.performance == "activation_norm":
            self._pending = None
            self._accumulate_performance(expert, norm)

    @torch.no_grad()
    def update_state(self) -> None:
        o, n_experts = self.options, self.n_experts
        counts = self.step_counts
        load_fraction = counts / counts.sum().clamp_min(1.0)
        used = counts > 0
        perf = self.perf_sum / self.perf_count.clamp_min(1.0)
        reputation = torch.where(used, (1 - o.alpha) * self.reputation + o.alpha * perf, o.rho * self.reputation)
        self.reputation.copy_(reputation - reputation.mean())
        self.load_ema.mul_(o.lam).add_((1 - o.lam) * n_experts * load_fraction)
        self.usage += n_experts * load_fraction
        self.steps += 1
        super().update_state()

    @torch.no_grad()
    def reset_step_statistics(self) -> None:
        super().reset_step_statistics()
        self.perf_sum.zero_()
        self.perf_count.zero_()
        self._pending = None

    def state_for_log(self) -> dict[str, Tensor]:
        return {"reputation": self.reputation, "load_hat": self.load_penalty(), "bonus": self.bonus()}
