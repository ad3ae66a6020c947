"""torch.compile of the model (the `train.compile` switch) for every router.

Two of the trainer's optimizer steps (gtmoe.step.train_step: forward,
backward, clipping, the AdamW update and the routers' update) must give eager
mode's losses, updated weights and router buffers. `aot_eager` traces exactly what inductor receives (one graph,
no breaks: no host reads, state kept in buffers) and must match bit for bit;
inductor adds code generation, so it matches within float tolerance. Inductor
compiles C++ kernels per router, minutes on a cold cache, hence `slow`.

One layer: every op of a layer and its router is in the graph once, and a graph break or a host read would show
there as it would in the next layer (layers share no state); a second layer adds tracing time and a third of the
C++ kernels (the first and last layers fuse differently with their neighbours).
"""

from __future__ import annotations

import copy

import pytest
import torch

from gtmoe import routers
from gtmoe.config import RouterConfig, TrainConfig
from gtmoe.model import MoETransformer
from gtmoe.step import build_optimizer, train_step

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model


def two_steps(model: MoETransformer, forward, batches: list[torch.Tensor]):
    """Two of the trainer's optimizer steps (gtmoe.step.train_step); the last micro-batch's outputs."""
    tcfg = TrainConfig(grad_accum=1, grad_clip=1.0)
    optimizer = build_optimizer(model, tcfg)
    outputs = []

    def recorded(x, y):
        outputs.append(forward(x, y))
        return outputs[-1]

    for idx in batches:
        train_step(model, recorded, optimizer, [(idx, idx)], tcfg, torch.device("cpu"))
    return outputs[-1]


def assert_compiled_matches_eager(name: str, backend: str, **tolerance) -> None:
    torch._dynamo.reset()  # every router compiles afresh, not from another test's cached graphs
    torch.manual_seed(0)
    eager = MoETransformer(tiny_model(n_layers=1), RouterConfig.from_mapping({"name": name}).for_horizon(100)).train()
    twin = copy.deepcopy(eager)
    batches = [torch.randint(0, TINY_VOCAB, (2, TINY_SEQ)) for _ in range(2)]

    # The same random stream for both (noisy top-k draws its gate noise in training).
    torch.manual_seed(1)
    expected = two_steps(eager, eager, batches)
    torch.manual_seed(1)
    got = two_steps(twin, torch.compile(twin, backend=backend, fullgraph=True), batches)

    for field in ("token_loss", "loss", "router_loss"):
        torch.testing.assert_close(
            getattr(got, field), getattr(expected, field), **tolerance, msg=lambda m, f=field: f"{f}: {m}"
        )
    for (param, a), b in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, **tolerance, msg=lambda m, p=param: f"{p} after the updates: {m}")
    for (buffer, a), b in zip(eager.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, a, **tolerance, msg=lambda m, b=buffer: f"{b}: {m}")


@pytest.mark.parametrize("name", routers.known())
def test_compiled_graph_is_whole_and_exact(name):
    assert_compiled_matches_eager(name, "aot_eager", rtol=0, atol=0)


# Inductor generates its own kernels: checked for one router of each kind of graph (token choice with a stateful
# score whose state updates in the step, as loss-free's bias does: RD-ESI's graph is top-k's with its terms and
# their buffers; token choice with a capacity cut; expert choice; one that draws random numbers); every router's
# graph is checked whole and exact above (aot_eager), at a fraction of the time.
INDUCTOR_ROUTERS = ["rdesi", "switch", "expert_choice", "noisy_topk"]


@pytest.mark.slow
@pytest.mark.parametrize("name", INDUCTOR_ROUTERS)
def test_inductor_matches_eager(name):
    import torch._inductor.config

    # AdamW divides by sqrt(v): where a gradient is near zero, inductor's float rounding (1e-7) moves the
    # update by a visible fraction of lr (3e-3), so the updated weights agree to about lr / 30. Random ops
    # as eager draws them (inductor would otherwise generate its own stream: noisy top-k's noise).
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_matches_eager(name, "inductor", rtol=1e-4, atol=1e-4)
