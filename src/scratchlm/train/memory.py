"""Will one training step fit in memory? A lower bound, checked before anything is allocated.

A typo such as ``--batch_size 1000000000`` (or ``--d_model 1000000``) would otherwise start
allocating, swap the machine to a halt or die at an arbitrary moment. The bound counts only
what training certainly holds at once, so a run it refuses could never have worked:

    weights, gradients, AdamW's two moments     4 copies x parameters x 4 bytes (fp32 master),
                                                parameters counted from the sizes (a lower bound)
    logits of one micro-batch                   B x T x vocab x 4 bytes (the loss is in fp32)
    the residual stream kept for backward       B x T x d_model x n_layers x 4 bytes

>>> from scratchlm.config import ModelConfig
>>> cfg = ModelConfig.preset("gpt-tiny")
>>> training_bytes(cfg, batch_size=2, tokens_per_row=128) < 50e6
True
>>> check_fits(cfg, 10**9, 128, "cpu", available=64e9)
Traceback (most recent call last):
...
scratchlm.errors.ConfigError: batch_size 1,000,000,000 x 128 tokens needs at least 328 TB for one training step (logits, activations, weights and optimizer state); 64 GB available: lower --batch_size (--grad_accum gives the same effective batch in less memory)
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import ConfigError


def parameter_count(config: ModelConfig) -> int:
    """A lower bound on the parameters of a Transformer of ``config``, from its sizes alone
    (building even a meta-device model of 10**9 layers would take hours): the embedding, and
    in each block at least the query and output projections (d x d each) and two MLP
    matrices (d x d_ff each), whatever the family, GQA or MoE."""
    d, ff = config.d_model, config.d_ff
    return config.vocab_size * d + config.n_layers * (2 * d * d + 2 * d * ff)


def training_bytes(config: ModelConfig, batch_size: int, tokens_per_row: int) -> int:
    """A lower bound on the memory of one training micro-batch (see the module docstring)."""
    rows = batch_size * tokens_per_row
    return 16 * parameter_count(config) + 4 * rows * (config.vocab_size + config.d_model * config.n_layers)


def available_bytes(device: str | torch.device) -> float | None:
    """Free memory of ``device`` (MemAvailable for the CPU); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.0f} {unit}"
    return f"{n / 1e3:,.0f} kB"


def check_fits(config: ModelConfig, batch_size: int, tokens_per_row: int, device: str | torch.device,
               available: float | None = None) -> None:
    """A ConfigError, before anything is allocated, when one step cannot fit in ``device``'s memory."""
    need = training_bytes(config, batch_size, tokens_per_row)
    available = available_bytes(device) if available is None else available
    if available is not None and need > available:
        raise ConfigError(f"batch_size {batch_size:,} x {tokens_per_row:,} tokens needs at least {_size(need)} "
                          f"for one training step (logits, activations, weights and optimizer state); "
                          f"{_size(available)} available: lower --batch_size (--grad_accum gives the same "
                          f"effective batch in less memory)")


__all__ = ["check_fits", "training_bytes", "parameter_count", "available_bytes"]
