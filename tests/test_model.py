"""The model's own ops against independent computations: the fused LM-head loss, the rotary embedding,
the router softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gtmoe.loss import IGNORE_INDEX, linear_cross_entropy
from gtmoe.model import apply_rotary, rotary_table
from gtmoe.routers.base import softmax


def lm_inputs(dtype=torch.float32, n=70, d=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, d, generator=generator, dtype=dtype) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[::7] = IGNORE_INDEX  # padding positions
    upstream = torch.randn(n, generator=generator, dtype=dtype)  # any per-token weighting, not only the mean
    return hidden, weight, targets, upstream


def test_fused_training_loss_and_gradients_match_cross_entropy_in_float64():
    hidden, weight, targets, upstream = lm_inputs()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets)
    (loss * upstream).sum().backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    (expected * upstream.double()).sum().backward()

    assert loss.grad_fn is not None and "LinearCrossEntropy" in type(loss.grad_fn).__name__  # the fused op ran
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    assert (loss[targets == IGNORE_INDEX] == 0).all()


def test_tied_weight_gets_both_gradients():
    # The model's LM head is its embedding: the fused op's weight gradient adds to the lookup's.
    hidden, weight, targets, _ = lm_inputs()
    embedding = weight.clone().requires_grad_()
    ids = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=torch.Generator().manual_seed(1))
    linear_cross_entropy(hidden + embedding[ids], embedding, targets).sum().backward()
    reference = weight.clone().requires_grad_()
    x = hidden + reference[ids]
    F.cross_entropy(x @ reference.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum").backward()
    torch.testing.assert_close(embedding.grad, reference.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_gradients_the_loss_is_cross_entropy_exactly(dtype):
    hidden, weight, targets, _ = lm_inputs(dtype)
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets)
        expected = F.cross_entropy(
            F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
    assert torch.equal(got, expected)


def test_rotary_keeps_norms_and_depends_on_relative_position_only():
    head_dim, seq = 8, 12
    rotation = rotary_table(seq, head_dim)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, head_dim, generator=generator)

    def at(vector, position):  # a (1, S, 1, D) tensor holding `vector` at every position, rotated
        return apply_rotary(vector.expand(1, seq, 1, head_dim).contiguous(), rotation)[0, position, 0]

    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    torch.testing.assert_close(at(q, 5) @ at(k, 3), at(q, 9) @ at(k, 7))  # offset 2 both times
    torch.testing.assert_close(at(q, 0), q)  # position 0 turns nothing
    # Pair (0, 1) at position p turns by p radians (frequency base^0 = 1), as a 2-D rotation.
    angle = torch.tensor(3.0)
    turned = torch.stack([q[0] * angle.cos() - q[1] * angle.sin(), q[0] * angle.sin() + q[1] * angle.cos()])
    torch.testing.assert_close(at(q, 3)[:2], turned)


def test_router_softmax_is_the_row_softmax_with_its_gradient():
    logits = torch.randn(300, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(softmax(logits), F.softmax(logits, dim=-1))
    assert torch.autograd.gradcheck(softmax, (logits[:5].detach().requires_grad_(),))
