"""The dense baseline matched on active parameters: one SwiGLU FFN of hidden size (k + n_shared) * d_expert.

That is the FFN a token of a top-k MoE layer passes through: its k routed experts and the layer's
n_shared shared experts (model.n_shared_experts), each of hidden d_expert. The router's gate (d * E) is
left out: it is noise beside the FFN. `dense_total` (gtmoe.routers.dense_total) matches total parameters.
"""

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
    def hidden_size(cls, model_cfg) -> int:
        """The FFN's hidden size: the active FFN of one MoE layer's token."""
        return (model_cfg.top_k + model_cfg.n_shared_experts) * model_cfg.d_expert

    @classmethod
    def build_ffn(cls, options: DenseOptions, model_cfg) -> nn.Module:
        return SwiGLU(model_cfg.d_model, cls.hidden_size(model_cfg))
