"""Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3).

Selection uses g + b, weights use g alone; after each optimizer step
b_i += u * sign(mean_j c_j - c_i), where c are the step's assignment counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gtmoe.config import check
from gtmoe.routers import register
from gtmoe.routers.topk import TopKRouter
from gtmoe.routers.base import RouterOptions


@dataclass
class LossFreeOptions(RouterOptions):
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 1e-3  # u

    def validate(self, prefix: str = "router") -> None:
        super().validate(prefix)
        check(self.bias_update_rate > 0, f"{prefix}.bias_update_rate", self.bias_update_rate, "must be > 0")


@register("lossfree")
class LossFreeRouter(TopKRouter):
    Config = LossFreeOptions

    def __init__(self, options: LossFreeOptions, d_model: int, n_experts: int, top_k: int):
        super().__init__(options, d_model, n_experts, top_k)
        self.register_buffer("bias", torch.zeros(n_experts))

    def selection_bias(self) -> Tensor:
        return self.bias

    @torch.no_grad()
    def update_state(self) -> None:
        counts = self.step_counts
        self.bias += self.options.bias_update_rate * torch.sign(counts.mean() - counts)
        super().update_state()

    def state_for_log(self) -> dict[str, Tensor]:
        return {"bias": self.bias}
