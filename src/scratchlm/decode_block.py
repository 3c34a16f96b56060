"""A Block whose one-token steps run the small ops fused (csrc/decode_ops.cpp).

A decode step multiplies each weight matrix by one row per sequence, and between the
matrices model.py's Block runs ~45 small PyTorch ops a layer: norms, the q/k/v split, QK-norm,
rotary, the cache write, attention, the activation, the residual adds. On a small CPU each
op's dispatch (~3-6 us) costs more than its arithmetic; for SmolLM2-135M (30 layers) that was
11-20 ms of every step, as much as reading the weights (benchmarks/decode.py). DecodeBlock
runs the same block as 4 fused calls between the weight matrices:

    x, h = residual_norm(x, None, attn_norm)              # h = attn_norm(x)
    y    = attend_one(qkv_proj(h), rope, cache, mask)     # QK-norm, rotary, cache write, attention
    x, h = residual_norm(x, out_proj(y), attn_post_norm, mlp_norm)
    x, _ = residual_norm(x, down_proj(act(gate_proj(h), up_proj(h))), mlp_post_norm)

The weight matrices are the model's own modules (any decode layout, a LoRA wrapper, a MoE
layer), so a DecodeBlock holds no weights of its own. Anything else (a prompt of several
tokens, training, autograd, torch.compile, which fuses these ops itself, a chunked ring
cache, the reference attention) runs Block.forward unchanged.

prepare_for_decode installs it (``fused=True``, the default where our kernels are built), in
a DecodeBlocks list: a one-token step of every block is then one C++ call (run_blocks), not
one Python call a block.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer, cpu_gemv
>>> model = Transformer(ModelConfig.preset("llama-tiny")).eval()
>>> if cpu_gemv.kernels() is not None:
...     fast = Transformer(model.config).eval()
...     _ = fast.load_state_dict(model.state_dict())
...     fast.blocks = torch.nn.ModuleList(DecodeBlock(b) for b in fast.blocks)
...     caches = [model.new_cache(1, 8), fast.new_cache(1, 8)]
...     with torch.inference_mode():
...         for ids in ([[1, 2, 3]], [[4]], [[5]]):
...             a, b = (m(torch.tensor(ids), cache=c) for m, c in zip((model, fast), caches))
...     assert torch.allclose(a, b, atol=1e-5)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import cpu_gemv
from .model import MLP, Block
from .norms import RMSNorm

# decode_ops.cpp's norm kinds and activations
NONE, RMS, RMS_PLUS_ONE, LAYER = 0, 1, 2, 3
ACTIVATIONS = {"swiglu": 0, "geglu": 1, "gelu": 1, "relu": 2}  # silu, tanh gelu, relu
QK_NORMS = {None: 0, "head": 1, "projection": 2}
# decode_ops.cpp's FusedBlock projections: a decode layer's decode_spec() is
# (kind, a, b, c, bias, group_size, cast); kind TRANSPOSED is TransposedLinear's fp32 GEMV
TRANSPOSED = 2
ABSENT = (-1, None, None, None, None, 0, 0)  # no gate: an ungated MLP


def _norm_kind(norm: nn.Module) -> int | None:
    """decode_ops.cpp's kind of a model.py norm, or None for a norm it does not compute."""
    if type(norm) is nn.Identity:
        return NONE
    if type(norm) is RMSNorm:
        return RMS_PLUS_ONE if norm.plus_one else RMS
    if type(norm) is nn.LayerNorm and norm.elementwise_affine:
        return LAYER
    return None


def _norm(norm: nn.Module) -> tuple:
    """(kind, weight, bias) as residual_norm takes them (read from the parameter dict: a step
    makes ~120 of these reads, and nn.Module.__getattr__ costs ~1 us each)."""
    kind = _norm_kind(norm)
    if kind == NONE:
        return NONE, None, None
    parameters = norm._parameters
    return kind, parameters["weight"], parameters.get("bias")


