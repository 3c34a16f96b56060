"""Every random number generator a task may draw from, saved and restored as one state:
torch's CPU generator (and CUDA's), python's ``random`` and numpy's global generator.

>>> seed_everything(0)
>>> state = rng_state(torch.device("cpu"))
>>> a = (torch.rand(1).item(), random.random(), np.random.rand())
>>> set_rng_state(state, torch.device("cpu"))
>>> (torch.rand(1).item(), random.random(), np.random.rand()) == a
True
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CUDA too


def rng_state(device: torch.device) -> dict:
    """Every random number generator a task may draw from, as tensors and plain values
    (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


__all__ = ["seed_everything", "rng_state", "set_rng_state"]
