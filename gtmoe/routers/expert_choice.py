"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of the routing group.

C = ceil(capacity_factor * T * k / E), so on average a token gets k experts but any token may get 0..E.
Balanced by construction in training. Choosing over the group lets a token's routing depend on the
group's later tokens, its own sequence's included (the paper's "Limitations" section says so for
auto-regressive decoding), which a causal LM must not use at evaluation. So evaluation routes causally by
default (`eval_routing: causal`): training tracks, per expert, the score its top-C selection implied, the
C-th largest probability of the group, as a bias-corrected EMA over optimizer steps (rate
`threshold_ema_rate`, Adam's correction m_n / (1 - (1 - rate)^n)); at evaluation token t goes to expert e
iff probs[t, e] >= threshold[e], a test of that token alone. A token may then get 0..E experts (0: the
FFN adds nothing, the residual passes through) and the load is no longer balanced by construction: the
evaluation's load metrics measure it. `eval_routing: group` evaluates as the paper routes (top-C of the
group, not causal); evaluation also reports that perplexity beside the causal one (`evaluation_modes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import CapacityOptions, Router, Routing, softmax
from gtmoe.routers.registry import register

CAUSAL, GROUP = "causal", "group"  # evaluation routing: per-token thresholds, or top-C over the group


@dataclass
class ExpertChoiceOptions(CapacityOptions):
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    capacity_factor: float = 1.0
    eval_routing: str = CAUSAL  # "causal": per-token thresholds; "group": top-C of the group (non-causal)
    # Per optimizer step; 0.01 averages the thresholds of about the last 100 steps (the bias correction
    # makes the first steps' estimate their mean, not a pull towards 0).
    threshold_ema_rate: float = 0.01

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(
            self.eval_routing in (CAUSAL, GROUP),
            f"{prefix}.eval_routing",
            self.eval_routing,
            f"must be '{CAUSAL}' or '{GROUP}'",
        )
        check(
            0 < self.threshold_ema_rate <= 1,
            f"{prefix}.threshold_ema_rate",
            self.threshold_ema_rate,
            "must be in (0, 1]",
        )


@register("expert_choice")
class ExpertChoiceRouter(Router):
    Config = ExpertChoiceOptions
    label = "expert choice"
    balance_knob = "capacity_factor"  # balanced by construction: the capacity sets how many tokens each takes
    # In training every expert takes exactly its capacity C: load Gini 0 by construction. Causal evaluation
    # routes by thresholds, whose load the evaluation measures.
    balanced_by_construction = True
    state_names = ("threshold",)
    state_labels = {"threshold": "causal evaluation threshold (EMA of the top-C score)"}

    def __init__(self, options: ExpertChoiceOptions, d_model: int, n_experts: int, top_k: int):
        super().__init__(options, d_model, n_experts, top_k)
        # The evaluation routing in force; the evaluator switches it to report both (`evaluation_modes`).
        self.evaluation_mode = options.eval_routing
        # Saved in the checkpoint: the raw EMA and its number of updates (for the bias correction), and the
        # corrected threshold that causal evaluation applies (0 before any update: every token, every expert).
        # fp32 whatever the default dtype: a 1% EMA step is below bf16's resolution.
        self.register_buffer("threshold_ema", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("threshold", torch.zeros(n_experts, dtype=torch.float32))
        # The current optimizer step's C-th largest probabilities, summed over its micro-batches.
        self.register_buffer("step_threshold_sum", torch.zeros(n_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("step_groups", torch.zeros((), dtype=torch.float32), persistent=False)

    def capacity(self, n_tokens: int) -> int:
        return min(n_tokens, math.ceil(self.options.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def active_experts_per_token(self) -> float:
        return min(float(self.n_experts), self.options.capacity_factor * self.top_k)

    def evaluation_modes(self) -> dict[str, bool]:
        """Each evaluation routing this router offers -> whether it is causal (a token's routing uses only
        that token). The evaluator reports perplexity under `evaluation_mode` and under a non-causal mode."""
        return {CAUSAL: True, GROUP: False}

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Routing:
        logits = self.gate(x).float()
        probs = softmax(logits)  # (T, E)
        if not self.training and self.evaluation_mode == CAUSAL:
            return self._route_by_threshold(x, logits, probs, valid)
        capacity = self.capacity(x.shape[0])
        # Padding ranks below every real token (probabilities are >= 0), and is dropped if still chosen.
        priority = probs if valid is None else torch.where(valid.unsqueeze(-1), probs, -1.0)
        chosen, token = priority.topk(capacity, dim=0)  # (C, E): each expert's chosen tokens
        if self.training:
            # The score the selection implied: a token at or above it was taken. Clamped at 0 where padding
            # was chosen (every real token was, so 0 admits them all).
            self.step_threshold_sum += chosen[-1].detach().clamp_min(0)
            self.step_groups += 1
        weight = probs.gather(0, token).t().reshape(-1)
        expert = torch.arange(self.n_experts, device=x.device).repeat_interleave(capacity)
        token = token.t().reshape(-1)
        if valid is not None:
            expert = torch.where(valid[token], expert, self.n_experts)
        # Off by default: balanced by construction, but a z-loss can still be switched on. Rows are
        # assignments, so each one's token goes with it (the balance loss's padding and sequence scope).
        loss, metrics = self.aux_losses(logits, probs, expert.view(-1, 1), valid=valid, token=token)
        self.record(expert, token)
        return Routing(expert=expert, token=token, weight=weight.to(x.dtype), loss=loss, metrics=metrics)

    def _route_by_threshold(self, x: Tensor, logits: Tensor, probs: Tensor, valid: Tensor | None) -> Routing:
        """Causal evaluation: token t to expert e iff probs[t, e] >= threshold[e].

        Every (token, expert) pair is an assignment, token-major, those below the threshold (or padding)
        marked dropped: a fixed shape, so routing reads nothing on the host.
        """
        n_tokens = x.shape[0]
        selected = probs >= self.threshold
        if valid is not None:
            selected = selected & valid.unsqueeze(-1)
        experts = torch.arange(self.n_experts, device=x.device)
        expert = torch.where(selected, experts, self.n_experts).reshape(-1)
        token = torch.arange(n_tokens, device=x.device).repeat_interleave(self.n_experts)
        loss, metrics = self.aux_losses(logits, probs, expert.view(-1, 1))  # none at evaluation
        return Routing(expert=expert, token=token, weight=probs.reshape(-1).to(x.dtype), loss=loss, metrics=metrics)

    @torch.no_grad()
    def update_state(self) -> None:
        rate = self.options.threshold_ema_rate
        seen = self.step_groups > 0  # a step without training forwards leaves the estimate as it was
        observed = self.step_threshold_sum / self.step_groups.clamp_min(1)
        updated = (1 - rate) * self.threshold_ema + rate * observed
        self.threshold_ema.copy_(torch.where(seen, updated, self.threshold_ema))
        self.threshold_updates += seen.long()
        # Adam's bias correction: m_n / (1 - (1 - rate)^n) is a weighted mean of the n steps' thresholds.
        correction = (1 - (1 - rate) ** self.threshold_updates.double()).clamp_min(1e-30)
        self.threshold.copy_(torch.where(self.threshold_updates > 0, self.threshold_ema / correction, 0.0))
        super().update_state()

    @torch.no_grad()
    def reset_step_statistics(self) -> None:
        super().reset_step_statistics()
        self.step_threshold_sum.zero_()
        self.step_groups.zero_()

    def state_for_log(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}
