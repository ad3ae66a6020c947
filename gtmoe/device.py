"""Devices and precision: which device a setting names, and the autocast a step runs under."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Fix glibc's mmap and trim thresholds (which also stops glibc adjusting them as the process runs).

    Returns whether the settings took (False off glibc).
    """
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))


def retain_freed_memory() -> bool:
    """Keep freed activation memory in the process instead of handing it back to the OS (glibc only).

    By default glibc serves blocks above its mmap threshold with fresh mmaps and returns the heap's free
    top beyond its trim threshold; a training or evaluation step that frees and re-allocates its
    activations then faults in every 4 KiB page again, in kernel time (the default study spent 12% of
    its user time in the kernel). Fixed thresholds keep the pages mapped: blocks up to 32 MiB come from
    the heap, and the heap is not trimmed below 1 GiB. Returns whether the settings took.
    """
    return set_malloc_thresholds(_MMAP_THRESHOLD_MAX, 2**30)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
