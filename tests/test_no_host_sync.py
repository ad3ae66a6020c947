"""Routing, dispatch, router state updates and the evaluation's per-batch statistics never read a tensor value on
the host.

On a GPU such a read (`.item()`, `.tolist()`, `bool(t)`, `nonzero`, a boolean
mask, `bincount` sizing its output) stalls the step until the device catches
up. Under FakeTensorMode tensors carry shapes but no data, so every such read
raises instead; that catches, on CPU, what `python -m gtmoe.bench --sync-debug`
catches on CUDA (bar syncs that only CUDA kernels make). The tests first show
the harness does fail on a host read, then run every router through it.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from gtmoe import moe, routers
from gtmoe.config import RouterConfig, TrainConfig
from gtmoe.model import MoETransformer
from gtmoe.step import build_optimizer, train_step

from conftest import TINY_SEQ, TINY_VOCAB, tiny_model
from helpers import default_dtype

HOST_READ = (DataDependentOutputException, DynamicOutputShapeException)
VARIANTS = [{"name": name} for name in routers.known()] + [
    {"name": "rdesi", "performance": p} for p in ("activation_norm", "target_relative")
]


def train_step_without_data(router: dict, dtype: torch.dtype = torch.float32) -> None:
    """Two of the trainer's optimizer steps (gtmoe.step.train_step: micro-batches, clipping, the fused
    AdamW update and the routers' update its post-hook runs), on fake tensors."""
    with FakeTensorMode():
        with default_dtype(dtype):
            model = MoETransformer(tiny_model(), RouterConfig.from_mapping(router).for_horizon(100)).train()
        tcfg = TrainConfig(grad_accum=1, grad_clip=1.0)
        optimizer = build_optimizer(model, tcfg)
        idx = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
        for _ in range(2):  # the first step also creates the optimizer state
            train_step(model, model, optimizer, [(idx, idx)], tcfg, idx.device)


def test_the_harness_catches_a_host_read():
    class ReadsOnHost(torch.nn.Module):
        def forward(self, x):
            return x * x.sum().item()

    with pytest.raises(HOST_READ), FakeTensorMode():
        ReadsOnHost()(torch.ones(3))


def test_the_harness_catches_the_expert_loop_fallback(monkeypatch):
    # Without grouped GEMM, grouped_matmul reads the expert offsets on the host by design.
    monkeypatch.setattr(moe, "_has_grouped_mm", lambda: False)
    with pytest.raises(HOST_READ):
        train_step_without_data({"name": "topk"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("router", VARIANTS, ids=lambda r: "-".join(map(str, r.values())))
def test_train_step_reads_nothing_on_the_host(router, dtype):
    # fp32 and bf16 take grouped_matmul's two grouped-GEMM branches (opaque op, F.grouped_mm).
    train_step_without_data(router, dtype)


def evaluation_statistics_without_data(router: dict) -> None:
    """The evaluation's forward and its per-layer statistics (gtmoe.evaluate.LayerStats.add: loads, joint counts,
    co-activation, per-group counts) for two routing groups, on fake tensors."""
    from gtmoe.evaluate import LayerStats

    with FakeTensorMode():
        model = MoETransformer(tiny_model(), RouterConfig.from_mapping(router).for_horizon(100)).eval()
        stats = [LayerStats(model.cfg.n_experts, TINY_VOCAB, torch.device("cpu")) for _ in model.moe_layers]
        for _ in range(2):
            idx = torch.randint(0, TINY_VOCAB, (2, TINY_SEQ))
            with torch.no_grad():
                model(idx, idx)
            valid = (idx != -100).reshape(-1)
            for layer_stats, layer in zip(stats, model.moe_layers):
                layer_stats.add(layer.last_routing, idx.reshape(-1), valid)


@pytest.mark.parametrize("router", VARIANTS, ids=lambda r: "-".join(map(str, r.values())))
def test_evaluation_statistics_read_nothing_on_the_host(router):
    evaluation_statistics_without_data(router)
