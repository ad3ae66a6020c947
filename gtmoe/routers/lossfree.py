"""Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3).

Selection uses g + b, weights use g alone; after each optimizer step
b_i += u * sign(mean_j c_j - c_i), where c are the step's assignment counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.checks import check
from gtmoe.routers.base import RouterOptions
from gtmoe.routers.registry import register
from gtmoe.routers.topk import TopKRouter


@dataclass
class LossFreeOptions(RouterOptions):
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # u. Unset, it is scaled to the run: u = bias_travel / max_steps. A sign update moves
    # the bias by at most u per step, so a fixed u = 1e-3 (the paper's, over ~10^4 steps)
    # can move it only 0.15 logits in a 150-step run: too little to counter the gate.
    bias_update_rate: float | None = None
    # Logits the bias could travel over the whole run: 10 lets it cross a typical gate
    # logit gap (about 1) in a tenth of training, and oscillates by only u = 10 / max_steps.
    bias_travel: float = 10.0

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        if self.bias_update_rate is not None:
            # 0 is the ablation: the bias never moves, leaving top-k routing with no balancing at all.
            check(
                math.isfinite(self.bias_update_rate) and self.bias_update_rate >= 0,
                f"{prefix}.bias_update_rate",
                self.bias_update_rate,
                "must be >= 0 (or unset: bias_travel / train.max_steps)",
            )
        check(
            math.isfinite(self.bias_travel) and self.bias_travel > 0,
            f"{prefix}.bias_travel",
            self.bias_travel,
            "must be > 0",
        )

    def at_horizon(self, max_steps: int) -> dict:
        if self.bias_update_rate is not None:
            return {}
        return {"bias_update_rate": self.bias_travel / max_steps}


@register("lossfree")
class LossFreeRouter(TopKRouter):
    Config = LossFreeOptions
    label = "loss-free"
    balance_knob = "bias_update_rate"
    option_terms = {"bias_update_rate": "bias", "bias_travel": "bias"}
    term_labels = {"bias": "loss-free bias b"}
    state_names = ("bias",)
    state_labels = {"bias": "loss-free bias b"}

    def __init__(self, options: LossFreeOptions, d_model: int, n_experts: int, top_k: int):
        if options.bias_update_rate is None:
            raise ValueError(
                "lossfree: bias_update_rate is unset; resolve it for the run's length with "
                "options.at_horizon(max_steps) (RunConfig.at_horizon does) or give it explicitly"
            )
        super().__init__(options, d_model, n_experts, top_k)
        self.register_buffer("bias", torch.zeros(n_experts))

    def selection_terms(self) -> dict[str, Tensor]:
        return {"bias": self.bias}

    @torch.no_grad()
    def update_state(self) -> None:
        counts = self.step_counts
        self.bias += self.options.bias_update_rate * torch.sign(counts.mean() - counts)
        super().update_state()

    def state_for_log(self) -> dict[str, Tensor]:
        return {"bias": self.bias}
