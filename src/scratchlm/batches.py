"""Memory-mapped token shards -> batches of (inputs, targets).

A window is ``context_length + 1`` consecutive tokens of one shard (windows never cross
a shard boundary); ``x`` is the window without its last token and ``y`` without its
first, so ``y[t]`` is the token that follows ``x[:t+1]``. Windows start at random
positions (``sampler="random"``, for corpora much larger than one run reads) or step
through the corpus by ``stride`` in a shuffled order (``sampler="sliding"``). The shards
are any 1-D integer arrays: ``data.load_split`` gives the memory maps of a prepared folder,
so nothing is read from disk until a window is used.

>>> import numpy as np
>>> windows = SlidingWindows([np.arange(5, 10)], context_length=3, stride=1)
>>> x, y = windows[1]
>>> x.tolist(), y.tolist()
([6, 7, 8], [7, 8, 9])
>>> sampler = BatchSampler([np.arange(100)], context_length=8, batch_size=2, seed=0)
>>> x, y = sampler.micro_batch(step=0, micro=0)
>>> tuple(x.shape), bool((y[:, :-1] == x[:, 1:]).all())
((2, 8), True)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .data import DataError


class _Windows:
    """Windows of context_length + 1 tokens that never cross a shard boundary.

    Window number ``i`` (counted over all shards, shard after shard) is located with a
    binary search on the running count of windows per shard.
    """

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, stride: int):
        for name, value in (("context_length", context_length), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DataError(f"{name} must be a positive whole number, got {value!r}")
        self.shards, self.context_length, self.stride = list(shards), int(context_length), int(stride)
        # (file, size it had when opened) of each memory-mapped shard: reading a page of a
        # file that shrank since is SIGBUS, which kills the process without a word.
        self.files = [(Path(s.filename), s.offset + s.nbytes) if isinstance(s, np.memmap) and s.filename else None
                      for s in self.shards]
        per_shard = [max(0, (len(s) - context_length - 1) // stride + 1) for s in self.shards]
        self.ends = np.cumsum(per_shard)  # ends[k]: windows in shards 0..k
        if not per_shard or self.ends[-1] == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise DataError(f"not enough tokens for one window of {context_length + 1} "
                             f"(longest shard: {longest} tokens); use a shorter context_length")

    def __len__(self) -> int:
        return int(self.ends[-1])

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.ends, i, side="right"))
        local = i - (int(self.ends[shard - 1]) if shard else 0)
        start = local * self.stride
        return self.shards[shard][start:start + self.context_length + 1]

    def check_files(self, shards: Iterable[int]) -> None:
        """A DataError naming the shard file if one of ``shards`` is no longer the size it was
        when opened (truncated or rewritten while training runs), before any of it is read."""
        for k in shards:
            if self.files[k] is None:
                continue
            path, size = self.files[k]
            try:
                now = os.stat(path).st_size
            except OSError as e:
                raise DataError(f"{path}: the shard cannot be read any more ({e.strerror or e}); was the "
                                "data folder changed while training?") from None
            if now < size:
                raise DataError(f"{path} shrank from {size:,} to {now:,} bytes while training ran: the data "
                                "folder was changed (run `scratchlm prepare` again, then --resume)")

    def stack(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (len(indices), context_length) int64: y is x shifted by one."""
        self.check_files(set(np.searchsorted(self.ends, np.asarray(indices), side="right").tolist()))
        rows = np.stack([self.window(int(i)) for i in indices]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


class SlidingWindows(_Windows, torch.utils.data.Dataset):
    """A map-style dataset of overlapping windows: item i starts at token i * stride.

    stride == context_length: each token is a target once per epoch; a smaller stride
    gives more (overlapping) examples from a small corpus.
    """

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, stride: int | None = None):
        super().__init__(shards, context_length, context_length if stride is None else stride)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = torch.from_numpy(self.window(i).astype(np.int64))
        return row[:-1], row[1:]


class BatchSampler:
    """Which windows make up optimizer step ``step``: a pure function of (seed, step).

    Every rank computes the same ``global_batch_size`` window numbers and reads only its
    own slice of them, so the data are sharded by rank without any communication, and
    resuming at step k needs nothing but k. Rows are ordered (micro-step, rank, row):
    two ranks with one micro-step each read exactly what one process with two micro-steps
    reads, which is what makes DDP match gradient accumulation.

    sampler="random": window starts drawn uniformly (stride 1) with replacement.
    sampler="sliding": every window of the given stride once per epoch, in an order
    shuffled anew each epoch.
    """

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, batch_size: int,
                 grad_accum: int = 1, world_size: int = 1, sampler: str = "random",
                 stride: int | None = None, seed: int = 0):
        if sampler not in ("random", "sliding"):
            raise DataError(f"sampler must be 'random' or 'sliding', got {sampler!r}")
        for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DataError(f"{name} must be a positive whole number, got {value!r}")
        self.sampler, self.seed = sampler, seed
        stride = 1 if sampler == "random" else (context_length if stride is None else stride)
        self.windows = _Windows(shards, context_length, stride)
        self.batch_size, self.grad_accum, self.world_size = batch_size, grad_accum, world_size
        self.global_batch_size = batch_size * grad_accum * world_size
        self._epoch, self._order = -1, None

    def _window_numbers(self, step: int) -> np.ndarray:
        G, N = self.global_batch_size, len(self.windows)
        if self.sampler == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            return torch.randint(0, N, (G,), generator=g).numpy()
        samples = np.arange(step * G, (step + 1) * G)  # the global sample numbers of this step
        out = np.empty(G, dtype=np.int64)
        for j, s in enumerate(samples):
            epoch = int(s // N)
            if epoch != self._epoch:  # one permutation per epoch, cached
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._order = epoch, torch.randperm(N, generator=g).numpy()
            out[j] = self._order[s % N]
        return out

    def micro_batch(self, step: int, micro: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, context_length), for one micro-step of one rank."""
        numbers = self._window_numbers(step)
        first = (micro * self.world_size + rank) * self.batch_size
        return self.windows.stack(numbers[first:first + self.batch_size])

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch_size / len(self.windows)


def eval_batches(shards: Sequence[np.ndarray], context_length: int, batch_size: int,
                 max_batches: int, rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of non-overlapping windows (the same at every evaluation), spread
    evenly over the split so a small set still sees all of it; split between ranks."""
    windows = _Windows(shards, context_length, context_length)
    n = min(len(windows), max_batches * batch_size) // world_size * world_size  # equal work per rank
    if n == 0:
        raise DataError(f"the validation split has fewer than {world_size} windows of {context_length + 1} tokens")
    picks = np.linspace(0, len(windows) - 1, n).round().astype(np.int64)[rank::world_size]
    return [windows.stack(picks[i:i + batch_size]) for i in range(0, len(picks), batch_size)]
