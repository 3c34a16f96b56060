"""A one-token decode step for torch.compile: static shapes, the KV cache as a fixed buffer.

``Transformer.forward`` with a cache slices the cache to the filled length (``k[:, :, :end]``)
and reads ``cache.length``, a Python int that grows by one per token: a compiler that
specializes on it would see a new program at every step. This step instead reads the whole
preallocated buffer every time and takes the position as data:

    ids (B, 1), column (1,) long: the cache column this token is written to
    positions (B, L), key_mask (B, L): each row's position and real-token mask per column
    per layer: q, k, v of the one token; k, v written at ``column`` (index_copy_, in place)
               attention over all L columns, masked to key_mask & (column index <= column)
               (& column index > column - sliding_window in a local layer)
    -> logits (B, vocab_size) of the one token

Every tensor keeps its shape from one step to the next, so the compiled graph is reused
for the whole decode (and for the next call with the same batch size and cache length).
The extra masked columns cost a little attention work; the weights, read once per token
either way, dominate. The buffers hold every position (``new_cache(..., ring=False)``): a
local layer's window is a mask here, not a ring buffer. The numbers are those of the uncompiled cached step (the same
modules run); only the order of some additions inside attention may differ.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> _ = torch.manual_seed(0)
>>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
>>> cache = model.new_cache(1, 8)
>>> with torch.no_grad():
...     _ = model(torch.tensor([[1, 2, 3]]), cache=cache)  # prefill columns 0..2
...     expected = model(torch.tensor([[4]]), cache=cache)[:, -1]  # the usual cached step
...     positions, key_mask = torch.arange(8)[None], torch.ones(1, 8, dtype=torch.bool)
...     logits = decode_step(model, torch.tensor([[4]]), torch.tensor([3]), positions, key_mask,
...                          cache.k, cache.v)  # column 3 again, written over with the same k, v
>>> bool(torch.allclose(logits, expected, atol=1e-5))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import ScratchLMError

if TYPE_CHECKING:
    from .model import Attention, Transformer

# step(ids, column, positions, key_mask, k_cache, v_cache) -> logits (B, vocab_size)
DecodeStep = Callable[..., torch.Tensor]


def _attend(attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
            mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            column: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row. x: (B, 1, d_model); mask: (B, 1, 1, L);
    k_cache, v_cache: (B, n_kv_heads, L, head_dim), written at ``column``."""
    B = x.shape[0]
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.project(x, rope)  # q (B, H, 1, D); k, v (B, Hkv, 1, D): QK-normed and rotated
    k_cache.index_copy_(2, column, k.to(k_cache.dtype))  # column is a tensor: no new shape per step
    v_cache.index_copy_(2, column, v.to(v_cache.dtype))
    if Hkv != H:  # the query heads of one kv head become that head's queries (see Attention._decode_gqa)
        q = q.reshape(B, Hkv, H // Hkv, D)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=attn.scale)  # (B, Hkv, group, D) or (B, H, 1, D)
    return attn.out_proj(y.reshape(B, 1, H * D))  # one position: heads side by side is a plain reshape


def decode_step(model: Transformer, ids: torch.Tensor, column: torch.Tensor, positions: torch.Tensor,
                key_mask: torch.Tensor, k_cache: Sequence[torch.Tensor],
                v_cache: Sequence[torch.Tensor]) -> torch.Tensor:
    """One cached token per row through ``model`` (in eval mode), shapes independent of the step.

    ids (B, 1) long; column (1,) long: the cache column of this token (every row's, as in a
    left-padded batch); positions (B, L) long and key_mask (B, L) bool over the cache's L
    columns (generate.left_pad's); k_cache, v_cache: per layer (B, n_kv_heads, L, head_dim),
    holding columns < column and written at column. Returns logits (B, vocab_size).
    """
    config = model.config
    if any(t.shape[2] != key_mask.shape[1] for t in k_cache):  # shapes: no host sync
        raise ScratchLMError("decode_step needs every layer's cache to hold every column "
                             "(make it with new_cache(..., ring=False))")
    position = positions.index_select(1, column)  # (B, 1)
    x = model.tok_emb(ids)  # (B, 1, d_model)
    if config.scale_embeddings:
        x = x * torch.tensor(config.d_model ** 0.5, dtype=x.dtype)
    rope = {False: None, True: None}  # by layer kind: local?
    if config.positions == "learned":
        x = x + model.pos_emb(position)
    elif config.positions == "sinusoidal":
        x = x + model.pos_table[position].to(x.dtype)
    else:
        for local in rope:
            cos, sin = model.rope_tables(local)
            rope[local] = (cos[position].unsqueeze(1).to(x.dtype),  # (B, 1, 1, head_dim)
                           sin[position].unsqueeze(1).to(x.dtype))
    # Keys this token may see: real tokens up to and including its own column. (Its own
    # column is always a real token: generated tokens are never padding.)
    columns = torch.arange(key_mask.shape[1], device=key_mask.device)
    mask = (key_mask & (columns <= column))[:, None, None, :]  # (B, 1, 1, L)
    masks = {False: mask}
    if config.sliding_window:  # a local layer's query sees only its last sliding_window columns
        masks[True] = mask & (columns > column - config.sliding_window)[None, None, None, :]
    for i, block in enumerate(model.blocks):
        local = block.attn.local
        h = _attend(block.attn, block.attn_norm(x), rope[local], masks[local], k_cache[i], v_cache[i], column)
        x = x + block.attn_post_norm(h)
        x = x + block.mlp_post_norm(block.mlp(block.mlp_norm(x)))
    return model.lm_head(model.final_norm(x)[:, -1])  # (B, vocab_size)


def compile_decode_step(model: Transformer, backend: str = "inductor") -> DecodeStep:
    """``decode_step`` bound to ``model`` and compiled with torch.compile(backend=backend),
    made once per model and backend and kept on the model (swapping its modules, e.g. with
    prepare_for_decode, makes the compiler trace it again on the next call).

    The shapes are those of one decode (batch size, cache length): a later call with other
    shapes compiles once more, after which torch marks the changed sizes dynamic.
    """
    if not isinstance(backend, str) or not backend:
        raise ScratchLMError(f"compile backend must be a torch.compile backend name, got {backend!r}")
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    if backend not in steps:
        def step(ids, column, positions, key_mask, k_cache, v_cache):
            return decode_step(model, ids, column, positions, key_mask, k_cache, v_cache)

        steps[backend] = torch.compile(step, backend=backend)
    return steps[backend]
