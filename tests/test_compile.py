"""torch.compile of the model (the `train.compile` switch) for every router.

Two steps of forward, backward and router bookkeeping (as gtmoe/train.py,
without the optimizer) must give eager mode's logits, losses, gradients and
router buffers. `aot_eager` traces exactly what inductor receives (one graph,
no breaks: no host reads, state kept in buffers) and must match bit for bit;
inductor adds code generation, so it matches within float tolerance. Inductor
compiles C++ kernels per router, minutes on a cold cache, hence `slow`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gtmoe import routers
from gtmoe.config import RouterConfig, TrainConfig
from gtmoe.model import MoETransformer
from gtmoe.step import accumulate_gradients

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model


def two_steps(model: MoETransformer, forward, batches: list[torch.Tensor]):
    """Two steps of the trainer's micro-batch loop (gtmoe.step), each followed by the routers' update."""
    tcfg = TrainConfig(grad_accum=1, grad_clip=1.0)
    outputs = []

    def recorded(x, y):
        outputs.append(forward(x, y))
        return outputs[-1]

    for idx in batches:
        accumulate_gradients(model, recorded, [(idx, idx)], tcfg, torch.device("cpu"))
        model.update_router_states()
    return outputs[-1]


def assert_compiled_matches_eager(name: str, backend: str, **tolerance) -> None:
    torch._dynamo.reset()  # every router compiles afresh, not from another test's cached graphs
    torch.manual_seed(0)
    eager = MoETransformer(tiny_model(), RouterConfig.from_mapping({"name": name}).for_horizon(100)).train()
    twin = copy.deepcopy(eager)
    batches = [torch.randint(0, TINY_VOCAB, (2, TINY_SEQ)) for _ in range(2)]

    expected = two_steps(eager, eager, batches)
    got = two_steps(twin, torch.compile(twin, backend=backend, fullgraph=True), batches)

    for field in ("logits", "loss", "router_loss"):
        torch.testing.assert_close(
            getattr(got, field), getattr(expected, field), **tolerance, msg=lambda m, f=field: f"{f}: {m}"
        )
    for (param, a), b in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tolerance, msg=lambda m, p=param: f"grad of {p}: {m}")
    for (buffer, a), b in zip(eager.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, a, **tolerance, msg=lambda m, b=buffer: f"{b}: {m}")


@pytest.mark.parametrize("name", routers.known())
def test_compiled_graph_is_whole_and_exact(name):
    assert_compiled_matches_eager(name, "aot_eager", rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", routers.known())
def test_inductor_matches_eager(name):
    assert_compiled_matches_eager(name, "inductor", rtol=1e-4, atol=1e-5)
