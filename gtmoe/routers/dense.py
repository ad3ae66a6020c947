"""The dense baseline: one SwiGLU FFN of hidden size k * d_expert (the active size of a top-k MoE)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gtmoe.ffn import SwiGLU
from gtmoe.routers.registry import register


@dataclass
class DenseOptions:
    """The dense FFN has no routing options."""

    def validate(self, prefix: str = "router") -> None:
        return None

    def validate_for_model(self, model_cfg, prefix: str = "router") -> None:
        return None

    def at_horizon(self, max_steps: int) -> dict:
        return {}


@register("dense")
class DenseFFNBlock:
    """Registry entry, not a router: builds the block's plain feed-forward module."""

    Config = DenseOptions
    # How the analysis names it (see Router): no selection terms, no state, not routed.
    label = "dense"
    balance_knob = None
    term_labels: dict[str, str] = {}
    state_labels: dict[str, str] = {}
    balanced_by_construction = False

    @classmethod
    def build_ffn(cls, options: DenseOptions, model_cfg) -> nn.Module:
        return SwiGLU(model_cfg.d_model, model_cfg.top_k * model_cfg.d_expert)
