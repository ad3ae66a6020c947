"""Feed-forward blocks: the SwiGLU FFN, grouped SwiGLU experts and the MoE layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gtmoe.routers.base import Router, Routing, expert_counts


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _has_grouped_mm() -> bool:
    return hasattr(F, "grouped_mm")


def grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows x[offsets[e-1]:offsets[e]] times weight[e], for every expert e; offsets[-1] must be len(x).

    torch's grouped GEMM where it exists (one kernel, offsets stay on the
    device, so no host sync); otherwise a loop over the experts' contiguous
    slices, which reads the offsets on the host.
    """
    if _has_grouped_mm() and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return F.grouped_mm(x, weight.to(x.dtype), offs=offsets.to(torch.int32))
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ weight[i].to(x.dtype) for i, (s, e) in enumerate(zip(starts, ends))])


class GroupedSwiGLU(nn.Module):
    """E SwiGLU experts stored as stacked weights, applied to expert-sorted tokens."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_hidden, d_model))
        for weight in (self.w1, self.w3, self.w2):
            nn.init.normal_(weight, std=0.02)

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            x = x.to(torch.get_autocast_dtype("cuda"))  # grouped GEMM runs in the autocast dtype (bf16)
        hidden = F.silu(grouped_matmul(x, self.w1, offsets)) * grouped_matmul(x, self.w3, offsets)
        return grouped_matmul(hidden, self.w2, offsets)


class MoELayer(nn.Module):
    """y = sum over the token's assignments of weight * expert(x).

    Assignments are sorted by expert so each expert runs on one contiguous
    slice. Dropped assignments (expert == E) ride in the last group with weight
    0: every row then belongs to a group (a grouped GEMM leaves rows outside
    all groups uninitialised, gradients included) and contributes exactly 0.
    """

    def __init__(self, router: Router, d_model: int, d_expert: int, n_experts: int):
        super().__init__()
        self.router = router
        self.experts = GroupedSwiGLU(n_experts, d_model, d_expert)
        self.n_experts = n_experts
        self.last_routing: Routing | None = None  # read by the model (losses) and the evaluator (loads)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.router(flat)
        self.last_routing = routing

        order = torch.argsort(routing.expert, stable=True)
        expert, token = routing.expert[order], routing.token[order]
        kept = expert < self.n_experts
        offsets = expert_counts(expert, self.n_experts).cumsum(0)
        offsets[-1] = expert.numel()  # dropped rows join the last group (weight 0)

        out = self.experts(flat[token], offsets)
        if getattr(self.router, "wants_expert_output_norm", False):
            self.router.observe_expert_output_norm(expert, out.detach().float().norm(dim=-1))
        # where(), not a multiplication by 0: a parked row must not turn the sum into NaN.
        weighted = torch.where(kept.unsqueeze(-1), out.to(flat.dtype) * routing.weight[order].unsqueeze(-1), 0)
        combined = torch.zeros_like(flat).index_add_(0, token, weighted)
        return combined.view(shape)
