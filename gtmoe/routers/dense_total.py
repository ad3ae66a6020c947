"""The dense baseline matched on total parameters: one SwiGLU FFN of hidden size (E + n_shared) * d_expert.

As wide as all of an MoE layer's experts together (its E routed experts and n_shared shared ones, each of
hidden d_expert), so the model has the MoE model's total parameters but runs all of them for every token:
the reference for "what the MoE's parameters could do densely", where `dense` (active parameters) is the
reference at equal compute. The MoE's gate (d * E parameters) has no counterpart here: noise beside the
experts' 3 d (E + n_shared) d_expert.
"""

from __future__ import annotations

from gtmoe.routers.dense import DenseFFNBlock
from gtmoe.routers.registry import register


@register("dense_total")
class DenseTotalFFNBlock(DenseFFNBlock):
    """Registry entry, not a router: the block's feed-forward module, the MoE layer's total size."""

    label = "dense (total params)"
    balance_knob = None

    @classmethod
    def hidden_size(cls, model_cfg) -> int:
        """The FFN's hidden size: all of one MoE layer's experts, routed and shared."""
        return (model_cfg.n_experts + model_cfg.n_shared_experts) * model_cfg.d_expert
