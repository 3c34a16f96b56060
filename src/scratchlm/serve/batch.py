"""The running batch: the KV cache of every row in flight, in one set of buffers.

How rows of different lengths share one KV cache: every row's keys sit *right-aligned*
in the cache, ending at the column the next step writes (``length``). A row with u
tokens so far owns columns [length - u, length); ``cache.key_mask`` hides the columns to
the left of it, and each row passes its own position ids, so a row computes what it
would compute alone. When a row joins, its prompt's keys (from its own prefill) are
copied in; when the cache's columns run out, it grows, or at the context length all rows
slide left together over the columns none of them uses any more.

A decode step is three calls, so that the engine can run a row again on its own when a
batched step fails: ``make_room`` (a free column for everyone), ``forward(rows)`` (the
model on those rows, writing that column), ``advance`` (the column is taken).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import KVCache, Transformer
    from .engine import Sequence


class RunningBatch:
    """The KV cache of every row in flight, side by side and right-aligned (see the module
    docstring). Row i of the cache belongs to ``rows[i]``.

    ``cache`` holds ``allocated`` rows and ``columns`` positions, both grown by doubling
    (up to max_batch and the context length) and never shrunk, so a model with a 128k
    context does not reserve 128k positions per row for short chats. Its ``key_mask``
    (allocated, columns) is True at each row's keys. The model sees ``cache.view`` of the
    first B rows, so its writes land in the buffers. A row that leaves is replaced by the
    last row (one row copied): the rows in use are always the first B and nothing else moves.
    """

    def __init__(self, model: Transformer, max_batch: int, columns: int = 256):
        self.model, self.max_batch = model, max_batch
        self.context = model.config.context_length
        self.initial_columns = min(columns, self.context)
        self.rows: list[Sequence] = []
        self.length = 0  # the column the next step writes; every row's keys end just before it
        self.allocated, self.columns = 0, 0
        self.cache: KVCache | None = None  # the buffers, made by the first _reserve

    def add(self, seq: Sequence, prefill: KVCache, row: int = 0) -> None:
        """Append a row whose prompt is row ``row`` of ``prefill`` (a cache of left-padded
        prompts: this one's P positions are its last P columns)."""
        P, B, T = len(seq.prompt_ids), len(self.rows), prefill.length
        self._reserve(B + 1, max(P, self.length))
        if not self.rows:
            self.length = P
        elif self.length < P:  # not enough columns to the left of the others: shift them right
            self._shift(P - self.length)
        end, cache = self.length, self.cache
        for layer in range(len(prefill.k)):
            cache.k[layer][B, :, end - P:end] = prefill.k[layer][row, :, T - P:T]
            cache.v[layer][B, :, end - P:end] = prefill.v[layer][row, :, T - P:T]
        cache.key_mask[B] = False
        cache.key_mask[B, end - P:end] = True
        self.rows.append(seq)

    def remove(self, leaving: list[Sequence]) -> None:
        for seq in leaving:
            if seq not in self.rows:
                continue
            i, last = self.rows.index(seq), len(self.rows) - 1
            if i != last:  # move the last row into the hole
                for t in self.cache.k + self.cache.v + [self.cache.key_mask]:
                    t[i] = t[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.length = 0

    def make_room(self) -> None:
        """Before a step: make sure there is a column for it, and mark it as every row's."""
        if self.length == self.columns:  # no column left for this step
            unused = self.length - max(s.cached_tokens for s in self.rows)  # on the left, by every row
            if self.columns < self.context and unused < self.columns // 4:
                self._reserve(len(self.rows), self.columns + 1)  # room is cheap: grow
            else:
                self._shift(-unused)  # at the context limit (or plenty unused): slide left
        self.cache.key_mask[:len(self.rows), self.length] = True  # the column this step writes

    def forward(self, rows: slice, return_hidden: bool = False) -> torch.Tensor:
        """Feed ``rows`` (all of them, or one row again after a failed batched step) their last
        sampled token; return the next logits (len(rows), V), or the final hidden states
        (len(rows), d_model) with return_hidden. Each row writes column ``length``, so running
        a row a second time overwrites what a failed pass left."""
        seqs = self.rows[rows]
        device = self.cache.key_mask.device
        ids = torch.tensor([[s.generated[-1]] for s in seqs], dtype=torch.long, device=device)
        positions = torch.tensor([[s.cached_tokens] for s in seqs], dtype=torch.long, device=device)
        view = self.cache.view(rows, length=self.length)  # these rows, written in place
        hidden = self.model(ids, cache=view, positions=positions, return_hidden=True)
        return hidden[:, -1] if return_hidden else self.model.lm_head(hidden[:, -1])

    def advance(self) -> None:
        """After a step: every row's keys now end one column further right."""
        self.length += 1

    def step(self) -> torch.Tensor:
        """One whole step (make_room, forward for every row, advance): the next logits (B, V)."""
        self.make_room()
        logits = self.forward(slice(0, len(self.rows)))
        self.advance()
        return logits

    # ---- buffers ---------------------------------------------------------------------------
    def _reserve(self, rows: int, columns: int) -> None:
        """Make room for at least ``rows`` rows and ``columns`` columns (doubling what is there)."""
        if rows <= self.allocated and columns <= self.columns:
            return
        new_rows = self.allocated if rows <= self.allocated else min(self.max_batch, max(rows, 2 * self.allocated))
        new_columns = self.columns if columns <= self.columns else min(
            self.context, max(columns, 2 * self.columns, self.initial_columns))
        fresh = self.model.new_cache(new_rows, new_columns, ring=False)  # zeros in the model's dtype and device
        fresh.key_mask = torch.zeros(new_rows, new_columns, dtype=torch.bool, device=fresh.k[0].device)
        if self.cache is not None:  # keys stay in the same rows and columns: the first r, c
            r, c = self.allocated, self.columns
            for old, new in zip(self.cache.k + self.cache.v, fresh.k + fresh.v, strict=True):
                new[:r, :, :c] = old  # (rows, n_kv_heads, columns, head_dim)
            fresh.key_mask[:r, :c] = self.cache.key_mask
        self.cache = fresh
        self.allocated, self.columns = new_rows, new_columns

    def _shift(self, by: int) -> None:
        """Move every row's columns ``by`` to the right (by > 0) or left (by < 0)."""
        B, L = len(self.rows), self.length
        lo = max(0, -by)  # columns [lo, L) survive a left shift; all of them a right one
        for t in self.cache.k + self.cache.v:
            t[:B, :, lo + by:L + by] = t[:B, :, lo:L].clone()
        mask = self.cache.key_mask
        moved = mask[:B, lo:L].clone()
        mask[:B] = False
        mask[:B, lo + by:L + by] = moved
        self.length = L + by
