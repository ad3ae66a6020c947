"""Devices and precision: which device a setting names, and the autocast a step runs under."""

from __future__ import annotations

import contextlib
import resource

import torch

from gtmoe.checks import ConfigError


def resolve_device(name: str, setting: str = "config key 'train.device'") -> torch.device:
    """The torch device for "auto" / "cpu" / "cuda"; `setting` names where `name` came from, for the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{setting} = 'cuda': no CUDA device is available here; use 'auto' (CUDA when available, else CPU) or 'cpu'"
        )
    return torch.device(name)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bitwise-reproducible resume)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
