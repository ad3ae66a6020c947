"""Where a step's time goes: its model FLOPs, the device's peaks, the share spent in matmul kernels
(torch.profiler), and the CUDA check that a step never waits for the host."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from gtmoe.model import MoETransformer

# Dense (not 2:4-sparse) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched as
# substrings of torch.cuda.get_device_name(); the first match wins, so specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM, reported as "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # also matches GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)

# Matmul kernels in torch.profiler's CPU trace (F.grouped_mm runs an aten::mm per expert on CPU).
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if device.type != "cuda":
        return None
    if override_tflops is not None:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


def flops_per_token(model: MoETransformer, seq_len: int) -> int:
    """Model FLOPs of a train step per token (PaLM appendix B): 6 per active weight, plus attention.

    Active weights count a token's routed experts only, and the tied embedding
    once (it is the LM head's matmul; the lookup is free). Attention scores and
    values add 12 * layers * d_model * seq_len (causal masking not discounted,
    the usual convention).
    """
    cfg = model.cfg
    return 6 * model.parameter_counts()[1] + 12 * cfg.n_layers * cfg.d_model * seq_len


def matmul_share(step: Callable[[], None], n_steps: int = 5) -> float:
    """Fraction of a CPU step's operator self time spent in matmul kernels, over `n_steps` profiled steps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            step()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    return sum(event.self_cpu_time_total for event in events if event.key in MATMUL_OPS) / total


def check_no_host_sync(steps: Mapping[str, Callable[[], None]], device: torch.device, n_steps: int = 3) -> None:
    """Run eager steps on a CUDA `device` with every host-device sync an error (the first step's optimizer
    state init included)."""
    for step in steps.values():
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(n_steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    print(f"sync-debug: {n_steps} train steps of each variant ran without a host-device sync")
