"""The dense feed-forward block: a SwiGLU FFN (the dense baseline, and the non-MoE blocks of an MoE model)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """`valid` is accepted for the FFN interface the MoE layer shares, and unused: no routing here."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