class DecodeBlock(Block):
    """``block`` (its own submodules, not copies) with fused one-token steps."""

    def __init__(self, block: Block):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        self.training = block.training
        attn = self.attn
        norms = [self.attn_norm, self.attn_post_norm, self.mlp_norm, self.mlp_post_norm]
        if attn.qk_norm is not None:
            norms += [attn.q_norm, attn.k_norm]
        kinds = [_norm_kind(n) for n in norms]
        epsilons = {n.eps for n, k in zip(norms, kinds) if k not in (None, NONE)}
        # One eps for every norm of the block (a config has one norm_eps); 2 * D rotary halves.
        self.fusable = None not in kinds and len(epsilons) <= 1 and attn.head_dim % 2 == 0
        self.eps = epsilons.pop() if epsilons else 1e-5
        self.qk_norm = QK_NORMS[attn.qk_norm]
        self.qk_norm_kind = kinds[4] if attn.qk_norm is not None else NONE
        self.activation = ACTIVATIONS.get(self.mlp.kind) if type(self.mlp) is MLP else None  # None: MoE, own forward
        self.gated = self.activation is not None and self.mlp.kind in ("swiglu", "geglu")
        self._plan, self._plan_parts = None, None  # the C++ step (_fused_plan) and what it was built from

    def _parts(self) -> tuple:
        """The submodules a FusedBlock holds the tensors of (to notice one replaced)."""
        modules, attn = self._modules, self._modules["attn"]._modules
        mlp = self._modules["mlp"]._modules
        return (modules["attn_norm"], modules["attn_post_norm"], modules["mlp_norm"], modules["mlp_post_norm"],
                attn.get("q_norm"), attn.get("k_norm"), attn["qkv_proj"], attn["out_proj"], mlp.get("gate_proj"),
                mlp.get("up_proj"), mlp.get("down_proj"))

    def _fused_plan(self):
        """decode_ops.cpp's FusedBlock for this block: the whole one-token step in one call, or
        None where a piece is not a decode layer it runs (a MoE, a LoRA wrapper, nn.Linear).
        Built once; again when a submodule is replaced or the tensors move (``_apply``)."""
        parts = self._parts()
        if parts == self._plan_parts:
            return self._plan
        self._plan, self._plan_parts = self._build_plan(parts), parts
        return self._plan

    def _build_plan(self, parts):
        if self.activation is None:
            return None
        *norms, qkv, out, gate, up, down = parts
        specs = []
        for layer in (qkv, out, gate if self.gated else None, up, down):
            if layer is None:
                specs.append(ABSENT)
                continue
            spec = layer.decode_spec() if hasattr(type(layer), "decode_spec") else None
            if spec is None or (spec[0] != TRANSPOSED and layer.in_features % 16):  # our kernels' unit
                return None
            specs.append(spec)
        norm_specs = [_norm(n) for n in norms[:4]]
        norm_specs += [_norm(n) if self.qk_norm else (NONE, None, None) for n in norms[4:]]
        attn = self._modules["attn"]
        return cpu_gemv.kernels().FusedBlock(norm_specs, specs, attn.n_heads, attn.n_kv_heads, attn.scale or 0.0,
                                             self.qk_norm, self.qk_norm_kind, self.activation, self.eps)

    def _apply(self, fn, recurse=True):
        self._plan, self._plan_parts = None, None  # .to() and friends replace the tensors it holds
        return super()._apply(fn, recurse)

    def fused(self, x: torch.Tensor, cache) -> bool:
        """Whether this call is a one-token step that the fused ops compute exactly as Block does."""
        if not (self.fusable and cache is not None and x.shape[1] == 1 and x.device.type == "cpu"):
            return False
        if torch.is_grad_enabled() or self.training or torch.compiler.is_compiling() or not self._modules["attn"].use_sdpa:
            return False
        layer = self._modules["attn"].layer
        k = cache.k[layer]
        return (x.dtype in (torch.float32, torch.bfloat16) and k.dtype == x.dtype and k.is_contiguous()
                and cache.v[layer].is_contiguous() and cache._layout(layer, 1) != "chunk"
                and cpu_gemv.kernels() is not None)

    def forward(self, x, rope, mask, cache, unpadded=None):
        if not self.fused(x, cache):
            return super().forward(x, rope, mask, cache, unpadded)
        # Submodules from the dict and their forward, not __call__ (no hooks to run): a step
        # makes ~300 of these calls, and each nn.Module indirection costs about a microsecond.
        ops, eps, modules = cpu_gemv.kernels(), self.eps, self._modules
        attn, mlp = modules["attn"], modules["mlp"]
        linears = attn._modules
        B = x.shape[0]
        # The new key goes to the cache column of its position (a ring: position mod columns), and
        # the query reads every column filled so far (a ring: all of them, the window).
        layer, start = attn.layer, cache.length
        columns = cache.k[layer].shape[2]
        column, keys = (start, start + 1) if start < columns else (start % columns, columns)
        cos, sin = rope if rope is not None else (None, None)
        plan = self._fused_plan() if B <= cpu_gemv.MAX_ROWS else None
        if plan is not None:  # the same calls as below, from C++
            return plan.step(x, cos, sin, cache.k[layer], cache.v[layer], column, keys, mask)
        _, h = ops.residual_norm(x, None, NONE, None, None, *_norm(modules["attn_norm"]), eps)
        q_weight = linears["q_norm"]._parameters["weight"] if self.qk_norm else None
        k_weight = linears["k_norm"]._parameters["weight"] if self.qk_norm else None
        y = ops.attend_one(linears["qkv_proj"].forward(h), cos, sin, cache.k[layer], cache.v[layer], column, keys,
                           mask, attn.n_heads, attn.n_kv_heads, attn.scale or 0.0, self.qk_norm, self.qk_norm_kind,
                           q_weight, k_weight, eps)  # (B, n_heads * head_dim)
        x, h = ops.residual_norm(x, linears["out_proj"].forward(y.view(B, 1, -1)), *_norm(modules["attn_post_norm"]),
                                 *_norm(modules["mlp_norm"]), eps)
        if self.activation is None:
            out = mlp(h)
        else:
            m = mlp._modules
            gate = m["gate_proj"].forward(h) if self.gated else m["up_proj"].forward(h)
            out = m["down_proj"].forward(ops.activation(gate, m["up_proj"].forward(h) if self.gated else None,
                                                        self.activation))
        x, _ = ops.residual_norm(x, out, *_norm(modules["mlp_post_norm"]), NONE, None, None, eps)
        return x


