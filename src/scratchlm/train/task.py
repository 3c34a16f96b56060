"""What a training task supplies to the core (core.py), and what it is given.

A task subclasses ``Task`` and fills in ``model``, ``micro_batch``, ``loss`` and ``save``
(plus, if it has them, ``evaluate``, ``sample``, ``batches_per_epoch`` and its own state);
core.py's docstring shows one end to end. ``Run`` is the run as the task sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .config import LoopConfig
from .distributed import Processes
from .precision import autocast


@dataclass
class Run:
    """The run as a task sees it (given to ``Task.setup`` before anything else)."""

    cfg: LoopConfig
    procs: Processes
    device: torch.device
    autocast_dtype: torch.dtype | None
    sharded: bool  # FSDP2: the model's weights are spread over the processes
    out_dir: Path

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)


class Task:
    """What a training task supplies; see the module docstring. Defaults: no epochs,
    no evaluation, no samples, no state of its own."""

    best_metric: str = "val_loss"
    best_mode: Literal["min", "max"] = "min"
    title: str = "training"  # of loss.png
    tokenizer: Any = None  # the model's tokenizer, when it has one: what an eval hook scores with

    def setup(self, run: Run) -> None:
        self.run = run

    def model(self, resume_from: Path | None) -> torch.nn.Module:
        raise NotImplementedError

    def batches_per_epoch(self) -> int | None:
        """Micro-batches (of one process) in one pass over the training set, if that means something."""
        return None

    def micro_batch(self, step: int, micro: int, rank: int, world: int, model: torch.nn.Module) -> Any:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {}

    def sample(self, model: torch.nn.Module) -> str | list[str] | None:
        return None

    def describe(self, step: int, metrics: dict, sample: str | list[str] | None) -> str:
        """What an evaluation prints."""
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        lines = [f"step {step}" + (f": {shown}" if shown else "")]
        lines += [f"  sample: {s}" for s in ([sample] if isinstance(sample, str) else sample or [])]
        return "\n".join(lines)

    def save(self, directory: Path, weights: dict | None, extra: Callable[[Path], None]) -> None:
        """Write a checkpoint directory atomically; call ``extra(tmp)`` inside it.
        ``weights``: the whole state dict gathered from a sharded model, else None (use the model's)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# An evaluation hook: (model, tokenizer, step, final) -> scores ({name: number}) that go into
# the eval row of metrics.jsonl. The trainer calls it at the end of training (final=True) and
# every ``eval_tasks_every`` steps; a layer above train builds it (eval/train_hook.py runs
# ``scratchlm eval``'s tasks and writes a report), so train never imports eval.
EvalHook = Callable[[torch.nn.Module, Any, int, bool], dict]


@dataclass
class TrainResult:
    step: int
    tokens: int
    out_dir: Path
    val: dict = field(default_factory=dict)  # the last evaluation
    eval_scores: dict = field(default_factory=dict)  # the eval hook's last scores (eval_tasks)
    losses: list = field(default_factory=list)  # train loss of every step of this run
    interrupted: bool = False

    @property
    def val_loss(self) -> float | None:
        return self.val.get("val_loss")

    @property
    def val_bpb(self) -> float | None:
        return self.val.get("val_bpb")



__all__ = ["EvalHook", "Run", "Task", "TrainResult"]
