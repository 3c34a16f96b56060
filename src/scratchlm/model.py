"""The whole Transformer: attention, MLPs, block, model (norms.py and positions.py hold its norms and
position encodings, kv_cache.py its cache, moe.py the mixture-of-experts MLP).

One configurable model covers GPT-2, Llama 2 / 3 / 3.1 / 3.2, Qwen2.5 / Qwen3, Gemma 3 and
OLMo 2 (docs/families.md lists what differs and where), and with a mixture-of-experts MLP
(moe.py) Mixtral and Qwen3-MoE. Follow a token:

    ids (B, T) -> tok_emb (* sqrt(d_model) in Gemma) -> (+ learned/sinusoidal positions) -> x (B, T, d_model)
    for each Block:   x = x + attn(norm(x))      # RoPE (and QK-norm) applied to q, k inside attn
                      x = x + mlp(norm(x))       # OLMo 2 norms the branch's output, Gemma 3 both
    final_norm -> lm_head -> logits (B, T, vocab_size)
                  (training, with targets: lm_head and cross-entropy in one step, loss.py)

A layer is global (every earlier key) or local (the last ``sliding_window`` keys); a local
layer's KV cache keeps only its window (kv_cache.py).

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

from . import fused_ops
from .config import ModelConfig
from .errors import ScratchLMError
from .kv_cache import KVCache
from .loss import linear_cross_entropy
from .moe import MoE
from .norms import make_norm
from .positions import apply_rope, rope_table, sinusoidal_table
from .unpadding import Unpadded, pad, unpad

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------
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
    try:  # a flat list of ids, the usual case: min and max at C speed
        if not ids or (0 <= min(ids) and max(ids) < vocab_size):
            return
    except TypeError:  # nested lists: walked below
        pass
    stack = [ids]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif not 0 <= item < vocab_size:
            raise ScratchLMError(f"token id {item} is outside the vocabulary [0, {vocab_size})")


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with n_heads query heads sharing n_kv_heads key/value heads.

    n_kv_heads == n_heads is multi-head attention (GPT-2, Llama 2 7B), n_kv_heads == 1 is
    multi-query attention, anything in between is grouped-query attention (Llama 3): each
    group of n_heads / n_kv_heads query heads reads the same key/value head, which makes
    the KV cache that many times smaller.

    head_dim need not be d_model / n_heads (Qwen3, Gemma 3). QK-norm (Qwen3, Gemma 3, OLMo 2)
    RMS-normalizes q and k before RoPE, which keeps the attention logits from growing
    without bound in training. A local layer (``sliding_window``) is masked to its window.
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.local = layer, config.layer_types[layer] == "local"
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # One matrix for q, k and v: one matmul instead of three. Qwen2.5 has biases on these only.
        self.qkv_proj = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=config.bias or config.qkv_bias)
        self.out_proj = nn.Linear(q_dim, config.d_model, bias=config.bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:  # "head": over each head's head_dim; "projection": over all heads
            self.q_norm = make_norm(config, self.head_dim if self.qk_norm == "head" else q_dim)
            self.k_norm = make_norm(config, self.head_dim if self.qk_norm == "head" else kv_dim)
        # Scores are q.k / sqrt(head_dim), or / sqrt(query_pre_attn_scalar) (Gemma). None: the kernels' default.
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = True  # False: the reference path written out below

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                unpadded: Unpadded | None = None):
        """x (B, T, d_model) -> q (B, n_heads, T, head_dim), k and v (B, n_kv_heads, T, head_dim),
        QK-normed and rotated. ``unpadded``: x is (n, d_model), the real tokens of a (B, T) batch
        (Transformer.forward's real_index), rope's tables are per token (n, 1, 1, head_dim), and
        q, k, v stay per token: (n, heads, head_dim)."""
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        if self.qk_norm == "projection":  # OLMo 2: one norm over all the heads of q, one over k's
            q, k = self.q_norm(q), self.k_norm(k)
        tokens = x.shape[:-1]  # (B, T), or (n,) unpadded
        q = q.view(*tokens, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim) or (n, n_heads, head_dim)
        k = k.view(*tokens, self.n_kv_heads, self.head_dim)
        v = v.view(*tokens, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head's vector normed on its own
            q, k = self.q_norm(q), self.k_norm(k)
        # Heads before positions: (B, heads, T, head_dim); unpadded each token a batch of its own,
        # (n, heads, 1, head_dim), for the rotation's per-token tables.
        q, k = (t.transpose(1, 2) if unpadded is None else t[:, :, None] for t in (q, k))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if unpadded is not None:
            return q[:, :, 0], k[:, :, 0], v
        return q, k, v.transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: KVCache | None,
                unpadded: Unpadded | None = None) -> torch.Tensor:
        q, k, v = self.project(x, rope, unpadded)
        no_dropout = not (self.training and self.dropout > 0)
        if unpadded is not None:
            if self.use_sdpa and no_dropout and fused_ops.unpadded_attention_fits(q, k, v, mask, unpadded.T):
                # The real tokens as they are: the kernel skips the padding's queries and keys.
                y = fused_ops.unpadded_attention(q, k, v, unpadded.source, unpadded.B, unpadded.T, mask,
                                                 causal=True, scale=self.scale)  # (n, n_heads, head_dim)
                return self.resid_dropout(self.out_proj(y.flatten(1)))
            # Elsewhere into the (B, T) layout, zeros at the padding, for the kernels below.
            q, k, v = (pad(t.flatten(1), unpadded).view(unpadded.B, unpadded.T, -1, self.head_dim).transpose(1, 2)
                       for t in (q, k, v))
        B, T = q.shape[0], q.shape[2]
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv_heads, S, head_dim), S = past + T

        # Every key is one of the T new ones, in order: no cache, or a prefill into an empty one.
        # Every mask there is causal (packed rows, left padding, a window), so the kernel skips
        # the keys after each query as well (fused_ops.py; faster than the flash kernel).
        whole = cache is None or (cache.length == 0 and k.shape[2] == T)
        if self.use_sdpa and whole and no_dropout and fused_ops.attention_fits(q, k, mask):
            y = fused_ops.attention(q, k, v, mask, causal=True, scale=self.scale)
        elif self.use_sdpa and T == 1 and self.n_kv_heads != self.n_heads:
            y = self._decode_gqa(q, k, v, mask)
        elif self.use_sdpa:
            y = self._sdpa(q, k, v, mask)
        else:
            y = self._reference(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # heads side by side
        if unpadded is not None:  # back to the real positions: (n, n_heads * head_dim)
            y = unpad(y, unpadded)
        return self.resid_dropout(self.out_proj(y))

    def _reference(self, q, k, v, mask):
        """softmax(q k^T / sqrt(d) + causal mask) v, written out.  q: (B, H, T, D); k, v: (B, Hkv, S, D)."""
        group = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, S, D): each kv head serves `group` query heads
        v = v.repeat_interleave(group, dim=1)
        scale = self.scale or 1 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
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
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa,
                                                  scale=self.scale)
        if mask is None and T == 1:  # one new token attends to everything before it
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa, scale=self.scale)
        if mask is None:
            mask = causal_mask(T, S, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa,
                                              scale=self.scale)


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
        if q.device.type == "cpu" and q.dtype == torch.float32 and not dropout:
            # On the CPU in float32 these are two small batched matmuls, and the fused kernel's
            # set-up costs more than its math: 3x slower at 32 rows x 44 keys of llama-tiny (a
            # GRPO batch), even at 8 rows x 1024 keys of a 1B model (measured per call).
            scores = (q @ k.transpose(-2, -1)) * (self.scale or D ** -0.5)  # (B, Hkv, group, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return (scores.softmax(-1) @ v).reshape(B, H, 1, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           scale=self.scale)  # (B, Hkv, group, D)
        return y.reshape(B, H, 1, D)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i may attend key j. The T queries are the last T of S
    positions, so query i sits at absolute position S - T + i and sees keys j <= S - T + i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


# ----------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """GPT-2: down(gelu(up(x))). Llama (SwiGLU): down(silu(gate(x)) * up(x)).
    Gemma (GeGLU): down(gelu(gate(x)) * up(x)), the tanh-approximated gelu."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        if self.kind in ("swiglu", "geglu"):
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = self._swiglu(x)
        elif self.kind == "geglu":
            gate, up = self._gate_and_up(x)
            h = F.gelu(gate, approximate="tanh") * up
        elif self.kind == "gelu":
            h = F.gelu(self.up_proj(x), approximate="tanh")  # GPT-2's "gelu_new"
        else:
            h = F.relu(self.up_proj(x))
        return self.dropout(self.down_proj(h))

    def _stacked_gate_up(self, x: torch.Tensor) -> torch.Tensor | None:
        """In training, gate_proj(x) and up_proj(x) side by side (..., 2 d_ff) from one matmul
        with the two weights stacked (2 d_ff, d_model), copied each step: x is read once each
        way and the backward does one matmul fewer: 7% less forward + backward time at
        qwen3-0.6b's MLP, 14% at a tiny one (2 threads), the same numbers. None in inference,
        which keeps two: a decode step reads each weight once, and the copy would read it again."""
        g, u = self.gate_proj, self.up_proj
        if torch.is_grad_enabled() and type(g) is nn.Linear and type(u) is nn.Linear and g.bias is None \
                and u.bias is None:
            return F.linear(x, torch.cat([g.weight, u.weight]))
        return None

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate_proj(x)) * up_proj(x); on the CPU in float32 one pass each way (fused_ops.py),
        the same numbers in training (stacked) and inference (two matmuls)."""
        stacked = self._stacked_gate_up(x)
        if stacked is not None and fused_ops.usable(stacked):
            return fused_ops.swiglu(stacked)
        gate, up = self._gate_and_up(x, stacked)
        if not fused_ops.usable(gate, up):
            return F.silu(gate) * up
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):  # adapters on gate / up
            return fused_ops.swiglu(torch.cat([gate, up], dim=-1))
        return fused_ops.silu_mul(gate, up)

    def _gate_and_up(self, x: torch.Tensor, stacked: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_proj(x), up_proj(x): the halves of ``stacked`` where there is one (training)."""
        if stacked is None:
            stacked = self._stacked_gate_up(x)
        if stacked is not None:
            return stacked.split(self.gate_proj.out_features, dim=-1)
        return self.gate_proj(x), self.up_proj(x)


