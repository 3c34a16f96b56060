"""Which device, and which autocast dtype on it.

bf16 autocast runs the matrix products in bfloat16 while weights, optimizer state and the
loss stay float32; it pays only where the hardware has fast bf16 (GPUs, CPUs with
AVX-512 BF16 or AMX). Elsewhere bf16 is emulated and slower than fp32.

>>> autocast_dtype("fp32", torch.device("cpu")) is None
True
>>> autocast_dtype("bf16", torch.device("cpu"))
torch.bfloat16
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..errors import ConfigError


def pick_device(name: str) -> torch.device:
    """'auto' (cuda if present, else cpu) or a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: scratchlm trains on cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but MPS is not available")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX-512 BF16 or AMX): there bf16
    matmuls run several times faster than fp32. Elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this precision setting on this device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on ``device``; a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


__all__ = ["pick_device", "cpu_has_fast_bf16", "autocast_dtype", "autocast"]
