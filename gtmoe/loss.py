"""The LM head and its cross-entropy as one op.

`F.cross_entropy(hidden @ weight.T, targets)` writes the (N, V) logits, a new
(N, V) log-softmax, and in backward a zero-filled (N, V) one-hot and a new
(N, V) log-softmax gradient: four passes over, and four allocations of, the
largest tensor of a small model. At the default study's size they cost as much
as the LM head's matmuls. The gradient with respect to the logits is known in
the forward pass (softmax - onehot), so the fp32 training op computes it there,
in the logits' own buffer, and keeps only it; backward is two matmuls, with the
upstream per-token gradient scaling the (N, d) operands, never the (N, V) one.
Evaluation takes the log-softmax in place too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gtmoe.contract import IGNORE_INDEX  # noqa: E402  (the shards write it)


def _log_softmax_loss_(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Turn fp32 logits (N, V) into their log-softmax in place; returns the per-token loss (0 where the
    target is IGNORE_INDEX), the targets with ignored ones replaced by 0 (N, 1), and the valid mask."""
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
    torch.log_softmax(logits, dim=-1, out=logits)
    loss = logits.gather(1, safe_targets).squeeze(1).neg_().masked_fill_(~valid, 0.0)
    return loss, safe_targets, valid


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token loss of fp32 hidden (N, d) and weight (V, d); keeps softmax - onehot for backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        grad_logits = hidden @ weight.t()
        loss, safe_targets, valid = _log_softmax_loss_(grad_logits, targets)
        grad_logits.exp_().scatter_add_(1, safe_targets, grad_logits.new_full((1, 1), -1.0).expand_as(safe_targets))
        ctx.save_for_backward(hidden, weight, grad_logits, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, Tensor, None]:
        hidden, weight, grad_logits, valid = ctx.saved_tensors
        scale = (grad_loss * valid).unsqueeze(1)  # positions without a target get no gradient
        grad_hidden = (grad_logits @ weight).mul_(scale)
        grad_weight = grad_logits.t() @ (hidden * scale)
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy (N,) of the logits hidden @ weight.T (hidden (N, d), weight (V, d)) against
    targets (N,); 0 where a target is IGNORE_INDEX.

    fp32 training takes the fused op above, autocast training (bf16 on a GPU) F.cross_entropy on its
    logits, and evaluation (no gradients) the log-softmax in place: the same numbers as F.cross_entropy.
    """
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _log_softmax_loss_(F.linear(hidden, weight).float(), targets)[0]
    if hidden.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
