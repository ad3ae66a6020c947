"""The MoE layer: a router's assignments, grouped SwiGLU experts, the weighted combination."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from gtmoe.ffn import SwiGLU
from gtmoe.routers.base import Router, Routing, expert_counts


def _has_grouped_mm() -> bool:
    return hasattr(F, "grouped_mm")


@torch.library.custom_op("gtmoe::grouped_mm", mutates_args=())
def _grouped_mm_opaque(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """F.grouped_mm as an op that tracing treats as a black box with its own shape rule.

    torch's meta kernel for `_grouped_mm` copies the CUDA kernel's checks and
    rejects anything but bf16, although the CPU kernel computes fp32 too; so
    FakeTensorMode and torch.compile could not trace an fp32 CPU model through
    F.grouped_mm directly.
    """
    return F.grouped_mm(a, b, offs=offsets)


@_grouped_mm_opaque.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    if b.dim() == 3:  # (M, K) x (G, K, N) -> (M, N): each row times its group's matrix
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[1])  # (K, M) x (M, N) -> (G, K, N)


def _grouped_mm_setup_context(ctx, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # grouped GEMM wants 16-byte aligned strides; an expanded grad has stride 0
    grad_a = _grouped_mm_opaque(grad, b.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_opaque(a.t(), grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_opaque.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def grouped_matmul(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows x[offsets[e-1]:offsets[e]] times weight[e], for every expert e; offsets[-1] must be len(x).

    torch's grouped GEMM where it exists (one kernel, offsets stay on the
    device, so no host sync): F.grouped_mm itself for bf16 and for eager CPU
    fp32; the opaque op above where fp32 is traced (torch.compile, fake
    tensors), since aten's shape rule would reject it. Elsewhere (fp32 on CUDA,
    old torch) a loop over the experts' contiguous slices, which reads the
    offsets on the host.
    """
    weight, offsets = weight.to(x.dtype), offsets.to(torch.int32)
    if _has_grouped_mm() and x.dtype == torch.bfloat16:
        return F.grouped_mm(x, weight, offs=offsets)
    if _has_grouped_mm() and x.device.type == "cpu":
        if torch.compiler.is_compiling() or is_fake(x):
            return _grouped_mm_opaque(x, weight, offsets)
        # Eager: the aten op directly, without the custom op's Python dispatch (a tenth of its time here).
        return F.grouped_mm(x, weight, offs=offsets)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ weight[i] for i, (s, e) in enumerate(zip(starts, ends))])


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


class _GatherRows(torch.autograd.Function):
    """x.repeat_interleave(k, dim=0)[perm], for a permutation `perm` (with inverse `inverse`) of those rows.

    Plain indexing would scatter-add the gradient back (index_add_: several
    times slower than a gather on CPU, atomic and run-to-run non-deterministic
    on CUDA). As `perm` is a permutation, the gradient is a gather by its
    inverse, then a sum over each row's k copies.
    """

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, perm // k if k > 1 else perm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        if ctx.k > 1:
            grad = grad.view(-1, ctx.k, grad.shape[-1]).sum(dim=1)
        return grad, None, None, None


class MoELayer(nn.Module):
    """y = sum over the token's assignments of weight * expert(x), plus the shared experts' sum.

    Assignments are sorted by expert so each expert runs on one contiguous
    slice. Dropped assignments (expert == E) sort last and ride in the last
    group with weight 0: every row then belongs to a group (a grouped GEMM
    leaves rows outside all groups uninitialised, gradients included), so a
    parked row is computed from its token's own activations and contributes
    exactly 0 * finite = 0.

    Token-choice routings (k assignments per token, token-major) move rows by
    pure permutations, so neither direction needs a scatter-add; routings with
    a variable number of experts per token (expert choice) gather the tokens
    and scatter-add the outputs back.

    Shared experts (DeepSeekMoE, Dai et al. 2024, arXiv 2401.06066): `n_shared_experts` SwiGLU experts of
    hidden `d_expert` that every token passes through with weight 1, beside its routed ones:
    h = x + sum_shared FFN_s(x) + sum_routed g_i FFN_i(x). A sum of SwiGLUs that all see the same input is
    one SwiGLU whose hidden layer concatenates theirs (w1, w3 stacked by rows, w2 by columns), so they
    are one SwiGLU of hidden n_shared * d_expert: the same function with one matmul instead of n_shared
    (DeepSeek-V3's inference/model.py builds its shared experts the same way, MLP(dim, n_shared * inter)).
    """

    def __init__(self, router: Router, d_model: int, d_expert: int, n_experts: int, n_shared_experts: int = 0):
        super().__init__()
        self.router = router
        self.experts = GroupedSwiGLU(n_experts, d_model, d_expert)
        self.n_experts = n_experts
        self.n_shared_experts = n_shared_experts
        self.shared_experts = SwiGLU(d_model, n_shared_experts * d_expert) if n_shared_experts > 0 else None
        self.last_routing: Routing | None = None  # read by the model (losses) and the evaluator (loads)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """x (..., d_model); `valid` (x.shape[:-1]) marks real tokens, so padding never takes capacity."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.router(flat, None if valid is None else valid.reshape(-1))
        self.last_routing = routing

        order = torch.argsort(routing.expert, stable=True)
        expert = routing.expert[order]
        offsets = expert_counts(expert, self.n_experts).cumsum(0)
        offsets[-1] = expert.numel()  # dropped rows join the last group
        weight = torch.where(routing.expert < self.n_experts, routing.weight, 0).to(flat.dtype)

        flat_valid = None if valid is None else valid.reshape(-1)
        if routing.choice is not None:
            k = routing.choice.shape[1]
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            out = self.experts(_GatherRows.apply(flat, order, inverse, k), offsets)
            self._observe_output_norm(expert, out, flat_valid, lambda: order // k)
            out = _GatherRows.apply(out, inverse, order, 1).to(flat.dtype).view(-1, k, shape[-1])
            combined = (out * weight.view(-1, k, 1)).sum(dim=1)
        else:
            token = routing.token[order]
            out = self.experts(flat.index_select(0, token), offsets)
            self._observe_output_norm(expert, out, flat_valid, lambda: token)
            combined = torch.zeros_like(flat).index_add_(0, token, out.to(flat.dtype) * weight[order].unsqueeze(-1))
        if self.shared_experts is not None:
            combined = combined + self.shared_experts(flat).to(combined.dtype)
        return combined.view(shape)

    def _observe_output_norm(self, expert: Tensor, out: Tensor, valid: Tensor | None, row_token) -> None:
        """Hand a router that asks for them the expert-sorted rows' output norms, and whether each row's token
        is real (`row_token()`: the rows' tokens, computed only then)."""
        if getattr(self.router, "wants_expert_output_norm", False):
            row_valid = None if valid is None else valid[row_token()]
            self.router.observe_expert_output_norm(expert, out.detach().float().norm(dim=-1), row_valid)
