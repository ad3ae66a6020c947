"""Auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3's bias).

The gate scores are s = G(g), G = softmax (default) or sigmoid. A per-expert bias b is added to s for
the top-k selection only; the chosen experts are weighted by s itself, without b. After each optimizer
step (Algorithm 1) b_i += u * sign(mean_j c_j - c_i), where c are the step's assignment counts.

Weights: Wang et al.'s Eq. (3) gates an expert by g_{i,t} = s_{i,t} when s_{i,t} + b_i is among the
top K, with no renormalisation over the selected experts (their gate G is a sigmoid in the main
experiments, a softmax in Appendix C). For a softmax gate DeepSeek-V3's inference code
(deepseek-ai/DeepSeek-V3 inference/model.py, `Gate.forward`) and torchtitan (`TokenChoiceTopKRouter`,
route_norm off by default) weight by s_i as it is too; the renormalised sigmoid form (DeepSeek-V3
§2.1.2, Eq. 13; Megatron-Core's sigmoid score function) is `sigmoid_topk`.

`bias_on: logits` keeps this project's earlier form, so runs made with it can be reproduced: b added to
the logits g, weights = softmax of g over the selected (as `topk`), u scaled to the run length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import softmax
from gtmoe.routers.registry import register
from gtmoe.routers.topk import TopKOptions, TopKRouter

SCORE_FUNCTIONS = ("softmax", "sigmoid")
BIAS_TARGETS = ("scores", "logits")
# Wang et al.'s u, in score units (their Figure 4 compares 1e-4, 1e-3 and 1e-2: 1e-3 balances best at the
# best perplexity); also torchtitan's load_balance_coeff default and DeepSeek-V3's bias update speed
# for most of its training.
PAPER_BIAS_UPDATE_RATE = 1e-3
# Logits the bias could travel over the run, for the logits form when neither u nor bias_travel is given.
DEFAULT_BIAS_TRAVEL = 10.0


@dataclass
class BiasBalanceOptions(TopKOptions):
    """Options of a router balanced by the loss-free bias. Subclasses say which `score_function` the gate
    scores use and what the bias is added to (`bias_on`), as fields or fixed properties."""

    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # u, in the units of what the bias is added to. Unset: the paper's 1e-3 on gate scores. Scores lie in
    # [0, 1] (a softmax's mean is 1/E) and near-tied experts differ by a fraction of that, so a step of
    # 1e-3 crosses a typical gap within tens to a few hundred steps, also in short runs: no scaling to the
    # run length is needed (unlike for logits, whose gaps are of order 1; see `bias_travel`).
    bias_update_rate: float | None = None

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        if self.bias_update_rate is not None:
            # 0 is the ablation: the bias never moves, leaving top-k routing with no balancing at all.
            check(
                math.isfinite(self.bias_update_rate) and self.bias_update_rate >= 0,
                f"{prefix}.bias_update_rate",
                self.bias_update_rate,
                "must be >= 0 (or unset: the paper's 1e-3 for a bias on the scores)",
            )

    def default_bias_update_rate(self, max_steps: int | None) -> float | None:
        """u when `bias_update_rate` is unset (None where it needs the run length and none is given)."""
        return PAPER_BIAS_UPDATE_RATE

    def at_horizon(self, max_steps: int) -> dict:
        if self.bias_update_rate is not None:
            return {}
        return {"bias_update_rate": self.default_bias_update_rate(max_steps)}


@dataclass
class LossFreeOptions(BiasBalanceOptions):
    score_function: str = "softmax"  # G: softmax | sigmoid
    bias_on: str = "scores"  # scores: the paper's form; logits: this project's earlier form (reproduces old runs)
    # Logits form only: unset u is bias_travel / max_steps, the distance the bias could travel over the
    # run (default 10: crosses a typical logit gap of about 1 in a tenth of training). A fixed u = 1e-3
    # on logits could move the bias only 0.15 logits in a 150-step run: too little to counter the gate.
    bias_travel: float | None = None

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(
            self.score_function in SCORE_FUNCTIONS,
            f"{prefix}.score_function",
            self.score_function,
            f"must be one of {', '.join(SCORE_FUNCTIONS)}",
        )
        check(
            self.bias_on in BIAS_TARGETS, f"{prefix}.bias_on", self.bias_on, f"must be one of {', '.join(BIAS_TARGETS)}"
        )
        check(
            self.bias_on == "scores" or self.score_function == "softmax",
            f"{prefix}.score_function",
            self.score_function,
            "must be softmax with bias_on: logits (the earlier form weights by a softmax over the chosen logits); "
            "use bias_on: scores for a sigmoid gate",
        )
        if self.bias_travel is not None:
            check(
                self.bias_on == "logits",
                f"{prefix}.bias_travel",
                self.bias_travel,
                "applies only with bias_on: logits (logits travelled over the run); a bias on the scores "
                f"moves by a fixed bias_update_rate, by default the paper's {PAPER_BIAS_UPDATE_RATE}: add "
                "bias_on: logits for the earlier form, or drop bias_travel",
            )
            check(
                math.isfinite(self.bias_travel) and self.bias_travel > 0,
                f"{prefix}.bias_travel",
                self.bias_travel,
                "must be > 0",
            )

    def default_bias_update_rate(self, max_steps: int | None) -> float | None:
        if self.bias_on == "scores":
            return PAPER_BIAS_UPDATE_RATE
        travel = DEFAULT_BIAS_TRAVEL if self.bias_travel is None else self.bias_travel
        return None if max_steps is None else travel / max_steps


@register("lossfree")
class LossFreeRouter(TopKRouter):
    Config = LossFreeOptions
    label = "loss-free"
    balance_knob = "bias_update_rate"
    option_terms = {"bias_update_rate": "bias", "bias_travel": "bias"}
    term_labels = {"bias": "loss-free bias b"}
    state_names = ("bias",)
    state_labels = {"bias": "loss-free bias b"}

    def __init__(self, options: BiasBalanceOptions, d_model: int, n_experts: int, top_k: int):
        rate = options.bias_update_rate
        if rate is None:
            rate = options.default_bias_update_rate(None)
        if rate is None:
            raise ValueError(
                f"{self.name}: bias_update_rate is unset; resolve it for the run's length with "
                "options.at_horizon(max_steps) (RunConfig.at_horizon does) or give it explicitly"
            )
        super().__init__(options, d_model, n_experts, top_k)
        self.bias_update_rate = rate
        self.score_function = options.score_function
        self.bias_on_scores = options.bias_on == "scores"
        self.register_buffer("bias", torch.zeros(n_experts))

    def selection_terms(self) -> dict[str, Tensor]:
        return {"bias": self.bias}

    def scores(self, logits: Tensor) -> Tensor:
        """s = G(g), what the bias is added to; the logits themselves in the logits form."""
        if not self.bias_on_scores:
            return logits
        return softmax(logits) if self.score_function == "softmax" else torch.sigmoid(logits)

    def combine_weights(self, logits: Tensor, choice: Tensor) -> Tensor:
        """The chosen experts' gate scores s_i as they are (Wang et al. Eq. 3); the logits form keeps topk's."""
        if not self.bias_on_scores:
            return super().combine_weights(logits, choice)
        if self.score_function == "softmax":
            return softmax(logits).gather(-1, choice)
        return torch.sigmoid(logits.gather(-1, choice))

    def routing_losses(
        self, logits: Tensor, scores: Tensor, choice: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        probs = scores if self.bias_on_scores and self.score_function == "softmax" else None  # softmax(g) already
        return self.aux_losses(logits, probs, choice)

    @torch.no_grad()
    def update_state(self) -> None:
        counts = self.step_counts
        self.bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
        super().update_state()

    def state_for_log(self) -> dict[str, Tensor]:
        return {"bias": self.bias}