# ----------------------------------------------------------------------------------------
# Block and model
# ----------------------------------------------------------------------------------------
class Block(nn.Module):
    """A residual block: x + attn(norm(x)), then x + mlp(norm(x)) ("pre", GPT-2, Llama).

    ``norm_placement`` "post" (OLMo 2) norms each branch's output instead,
    x + norm(attn(x)); "sandwich" (Gemma 3) does both, x + norm(attn(norm(x))). A norm a
    placement does not have is an Identity (no weights)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        pre, post = config.norm_placement != "post", config.norm_placement != "pre"
        self.attn_norm = make_norm(config) if pre else nn.Identity()
        self.attn = Attention(config, layer)
        self.attn_post_norm = make_norm(config) if post else nn.Identity()
        self.mlp_norm = make_norm(config) if pre else nn.Identity()
        self.mlp = MoE(config) if config.n_experts else MLP(config)  # mixture of experts: moe.py
        self.mlp_post_norm = make_norm(config) if post else nn.Identity()

    def forward(self, x, rope, mask, cache, unpadded=None):
        x = x + self.attn_post_norm(self.attn(self.attn_norm(x), rope, mask, cache, unpadded))
        return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        elif config.positions == "sinusoidal":
            self.register_buffer("pos_table", None, persistent=False)  # filled by reset_tables()
        else:  # rope: one cos/sin table for all layers (and one for the local ones, with their own base)
            self.register_buffer("rope_cos", None, persistent=False)
            self.register_buffer("rope_sin", None, persistent=False)
            if config.rope_local_theta is not None:
                self.register_buffer("rope_local_cos", None, persistent=False)
                self.register_buffer("rope_local_sin", None, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        # Gemma's embedding scale sqrt(d_model) rounded to each dtype (Python floats: no tensor per forward).
        self.embedding_scale = {dt: torch.tensor(config.d_model ** 0.5, dtype=dt, device="cpu").item() for dt in DTYPES.values()}
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
            if self.config.rope_local_theta is not None:
                cos, sin = rope_table(self.config, self.config.context_length, local=True)
                self.rope_local_cos, self.rope_local_sin = cos.to(device), sin.to(device)

    def rope_tables(self, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The (context_length, head_dim) cos and sin tables of a global or a local layer."""
        if local and self.config.rope_local_theta is not None:
            return self.rope_local_cos, self.rope_local_sin
        return self.rope_cos, self.rope_sin

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

    def new_cache(self, batch_size: int, max_length: int | None = None, *, ring: bool = True,
                  slack: int = 0) -> KVCache:
        """An empty KVCache on the weights' device and dtype (see KVCache for ring and slack)."""
        p = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_length, device=p.device, dtype=p.dtype, ring=ring, slack=slack)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, return_hidden: bool = False,
                attn_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                real_index: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> logits (B, T, vocab_size). ids must lie in [0, vocab_size): check
        ids from outside with check_token_ids before (forward does not, to stay sync-free).

        cache: a KVCache; the T tokens are appended after the ``cache.length`` already seen.
        positions: (B, T) position of each token; by default past .. past + T - 1. Batches of
            left-padded prompts pass their own so that every row starts at position 0.
        return_hidden: return the final normed hidden states (B, T, d_model) instead of logits.
        attn_mask: (B, T, T) bool, True where query i may attend key j, within the causal mask
            (no cache; a sliding window also hides keys W or more positions back): a row
            that packs several sequences, each seeing only its own keys (shared_prompt.py).
            With ``positions`` (each below context_length: the caller's to ensure) the row may
            be longer than the context.
        targets: (B, T) the next token of each position, -100 where there is none: return the
            training loss, the mean cross-entropy over the other positions (a scalar, fp32),
            instead of the logits, without making the (B, T, vocab_size) logits (loss.py).
        real_index: (n,) the flat positions (row * T + column, ascending) of the real tokens of a
            padded batch (no cache): every layer that works token by token (the embedding, the
            norms, the projections, the MLP) runs on those n positions only, and the attention on
            the (B, T) layout they go back into, so padding costs nothing outside the attention
            kernel (flash-attn's "unpadded" inputs). The output is for those n: hidden
            (n, d_model), logits (n, vocab_size), or the loss over their targets. The mask must
            keep the real queries off the padding's keys (a causal mask does, for right padding).
        """
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        limit = cache.max_length if cache is not None else self.config.context_length
        packed = attn_mask is not None
        if packed and (cache is not None or positions is None):
            raise ScratchLMError("attn_mask takes explicit positions and no cache")
        if past + T > limit and not packed:
            raise ScratchLMError(f"sequence of {past + T} tokens exceeds the context length {limit}")
        if real_index is not None and cache is not None:
            raise ScratchLMError("real_index takes no cache")
        # ids are not range-checked here (no host sync, no graph break): see check_token_ids.
        default_positions = positions is None
        if default_positions and self.config.positions != "rope":
            positions = torch.arange(past, past + T, device=ids.device).unsqueeze(0)  # (1, T)

        unpadded = None
        if real_index is not None:  # from here on the token-wise layers see the n real positions only
            unpadded = Unpadded.of(real_index, B, T)
            ids = ids.flatten().index_select(0, real_index)  # (n,)
            if targets is not None:
                targets = targets.flatten().index_select(0, real_index)

        x = self.tok_emb(ids)  # (B, T, d_model), or (n, d_model) unpadded
        if self.config.scale_embeddings:  # Gemma: times sqrt(d_model), rounded to the weights' dtype as HF does
            x = x * self.embedding_scale[x.dtype]
        rope = rope_local = None
        token_positions = positions  # (B or 1, T) or None; unpadded each real token's, (n,)
        if unpadded is not None:
            every = positions if positions is not None else torch.arange(T, device=ids.device)[None]
            token_positions = every.expand(B, T).flatten().index_select(0, real_index)
        if self.config.positions == "learned":
            x = x + self.pos_emb(token_positions)
        elif self.config.positions == "sinusoidal":
            x = x + self.pos_table[token_positions].to(x.dtype)
        else:
            rope = rope_local = self._rope(self.rope_tables(False), past, T, token_positions, x.dtype)
            if self.config.rope_local_theta is not None:
                rope_local = self._rope(self.rope_tables(True), past, T, token_positions, x.dtype)
        x = self.drop(x)

        # One mask for all layers, and only when the kernels' built-in causal masking does not
        # cover the case: padded rows in a batch, or several new tokens after a cached prefix.
        mask = None
        if packed:  # (B, 1, T, T): the same for every head; a query never sees a later key
            mask = (attn_mask & causal_mask(T, T, device=ids.device))[:, None]
        elif cache is not None and cache.key_mask is not None:
            S = past + T
            mask = causal_mask(T, S, device=ids.device)[None, None] & cache.key_mask[:, None, None, :S]
            # A query on a padding position would see no key at all and give NaN: let it see itself.
            mask = mask | _diagonal(T, S, ids.device)[None, None]
        elif cache is not None and T > 1 and past > 0:
            mask = causal_mask(T, past + T, device=ids.device)

        local_mask = None
        if self.config.sliding_window and packed:
            # Within a packed sequence positions count tokens, so the window is a position gap.
            gap = positions[:, :, None] - positions[:, None, :]  # (B, T, T): query i minus key j
            local_mask = mask & (gap < self.config.sliding_window)[:, None]
        elif self.config.sliding_window:
            local_mask = self._local_mask(T, past, cache, mask, ids.device)

        prefill = cache is not None and past == 0 and T > 1
        if (packed or prefill) and self.use_sdpa and not torch.is_autocast_enabled(x.device.type):
            # The attention kernels take a boolean mask as an additive one, converted on every call
            # (forward and backward of every layer): converted once here instead.
            mask, local_mask = _additive(mask, x.dtype), _additive(local_mask, x.dtype)
        # decode_block.DecodeBlocks (prepare_for_decode on a CPU) runs a one-token step of every
        # block in one call, or returns None where it does not apply; a plain ModuleList has none.
        one_call = getattr(self.blocks, "one_token_step", None)
        stepped = one_call(x, rope, rope_local, mask, local_mask, cache) if one_call and unpadded is None else None
        if stepped is not None:
            x = stepped
        else:
            for block in self.blocks:
                local = block.attn.local
                x = block(x, rope_local if local else rope, local_mask if local else mask, cache, unpadded)
        if cache is not None:
            cache.length = past + T
        x = self.final_norm(x)
        if return_hidden:
            return x
        if targets is not None:
            return self._loss(x, targets)
        return self.lm_head(x)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of lm_head(x) (B, T, vocab) against targets (B, T), -100 ignored.

        The head and the loss in one step, a chunk of positions at a time (loss.py): at
        vocabularies of 150k-260k the (B, T, vocab) logits and their gradient are the largest
        tensors of a training step. Under autocast, under torch.compile (which fuses the plain
        path itself), or with a head that is not a plain Linear (LoRA on lm_head), the logits
        are made as usual and the loss taken in fp32."""
        head = self.lm_head
        plain = torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling()
        if type(head) is nn.Linear and head.bias is None and not plain:
            return linear_cross_entropy(x, head.weight, targets)
        logits = head(x).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.flatten(), ignore_index=-100)


    @staticmethod
    def _rope(tables, past: int, T: int, positions: torch.Tensor | None, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1 or B, 1, T, head_dim) of the T positions: a slice of the tables (a view,
        no gather) for past .. past + T - 1, else the rows of ``positions`` (B, T); for the
        positions (n,) of unpadded tokens, (n, 1, 1, head_dim) (Attention.project)."""
        cos, sin = tables
        if positions is not None and positions.dim() == 1:
            return cos[positions][:, None, None].to(dtype), sin[positions][:, None, None].to(dtype)
        if positions is None:
            return cos[past:past + T][None, None].to(dtype), sin[past:past + T][None, None].to(dtype)
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)

    def _local_mask(self, T: int, past: int, cache: KVCache | None, mask: torch.Tensor | None,
                    device) -> torch.Tensor | None:
        """The mask of the local layers: the global layers' (``mask``) while no key can be out of
        the window, else query q (position past + i) sees key k where q - window < k <= q, k is
        a real token and its column is filled. (T, S), or (B, 1, T, S) with a key_mask."""
        W = self.config.sliding_window
        first_local = self.config.layer_types.index("local")
        if mask is None and cache is not None and cache.window_is_whole_ring(first_local, T):
            return None  # a decode step on a full ring: every key in it is in the window (the usual case)
        keys = cache.key_positions(first_local, T) if cache is not None else None  # (S,) or None: 0..S-1
        if keys is None:
            if past + T <= W:
                return mask
            keys = torch.arange(past + T, device=device)
        q = torch.arange(past, past + T, device=device)[:, None]  # (T, 1)
        k = keys[None, :]  # (1, S)
        local = (k >= 0) & (k <= q) & (k > q - W)  # (T, S)
        if cache is not None and cache.key_mask is not None:
            real = cache.key_mask[:, keys.clamp(min=0)]  # (B, S): is the token at that position real?
            local = (local[None, None] & real[:, None, None, :]) | (k == q)[None, None]  # a padding query sees itself
        return local


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """A boolean attention mask (True: attend) as the additive one the kernel applies: 0 or -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _diagonal(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool, True only where query i meets its own key (absolute position S - T + i)."""
    return torch.arange(S, device=device)[None, :] == torch.arange(S - T, S, device=device)[:, None]
