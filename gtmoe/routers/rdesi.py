"""RD-ESI: Reputation-Driven Expert Selection with Incentives (SPEC §3).

    score_i(x) = g_i(x) + beta * R_i - gamma * Lhat_i + bonus_i
    select S(x) = top-k of score(x); weights = softmax of g over S(x)

R (reputation) answers moral hazard: an EMA of how well the expert's tokens
did; Lhat (load) internalises congestion; bonus is a UCB term that makes a
starved expert worth trying again. The balance loss on g stays on as the
"meta-incentive" that teaches the gate itself to balance. State lives in
buffers (checkpointed, frozen in eval mode) and is updated, vectorised, once
per optimizer step.

The performance signal behind R (`performance`), per routed token, credited to the experts it went to:

- `batch_relative` (the default for now; `loss`, its former name, is accepted as an alias): the
  micro-batch's mean token loss minus the token's loss. High for experts that receive easy tokens: it
  credits the tokens as much as the experts.
- `target_relative`: the running mean loss of the token's *target* id (a per-target-token baseline, an
  EMA per vocabulary entry, `baseline_rate`) minus the token's loss: > 0 when the token did better than
  tokens predicting the same word usually do, which credits the expert rather than the word's difficulty.
  A target never seen in an earlier step falls back to the batch mean (so at the start it is
  `batch_relative`). The baseline is updated once per optimizer step, after the step's tokens were
  scored against the previous one (a token is never compared to itself), like the rest of the state.
- `activation_norm` (the original prototype's): the mean L2 norm of the expert's output.

Padding (targets IGNORE_INDEX) is credited to no expert and enters no baseline. Which signal the study
uses is decided from measured runs (docs/results.md); until then the default stays `batch_relative`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.registry import register
from gtmoe.routers.topk import TopKOptions, TopKRouter

PERFORMANCE_SIGNALS = ("batch_relative", "target_relative", "activation_norm")
# Former names of a signal: accepted and recorded under the current one, so a config written before
# the rename validates and both spellings are the same run (gtmoe.contract.weight_config).
PERFORMANCE_ALIASES = {"loss": "batch_relative"}


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
    performance: str = "batch_relative"  # one of PERFORMANCE_SIGNALS (module docstring); "loss" = batch_relative
    baseline_rate: float = 0.1  # target_relative: EMA rate of the per-target-token mean loss, per step it occurs

    def __post_init__(self) -> None:
        if isinstance(self.performance, str):
            self.performance = PERFORMANCE_ALIASES.get(self.performance, self.performance)

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
            f"must be one of {', '.join(PERFORMANCE_SIGNALS)} ('loss' is batch_relative)",
        )
        check(0 < self.baseline_rate <= 1, f"{prefix}.baseline_rate", self.baseline_rate, "must be in (0, 1]")


@register("rdesi")
class RDESIRouter(TopKRouter):
    Config = RDESIOptions
    label = "RD-ESI"
    balance_knob = "gamma"
    option_terms = {"beta": "reputation", "gamma": "load", "c": "bonus"}
    term_labels = {"reputation": "reputation β·R", "load": "load penalty γ·L̂", "bonus": "exploration bonus"}
    state_names = ("reputation", "load_hat", "bonus")
    state_labels = {"reputation": "reputation R", "load_hat": "load L̂ = L − 1", "bonus": "exploration bonus"}

    def __init__(self, options: RDESIOptions, d_model: int, n_experts: int, top_k: int, vocab_size: int | None = None):
        super().__init__(options, d_model, n_experts, top_k)
        self.register_buffer("reputation", torch.zeros(n_experts))  # R, kept centred
        self.register_buffer("load_ema", torch.ones(n_experts))  # L; Lhat = L - 1 is 0 at perfect balance
        self.register_buffer("usage", torch.zeros(n_experts))  # n_i: a balanced expert gains 1 per step
        self.register_buffer("steps", torch.zeros(()))  # N
        # Per-step performance accumulators (reset every step, so not checkpointed).
        self.register_buffer("perf_sum", torch.zeros(n_experts), persistent=False)
        self.register_buffer("perf_count", torch.zeros(n_experts), persistent=False)
        self.target_relative = options.performance == "target_relative"
        if self.target_relative:
            if vocab_size is None:
                raise ValueError("rdesi performance 'target_relative' needs the vocabulary size: build it with build()")
            # The per-target-token baseline (checkpointed: resuming continues it), and whether a target has one.
            # fp32 whatever the default dtype: a loss average kept in bf16 would lose the differences it measures.
            self.register_buffer("target_loss", torch.zeros(vocab_size, dtype=torch.float32))
            self.register_buffer("target_seen", torch.zeros(vocab_size, dtype=torch.bool))
            # This step's loss sum and token count per target, folded into the baseline by update_state.
            self.register_buffer("step_target_loss", torch.zeros(vocab_size, dtype=torch.float32), persistent=False)
            self.register_buffer("step_target_count", torch.zeros(vocab_size, dtype=torch.float32), persistent=False)
        self._pending: tuple[Tensor, Tensor] | None = None
        self.wants_expert_output_norm = options.performance == "activation_norm"

    @classmethod
    def build(cls, options: RDESIOptions, model_cfg) -> RDESIRouter:
        return cls(options, model_cfg.d_model, model_cfg.n_experts, model_cfg.top_k, vocab_size=model_cfg.vocab_size)

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

    def _accumulate_performance(self, expert: Tensor, perf: Tensor, weight: Tensor | None = None) -> None:
        """Add each assignment's performance (weighted: 0 for padding) to its expert's step sums.

        One slot past the last expert collects dropped assignments, so no boolean masking (a host sync).
        """
        weight = torch.ones_like(perf, dtype=torch.float32) if weight is None else weight.float()
        slots = torch.zeros(self.n_experts + 1, device=perf.device, dtype=torch.float32)
        sums = slots.scatter_add(0, expert, perf.float() * weight)
        counts = slots.scatter_add(0, expert, weight)
        self.perf_sum += sums[: self.n_experts]
        self.perf_count += counts[: self.n_experts]

    def _valid_weight(self, n_tokens: int) -> Tensor | None:
        """(T,) 1.0 for real tokens and 0.0 for padding; None where no targets of this group were observed."""
        valid = self.batch_valid(n_tokens)
        return None if valid is None else valid.float()

    @torch.no_grad()
    def observe_token_loss(self, token_loss: Tensor) -> None:
        if self.options.performance == "activation_norm" or self._pending is None:
            return
        token, expert = self._pending
        self._pending = None
        token_loss = token_loss.float()
        weight = self._valid_weight(token_loss.shape[0])
        if weight is None:  # a router used without the model's begin_batch: every token is real
            batch_mean = token_loss.mean()
        else:
            batch_mean = (token_loss * weight).sum() / weight.sum().clamp_min(1.0)
        baseline = self._target_baseline(token_loss, weight, batch_mean) if self.target_relative else batch_mean
        perf = baseline - token_loss  # > 0: the token did better than its baseline
        self._accumulate_performance(expert, perf[token], None if weight is None else weight[token])

    def _target_baseline(self, token_loss: Tensor, weight: Tensor | None, batch_mean: Tensor) -> Tensor:
        """(T,) each token's baseline: the running mean loss of its target, or the batch mean for a target
        never seen in an earlier step. Adds the tokens to this step's per-target sums (update_state's)."""
        if weight is None:
            raise RuntimeError(
                "rdesi performance 'target_relative' needs the targets of the routed tokens: the model passes "
                "them to begin_batch() before routing"
            )
        target = torch.where(weight > 0, self.batch_targets, 0)  # padding (IGNORE_INDEX) reads entry 0, weight 0
        baseline = torch.where(self.target_seen[target], self.target_loss[target], batch_mean)
        dtype = self.step_target_loss.dtype  # a module cast to another dtype casts these buffers too
        self.step_target_loss.scatter_add_(0, target, (token_loss * weight).to(dtype))
        self.step_target_count.scatter_add_(0, target, weight.to(dtype))
        return baseline

    @torch.no_grad()
    def observe_expert_output_norm(self, expert: Tensor, norm: Tensor, valid: Tensor | None = None) -> None:
        """The output L2 norm of each (expert-sorted) assignment; `valid` (same length): its token is real."""
        if self.training and self.options.performance == "activation_norm":
            self._pending = None
            self._accumulate_performance(expert, norm, valid)

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
        if self.target_relative:
            self._update_target_baseline()
        super().update_state()

    def _update_target_baseline(self) -> None:
        """Fold this step's mean loss per target into the baseline: an EMA where the target had one, its
        first value where not; targets absent this step keep theirs."""
        rate, count = self.options.baseline_rate, self.step_target_count
        present = count > 0
        step_mean = self.step_target_loss / count.clamp_min(1.0)
        updated = torch.where(self.target_seen, (1 - rate) * self.target_loss + rate * step_mean, step_mean)
        self.target_loss.copy_(torch.where(present, updated, self.target_loss))
        self.target_seen |= present

    @torch.no_grad()
    def reset_step_statistics(self) -> None:
        super().reset_step_statistics()
        self.perf_sum.zero_()
        self.perf_count.zero_()
        if self.target_relative:
            self.step_target_loss.zero_()
            self.step_target_count.zero_()
        self._pending = None

    def state_for_log(self) -> dict[str, Tensor]:
        return {"reputation": self.reputation, "load_hat": self.load_penalty(), "bonus": self.bonus()}
