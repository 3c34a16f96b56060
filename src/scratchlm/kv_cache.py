"""The KV cache: every layer's keys and values, preallocated once and written in place.

A decode step feeds one new token; attention needs the keys and values of every earlier
one. Instead of recomputing them, each layer keeps them here: global layers by position
(column p holds position p), local (sliding-window) layers in a ring buffer of their window.
``Transformer.forward(ids, cache=...)`` writes through ``update`` and reads the positions
of a ring's keys from ``key_positions`` to build its mask.

>>> from scratchlm.config import ModelConfig
>>> cache = KVCache(ModelConfig.preset("gemma3-tiny"), batch_size=1, max_length=100)
>>> [k.shape[2] for k in cache.k]  # local, local, global: the local layers keep their window of 16
[16, 16, 100]
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import ScratchLMError


class KVCache:
    """Keys and values of every layer, preallocated once and written in place.

    k[layer], v[layer]: (batch, n_kv_heads, columns, head_dim). ``length`` counts the
    positions filled so far; a forward pass with a cache writes its T new keys/values at
    positions [length, length + T) and then advances ``length`` by T. A global layer has
    ``max_length`` columns and keeps position p in column p.

    A local (sliding-window) layer needs only the last ``sliding_window`` keys, so it has
    ``window + slack`` columns (``ring=True``, the default) and keeps position p in column
    p % columns: a ring buffer, its memory bounded by the window however long the text.
    ``slack`` columns let a caller move ``length`` back by up to ``slack`` positions
    (speculative decoding drops rejected drafts) without losing keys still in the window.
    ``ring=False`` gives every layer ``max_length`` columns (for callers that index the
    buffers by position: the compiled step, the server).

    ``key_mask`` (batch, max_length), True where a position holds a real token, is only
    needed for batches of left-padded prompts: padding positions must never be attended.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int | None = None,
                 device=None, dtype=None, *, ring: bool = True, slack: int = 0):
        max_length = max_length or config.context_length
        if max_length > config.context_length:
            raise ScratchLMError(f"cache length {max_length} exceeds context_length {config.context_length}")
        dtype = dtype or getattr(torch, config.dtype)
        window = config.sliding_window
        local_columns = min(max_length, window + slack) if ring and window else max_length
        self.k, self.v = [], []
        for kind in config.layer_types:
            shape = (batch_size, config.n_kv_heads, local_columns if kind == "local" else max_length, config.head_dim)
            self.k.append(torch.zeros(shape, device=device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=device, dtype=dtype))
        self.max_length, self.batch_size, self.window = max_length, batch_size, window
        self.length = 0
        self.key_mask: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, k: list[torch.Tensor], v: list[torch.Tensor], *, length: int = 0,
                     key_mask: torch.Tensor | None = None, max_length: int | None = None,
                     window: int | None = None) -> KVCache:
        """A cache over tensors that already exist (per layer (B, n_kv_heads, columns,
        head_dim)), without copying them: what the model writes through it lands in them.
        max_length defaults to the most columns of any layer; window: the sliding window of
        the layers that have fewer (their ring buffers)."""
        cache = cls.__new__(cls)
        cache.k, cache.v = list(k), list(v)
        cache.batch_size = k[0].shape[0]
        cache.max_length = max_length or max(t.shape[2] for t in k)
        cache.window = window
        if window is None and any(t.shape[2] != cache.max_length for t in k):
            raise ValueError("layers with fewer columns than max_length are ring buffers: give their window")
        if not 0 <= length <= cache.max_length:
            raise ValueError(f"length {length} is outside the cache's {cache.max_length} positions")
        if key_mask is not None and key_mask.shape != (cache.batch_size, cache.max_length):
            raise ValueError(f"key_mask {tuple(key_mask.shape)} does not match the cache "
                             f"({cache.batch_size}, {cache.max_length})")
        cache.length, cache.key_mask = length, key_mask
        return cache

    def view(self, rows: slice = slice(None), *, length: int | None = None) -> KVCache:
        """A cache over ``rows`` of this one (a slice: views, not copies), holding ``length``
        positions (default: this cache's). Its key_mask is this one's rows, if it has one.

        A server keeps one cache for every row in flight and runs the model on the first B
        rows of it; writes through the view land in the whole.

        >>> from scratchlm.config import ModelConfig
        >>> whole = KVCache(ModelConfig.preset("gpt-tiny"), batch_size=4, max_length=16)
        >>> part = whole.view(slice(0, 2), length=5)
        >>> part.batch_size, part.length, part.k[0].data_ptr() == whole.k[0].data_ptr()
        (2, 5, True)
        """
        key_mask = self.key_mask[rows] if self.key_mask is not None else None
        return KVCache.from_tensors([t[rows] for t in self.k], [t[rows] for t in self.v],
                                    length=self.length if length is None else length, key_mask=key_mask,
                                    max_length=self.max_length, window=self.window)

    def _layout(self, layer: int, T: int) -> str:
        """How T new positions go into this layer: "linear" (column = position: the buffer
        has not wrapped), "ring" (written first, then the whole buffer is attended: the
        columns written over hold keys out of every new query's window) or "chunk" (too many
        new keys for that: attend to the old buffer and the new keys side by side)."""
        columns, end = self.k[layer].shape[2], self.length + T
        if end <= columns:
            return "linear"
        return "ring" if T <= columns - self.window + 1 else "chunk"

    def key_positions(self, layer: int, T: int) -> torch.Tensor | None:
        """The position of each key ``update(layer, ...)`` will return for T new ones, (S,)
        long, negative for an empty column; None when they are 0 .. length + T - 1 in order.
        Call it before update. Column j of a ring of C holds the last position p < end
        with p % C == j, that is end - 1 - (end - 1 - j) mod C."""
        layout = self._layout(layer, T)
        if layout == "linear":
            return None
        columns, start, end = self.k[layer].shape[2], self.length, self.length + T
        j = torch.arange(columns, device=self.k[layer].device)
        if layout == "ring":
            return end - 1 - (end - 1 - j) % columns
        old = start - 1 - (start - 1 - j) % columns
        return torch.cat([old, torch.arange(start, end, device=j.device)])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at the current position; return the keys and
        values to attend to, (B, n_kv_heads, S, head_dim): views of the buffer when they fit in
        it (S = length + T, or the whole ring), else the old ring and the T new ones side by side
        (see key_positions for their positions)."""
        buf_k, buf_v = self.k[layer], self.v[layer]
        start, T = self.length, k.shape[2]
        layout = self._layout(layer, T)
        if layout == "linear":
            buf_k[:, :, start:start + T] = k
            buf_v[:, :, start:start + T] = v
            return buf_k[:, :, :start + T], buf_v[:, :, :start + T]
        columns = buf_k.shape[2]
        keys, values = (buf_k, buf_v) if layout == "ring" else (torch.cat([buf_k, k], 2), torch.cat([buf_v, v], 2))
        keep = min(T, columns)  # a chunk longer than the ring leaves only its last `columns` keys
        first = (start + T - keep) % columns  # the column of the first key kept
        if first + keep <= columns:  # no wrap-around (a decode step): one slice, no index tensor
            buf_k[:, :, first:first + keep] = k[:, :, T - keep:]
            buf_v[:, :, first:first + keep] = v[:, :, T - keep:]
            return keys, values
        at = torch.arange(start + T - keep, start + T, device=buf_k.device) % columns
        buf_k.index_copy_(2, at, k[:, :, T - keep:].to(buf_k.dtype))
        buf_v.index_copy_(2, at, v[:, :, T - keep:].to(buf_v.dtype))
        return keys, values

    def window_is_whole_ring(self, layer: int, T: int) -> bool:
        """Whether the T new queries of this (local) layer see every key ``update`` returns,
        so that they need no window mask: one query (T == 1) on a full ring of at most
        ``window`` columns holds exactly the last ``window`` positions, its own included."""
        return T == 1 and self._layout(layer, T) == "ring" and self.k[layer].shape[2] <= self.window

    def reset(self) -> None:
        self.length = 0
        self.key_mask = None
