"""The training metrics of the steps since the last log line, kept on the device.

Reading a tensor's value on the host (``.item()``, ``.tolist()``) waits for the device to
finish everything queued so far. A step that did it would stall the GPU every step, so the
loop adds each step's loss and metrics here as 0-d tensors and reads them all at once,
summed over the processes, when it logs.

>>> w = Window(tokens_before=0)
>>> for loss in (2.0, 1.0):
...     w.add(torch.tensor(loss), {"acc": torch.tensor(loss / 4)}, 10)
>>> values = w.read(Processes(), torch.device("cpu"))
>>> values["losses"], values["metrics"], values["tokens"]
([2.0, 1.0], {'acc': 0.375}, 20)
"""

from __future__ import annotations

import time

import torch

from .distributed import Processes, all_reduce_tensor


class Window:
    """The steps since the last log line: losses and metrics stay on the device until
    ``read`` syncs them (once), summed over the processes."""

    def __init__(self, tokens_before: int):
        self.losses: list[torch.Tensor] = []  # one 0-d tensor per step
        self.metrics: dict[str, list[torch.Tensor]] = {}
        self.tokens: int | torch.Tensor = 0  # this process's
        self.tokens_before = tokens_before
        self.start = time.perf_counter()
        self._read: tuple[int, dict] | None = None

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], tokens) -> None:
        self.losses.append(loss)
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append(value)
        self.tokens = self.tokens + tokens

    def read(self, procs: Processes, device: torch.device) -> dict:
        """{"losses": per-step mean loss over every process, "metrics": window means,
        "tokens": tokens of every process in the window}; one host sync, one collective."""
        if self._read is not None and self._read[0] == len(self.losses):
            return self._read[1]
        if not self.losses:  # every rank alike: nothing to reduce
            return {"losses": [], "tokens": 0, "metrics": {}}
        dtype = torch.float32 if device.type == "mps" else torch.float64
        names = sorted(self.metrics)
        parts = [torch.stack(self.losses).to(dtype)] + [torch.stack(self.metrics[n]).to(dtype) for n in names]
        tokens = torch.as_tensor(self.tokens, device=device).to(dtype).reshape(1)
        flat = all_reduce_tensor(torch.cat([p.to(device) for p in parts] + [tokens]), procs).tolist()
        n, W = len(self.losses), procs.world_size
        values = {"losses": [v / W for v in flat[:n]], "tokens": int(round(flat[-1])),
                  "metrics": {name: sum(flat[n * (i + 1):n * (i + 2)]) / (n * W) for i, name in enumerate(names)}}
        self._read = (n, values)
        return values


__all__ = ["Window"]
