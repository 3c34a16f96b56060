"""The whole Transformer in one file: norms, positions, attention, MLPs, block, model, KV cache.

One configurable model covers GPT-2, Llama 2 / 3 / 3.1 / 3.2 and, with a mixture-of-experts
MLP (moe.py), Mixtral. Follow a token:

    ids (B, T) -> tok_emb -> (+ learned/sinusoidal positions) -> x (B, T, d_model)
    for each Block:   x = x + attn(norm(x))      # RoPE is applied to q, k inside attn
                      x = x + mlp(norm(x))
    final_norm -> lm_head -> logits (B, T, vocab_size)

Parameter names say what they are and map one-to-one onto the Hugging Face weights
(see hf.py): ``blocks.0.attn.qkv_proj`` is GPT-2's ``h.0.attn.c_attn`` and Llama's
``layers.0.self_attn.{q,k,v}_proj`` stacked.

>>> import torch
>>> from scratchlm.config import ModelConfig
>>> model = Transformer(ModelConfig.preset("llama-tiny"))
>>> model(torch.tensor([[1, 2, 3]])).shape
torch.Size([1, 3, 512])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ScratchLMError
from .moe import MoE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) * weight. Llama's norm: no mean subtraction and no bias.

    Computed in float32 whatever the input dtype, as Llama does, because the mean of
    squares overflows/underflows easily in half precision.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one fused kernel (five ops written out);
        # the weight multiplies after the cast back, in the input dtype, as Llama does.
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


# ----------------------------------------------------------------------------------------
# Positions. Each table is built once per model and shared by every layer.
# ----------------------------------------------------------------------------------------
def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/head_dim), i = 0..head_dim/2-1, shape (head_dim/2,).

    With Llama 3.1 ``rope_scaling``, low frequencies (wavelength longer than
    original_context / low_freq_factor) are divided by ``factor``, high frequencies
    (wavelength shorter than original_context / high_freq_factor) are kept, and the band
    in between is blended smoothly. This lets a model trained on 8k positions read 128k.
    """
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    factor, low, high, original = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_context_length"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_mid, blended, scaled)