class DecodeBlocks(nn.ModuleList):
    """The model's blocks (DecodeBlocks) as a ModuleList, whose one-token steps run all the
    blocks' fused steps in one call (decode_ops.cpp's run_blocks): from Python, each block's
    call and its checks cost ~50 us on a small CPU, ~2 ms of a 30-layer smollm2-135m step.
    model.forward calls ``one_token_step`` and loops over the blocks itself where it gives None."""

    def one_token_step(self, x: torch.Tensor, rope, rope_local, mask, local_mask, cache) -> torch.Tensor | None:
        """x (B, 1, d) through every block, as model.forward's loop computes it; None unless
        every block is a DecodeBlock whose fused C++ step takes this call (DecodeBlock.fused)
        and none has a forward hook (the loop calls the blocks, so their hooks run).

        Also x (1, T, d), T <= MAX_ROWS new tokens of one unpadded row after its cache (a
        speculative round's verify pass, a draft catching up): every matrix is read once for the
        T rows and each token attends to the keys up to its own, the causal mask model.forward
        builds. Not where a local layer's window or a ring buffer would need more than that."""
        B, T = x.shape[:2]
        if cache is None or B * T > cpu_gemv.MAX_ROWS:
            return None
        if T > 1 and (B > 1 or cache.key_mask is not None
                      or any(cache.length + T > k.shape[2] for k in cache.k)):
            return None
        plans, local = [], []
        for block in self:
            hooked = block._forward_hooks or block._forward_pre_hooks
            plan = (block._fused_plan() if isinstance(block, DecodeBlock) and not hooked and block.fused(x[:, -1:], cache)
                    else None)
            if plan is None or (T > 1 and block._modules["attn"].local):
                return None
            plans.append(plan)
            local.append(block._modules["attn"].local)
        if T > 1:
            mask = None  # each token's keys end at its own: run_blocks' causal steps
        cos, sin = rope if rope is not None else (None, None)
        cos_local, sin_local = rope_local if rope_local is not None else (None, None)
        return cpu_gemv.kernels().run_blocks(plans, x, local, cos, sin, cos_local, sin_local, mask, local_mask,
                                             cache.k, cache.v, cache.length)
