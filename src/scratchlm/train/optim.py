"""AdamW with two parameter groups, and the learning-rate schedule (warmup + cosine).

>>> [round(lr_at(s, LoopConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)), 3) for s in (0, 9, 55, 100)]
[0.1, 1.0, 0.55, 0.1]
"""

from __future__ import annotations

import math

import torch

from .config import LoopConfig


def lr_at(step: int, cfg: LoopConfig, progress: float | None = None) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``.

    ``progress`` in [0, 1] is how far the decay is; by default the fraction of the steps
    after warmup that are done (of ``cfg.max_steps``). The loop passes its own: the larger
    of that and the fraction of the time budget spent, with max_steps from epochs.
    Warmup matters because Adam's second-moment estimates are poor in the first steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if progress is None:
        progress = decay_progress(step, cfg.warmup_steps, cfg.max_steps)
    progress = min(1.0, max(0.0, progress))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def decay_progress(step: int, warmup_steps: int, max_steps: int) -> float:
    """The fraction of the steps after warmup that are done."""
    return (step - warmup_steps) / max(1, max_steps - warmup_steps)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on the matrices of linear layers; none on biases,
    norm gains and embeddings (decaying them only pulls useful values towards 0).

    Frozen parameters (LoRA, a classifier's fixed backbone) are left out. A tied output
    head is the token embedding itself, so it sits in the no-decay group.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a shared (tied) tensor is listed once
        if not p.requires_grad:
            continue
        is_embedding = name.split(".")[-2] in ("tok_emb", "pos_emb") if "." in name else False
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig, device: torch.device,
                   sharded: bool = False) -> torch.optim.AdamW:
    """AdamW over ``param_groups``. fused: one kernel for all parameters (CPU and CUDA);
    not with the DTensors of a sharded (FSDP) model."""
    fused = device.type in ("cpu", "cuda") and not sharded
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, fused=fused)


__all__ = ["lr_at", "decay_progress", "param_groups", "make_optimizer"]