def rope_table(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (length, head_dim).

    The half-split layout (frequencies repeated as [f0..f_{d/2-1}, f0..f_{d/2-1}]) pairs
    dimension i with i + head_dim/2, the convention of the Hugging Face Llama weights.
    """
    inv_freq = rope_frequencies(config)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its angle. x: (B, H, T, D); cos, sin: (B, 1, T, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)  # the 90-degree turn of each pair
    return x * cos + rotated * sin


def check_token_ids(ids, vocab_size: int) -> None:
    """Raise a ScratchLMError naming the first id outside [0, vocab_size).

    Ids are checked where they enter (a tokenizer's output, a caller's prompt ids, a
    request body), not in ``Transformer.forward``: reading a tensor's min and max there
    would cost two device-to-host syncs per forward and two graph breaks under
    torch.compile. ids: a list of ints, nested lists, or a tensor.

    >>> check_token_ids([[1, 2], [3]], vocab_size=4)
    >>> check_token_ids([1, 9], vocab_size=4)
    Traceback (most recent call last):
    ...
    scratchlm.errors.ScratchLMError: token id 9 is outside the vocabulary [0, 4)
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    stack = [ids]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif not 0 <= item < vocab_size:
            raise ScratchLMError(f"token id {item} is outside the vocabulary [0, {vocab_size})")


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """The fixed positions of "Attention Is All You Need", (length, d_model):
    PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer, preallocated once and written in place.

    k[layer], v[layer]: (batch, n_kv_heads, max_length, head_dim). ``length`` counts the
    positions filled so far; a forward pass with a cache writes its T new keys/values at
    [length, length + T) and then advances ``length`` by T.

    ``key_mask`` (batch, max_length), True where a position holds a real token, is only
    needed for batches of left-padded prompts: padding positions must never be attended.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int | None = None,
                 device=None, dtype=None):
        max_length = max_length or config.context_length
        if max_length > config.context_length:
            raise ScratchLMError(f"cache length {max_length} exceeds context_length {config.context_length}")
        dtype = dtype or DTYPES[config.dtype]
        shape = (batch_size, config.n_kv_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.max_length = max_length
        self.batch_size = batch_size
        self.length = 0
        self.key_mask: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, k: list[torch.Tensor], v: list[torch.Tensor], *, length: int = 0,
                     key_mask: torch.Tensor | None = None) -> KVCache:
        """A cache over tensors that already exist (per layer (B, n_kv_heads, max_length,
        head_dim)), without copying them: what the model writes through it lands in them."""
        cache = cls.__new__(cls)
        cache.k, cache.v = list(k), list(v)
        cache.batch_size, _, cache.max_length, _ = k[0].shape
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
                                    length=self.length if length is None else length, key_mask=key_mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at the current position; return all keys and
        values so far, (B, n_kv_heads, length + T, head_dim), as views (no copy)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0
        self.key_mask = None


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with n_heads query heads sharing n_kv_heads key/value heads.

    n_kv_heads == n_heads is multi-head attention (GPT-2, Llama 2 7B), n_kv_heads == 1 is
    multi-query attention, anything in between is grouped-query attention (Llama 3): each
    group of n_heads / n_kv_heads query heads reads the same key/value head, which makes
    the KV cache that many times smaller.
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # One matrix for q, k and v: one matmul instead of three.
        self.qkv_proj = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = True  # False: the reference path written out below

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv_heads, S, head_dim), S = past + T

        if self.use_sdpa and T == 1 and self.n_kv_heads != self.n_heads:
            y = self._decode_gqa(q, k, v, mask)
        elif self.use_sdpa:
            y = self._sdpa(q, k, v, mask)
        else:
            y = self._reference(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # heads side by side
        return self.resid_dropout(self.out_proj(y))

    def _reference(self, q, k, v, mask):
        """softmax(q k^T / sqrt(d) + causal mask) v, written out.  q: (B, H, T, D); k, v: (B, Hkv, S, D)."""
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, S, D): each kv head serves `group` query heads
        v = v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        T, S = scores.shape[-2:]
        if mask is None:  # plain causal: query i (at absolute position S - T + i) sees keys <= it
            mask = causal_mask(T, S, device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.softmax(scores.float(), dim=-1).to(q.dtype)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        return weights @ v  # (B, H, T, D)

    def _sdpa(self, q, k, v, mask):
        """The same computation through PyTorch's fused kernel (flash / memory-efficient)."""
        T, S = q.shape[2], k.shape[2]
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads
        if mask is None and T == S:  # no cache: the kernel's own causal mask is cheapest
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
        if mask is None and T == 1:  # one new token attends to everything before it
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
        if mask is None:
            mask = causal_mask(T, S, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


    def _decode_gqa(self, q, k, v, mask):
        """One new token with grouped keys: the `group` query heads that share a key/value
        head become `group` queries of that one head, so the kernel reads each cached key
        once, as plain (non-GQA) attention.  q: (B, H, 1, D) -> (B, Hkv, group, D).

        None of these queries is causal with respect to the others (they sit at the same
        position), so the only mask is the padding mask (B, 1, 1, S), which broadcasts.
        Measured per call (benchmarks/decode.py --attention): faster than enable_gqa=True,
        most in bf16 and at batch 8."""
        B, H, _, D = q.shape
        q = q.reshape(B, self.n_kv_heads, H // self.n_kv_heads, D)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, Hkv, group, D)
        return y.reshape(B, H, 1, D)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i may attend key j. The T queries are the last T of S
    positions, so query i sits at absolute position S - T + i and sees keys j <= S - T + i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


# ----------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.kind == "gelu":
            h = F.gelu(self.up_proj(x), approximate="tanh")  # GPT-2's "gelu_new"
        else:
            h = F.relu(self.up_proj(x))
        return self.dropout(self.down_proj(h))


# ----------------------------------------------------------------------------------------
# Block and model
# ----------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MoE(config) if config.n_experts else MLP(config)  # mixture of experts: moe.py

    def forward(self, x, rope, mask, cache):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        elif config.positions == "sinusoidal":
            self.register_buffer("pos_table", None, persistent=False)  # filled by reset_tables()
        else:  # rope: one cos/sin table for all layers
            self.register_buffer("rope_cos", None, persistent=False)
            self.register_buffer("rope_sin", None, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one matrix reads tokens in and writes them out
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layers),
        # so the variance of the residual stream does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.down_proj.weight", "mlp.down_proj")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        self.to(DTYPES[config.dtype])
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)build the position tables in float32 on the weights' device: at construction,
        and after a model made on the meta device has been given real storage."""
        device = self.tok_emb.weight.device
        if self.config.positions == "sinusoidal":
            self.pos_table = sinusoidal_table(self.config.context_length, self.config.d_model).to(device)
        elif self.config.positions == "rope":
            cos, sin = rope_table(self.config, self.config.context_length)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- settings ------------------------------------------------------------------------
    @property
    def use_sdpa(self) -> bool:
        return self.blocks[0].attn.use_sdpa

    @use_sdpa.setter
    def use_sdpa(self, value: bool) -> None:
        """True: F.scaled_dot_product_attention. False: the written-out reference attention."""
        for block in self.blocks:
            block.attn.use_sdpa = value

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if hasattr(self, "pos_emb"):
                n -= self.pos_emb.weight.numel()
        return n

    def num_active_parameters(self) -> int:
        """Parameters one token computes with: with a mixture of experts, all of them less
        the n_experts - experts_per_token experts of each layer it is not routed to."""
        c = self.config
        unused = c.n_layers * (c.n_experts - c.experts_per_token) * 3 * c.d_model * c.d_ff_expert
        return self.num_parameters() - (unused if c.n_experts else 0)

    def router_logits(self) -> list[torch.Tensor]:
        """Each MoE layer's router logits (B * T, n_experts) of the last forward in training
        mode, for moe.load_balancing_loss; [] for a dense model."""
        return [b.mlp.router_logits for b in self.blocks if getattr(b.mlp, "router_logits", None) is not None]

    def new_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_length, device=p.device, dtype=p.dtype)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab_size). ids must lie in [0, vocab_size): check
        ids from outside with check_token_ids before (forward does not, to stay sync-free).

        cache: a KVCache; the T tokens are appended after the ``cache.length`` already seen.
        positions: (B, T) position of each token; by default past .. past + T - 1. Batches of
            left-padded prompts pass their own so that every row starts at position 0.
        return_hidden: return the final normed hidden states (B, T, d_model) instead of logits.
        """
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        limit = cache.max_length if cache is not None else self.config.context_length
        if past + T > limit:
            raise ScratchLMError(f"sequence of {past + T} tokens exceeds the context length {limit}")
        # ids are not range-checked here (no host sync, no graph break): see check_token_ids.
        default_positions = positions is None
        if default_positions and self.config.positions != "rope":
            positions = torch.arange(past, past + T, device=ids.device).unsqueeze(0)  # (1, T)

        x = self.tok_emb(ids)  # (B, T, d_model)
        rope = None
        if self.config.positions == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        elif default_positions:  # a slice of the table: a view, no gather
            cos = self.rope_cos[past:past + T][None, None].to(x.dtype)  # (1, 1, T, head_dim)
            sin = self.rope_sin[past:past + T][None, None].to(x.dtype)
            rope = (cos, sin)
        else:
            cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # (B or 1, 1, T, head_dim)
            sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
            rope = (cos, sin)
        x = self.drop(x)

        # One mask for all layers, and only when the kernels' built-in causal masking does not
        # cover the case: padded rows in a batch, or several new tokens after a cached prefix.
        mask = None
        if cache is not None and cache.key_mask is not None:
            S = past + T
            mask = causal_mask(T, S, device=ids.device)[None, None] & cache.key_mask[:, None, None, :S]
            # A query on a padding position would see no key at all and give NaN: let it see itself.
            mask = mask | _diagonal(T, S, ids.device)[None, None]
        elif cache is not None and T > 1 and past > 0:
            mask = causal_mask(T, past + T, device=ids.device)

        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None:
            cache.length = past + T
        x = self.final_norm(x)
        if return_hidden:
            return x
        return self.lm_head(x)


def _diagonal(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool, True only where query i meets its own key (absolute position S - T + i)."""
    return torch.arange(S, device=device)[None, :] == torch.arange(S - T, S, device=device)[:, None]
