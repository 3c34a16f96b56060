"""Padded batches without paying for the padding: the real tokens of a (B, T) batch as n rows.

Rows of different lengths are padded to the longest for the attention kernel, which wants a
(B, heads, T, head_dim) layout. Every other layer of a Transformer works token by token (the
embedding, the norms, the projections, the MLP), so it can run on the n real tokens alone,
(n, d), and only the attention sees the padded layout (flash-attn's "unpadded" inputs; a DPO
batch of packed pairs is a sixth padding). Two moves between the layouts, each the other's
backward:

    pad(x, u)     (n, C) -> (B, T, C): the rows at their positions, zeros at the padding
    unpad(y, u)   (B, T, C) -> (n, C): the real positions' rows

The padding is a constant: no gradient reaches it or comes from it. Both are an index_select
(a row copy; index_copy and index_add are 3-5x slower on the CPU, measured), forward and
backward.

>>> import torch
>>> u = Unpadded.of(torch.tensor([0, 1, 2, 3]), 2, 3)      # row 0: 3 tokens, row 1: 1
>>> x = torch.tensor([[1.], [2.], [3.], [4.]])
>>> pad(x, u)[..., 0]
tensor([[1., 2., 3.],
        [4., 0., 0.]])
>>> torch.equal(unpad(pad(x, u), u), x)
True
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Unpadded(NamedTuple):
    """Where the n real tokens of a (B, T) batch are. index (n,): their flat positions
    (row * T + column, distinct; ascending keeps the rows' order); source (B * T,): for
    each position its row in the (n, C) tensor, n (a zero row) at the padding."""

    index: torch.Tensor
    source: torch.Tensor
    B: int
    T: int

    @staticmethod
    def of(index: torch.Tensor, B: int, T: int) -> Unpadded:
        n = index.shape[0]
        source = torch.full((B * T,), n, dtype=torch.long, device=index.device)
        source[index] = torch.arange(n, device=index.device)
        return Unpadded(index, source, B, T)


def _pad(x: torch.Tensor, u: Unpadded) -> torch.Tensor:
    zero = x.new_zeros(1, x.shape[-1])
    return torch.cat([x, zero]).index_select(0, u.source).view(u.B, u.T, x.shape[-1])


def _unpad(y: torch.Tensor, u: Unpadded) -> torch.Tensor:
    return y.reshape(u.B * u.T, y.shape[-1]).index_select(0, u.index)


class _Move(torch.autograd.Function):
    """pad (``to_padded``) or unpad, whose backward is the other move."""

    @staticmethod
    def forward(ctx, x, u, to_padded):
        ctx.u, ctx.to_padded = u, to_padded
        return _pad(x, u) if to_padded else _unpad(x, u)

    @staticmethod
    def backward(ctx, grad):
        return (_unpad(grad, ctx.u) if ctx.to_padded else _pad(grad.contiguous(), ctx.u)), None, None


def pad(x: torch.Tensor, u: Unpadded) -> torch.Tensor:
    """(n, C) -> (B, T, C): row i of x at flat position u.index[i], zeros elsewhere."""
    return _Move.apply(x, u, True) if torch.is_grad_enabled() and x.requires_grad else _pad(x, u)


def unpad(y: torch.Tensor, u: Unpadded) -> torch.Tensor:
    """(B, T, C) -> (n, C): the rows at the real positions u.index."""
    return _Move.apply(y, u, False) if torch.is_grad_enabled() and y.requires_grad else _unpad(y, u)


class _SelectRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, first, repeats):
        ctx.N, ctx.index, ctx.first, ctx.repeats = x.shape[0], index, first, repeats
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        # Each row's first use scattered by an index_select, the few repeated uses added after.
        grad = grad.contiguous()
        first = ctx.first
        dx = _pad(grad.index_select(0, first), Unpadded.of(ctx.index.index_select(0, first), 1, ctx.N))[0]
        if ctx.repeats.numel():
            dx.index_add_(0, ctx.index.index_select(0, ctx.repeats), grad.index_select(0, ctx.repeats))
        return dx, None, None, None


def select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(0, index) for x (N, C) and rows ``index`` (n,), with a faster backward
    on the CPU: PyTorch's (index_add) adds the n rows one by one, ~0.8 ms for 576 rows of 128
    (a DPO step's hidden states); here an index_select scatters each row's first use and
    index_add adds only the repeats (a pair's two rows share their prompt's last position)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(0, index)
    seen: set[int] = set()
    first, repeats = [], []
    for i, row in enumerate(index.tolist()):
        (repeats if row in seen else first).append(i)
        seen.add(row)
    as_index = lambda rows: torch.tensor(rows, dtype=torch.long, device=index.device)  # noqa: E731
    return _SelectRows.apply(x, index, as_index(first), as_index(repeats))


__all__ = ["Unpadded", "pad", "unpad", "select_rows"]
