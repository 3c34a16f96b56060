"""Training's small ops fused on the CPU: RMSNorm, the rotary embedding and the SwiGLU gate,
each forward and backward one pass over memory (csrc/train_ops.cpp, compiled on first use).

Around a block's matrices a training step runs dozens of elementwise ops: an RMSNorm is six
forward and seven backward, a rotation five and three, the gate two and four. On a CPU at the
sizes a small model trains at, each op's pass, dispatch and thread wake-up add up to as much
as the matmuls (a DPO step of benchmarks/posttrain.py). Here each is one C++ loop over rows,
wrapped in an autograd Function with its gradient in closed form.

norms.py, positions.py and model.py's MLP call these where ``usable``: CPU, float32, not
under torch.compile (which fuses the plain ops itself), the extension built. Elsewhere (a
GPU, bf16, no compiler, ``SCRATCHLM_NO_FUSED_OPS=1``) they keep their PyTorch ops. The
rotation is bit for bit PyTorch's; the norm and the gate agree to float32 rounding
(tests/test_fused_ops.py checks values and gradients against autograd through the plain ops).

>>> import torch
>>> x, w = torch.randn(3, 8), torch.ones(8)
>>> torch.allclose(rms_norm(x, w, 1e-6), torch.nn.functional.rms_norm(x, (8,), w, 1e-6), atol=1e-6)
True
"""

from __future__ import annotations

import torch

from .extension import build

_built: dict = {}  # "module": the extension, or None where it cannot be built; set on first use


def kernels():
    """The compiled extension, or None where it cannot be built (warned once)."""
    if "module" not in _built:
        # -ffp-contract=off: no fused multiply-adds, so the rotation rounds as PyTorch's ops do.
        # -ffast-math (finite math kept) lets the compiler vectorize the sums and the gate's exp.
        flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-ffast-math",
                 "-fno-finite-math-only", "-ffp-contract=off"]
        _built["module"] = build("scratchlm_train_ops", ["train_ops.cpp"], "the CPU training kernels",
                                 "SCRATCHLM_NO_FUSED_OPS", flags)
    return _built["module"]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors: all float32 on the CPU, outside
    torch.compile, and the extension built."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and kernels() is not None)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------
# RMSNorm: y = x / rms(x) * weight
# ----------------------------------------------------------------------------------------
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = kernels().rms_norm_forward(x, weight, eps)  # rstd (rows,): 1 / rms of each row
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = kernels().rms_norm_backward(g.contiguous(), x, weight, rstd, ctx.needs_input_grad[1])
        return dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (D,), weight, eps) for x (..., D), weight (D,), in one pass each way."""
    x, weight = x.contiguous(), weight.contiguous()
    if _needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return kernels().rms_norm_forward(x, weight, eps)[0]


# ----------------------------------------------------------------------------------------
# The rotary embedding: each (x_i, x_{i + D/2}) turned by its angle
# ----------------------------------------------------------------------------------------
class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return kernels().rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        g = g if g.stride(-1) == 1 else g.contiguous()
        return kernels().rotate(g, cos, sin, -1), None, None  # the transpose: a turn back


def rotate_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rotate takes these: x (B, H, T, D), tables (B or 1, 1, T, D), each with its
    last dimension contiguous, all float32 CPU tensors."""
    return (x.dim() == cos.dim() == sin.dim() == 4 and cos.shape[-1] == x.shape[-1] and x.shape[-1] % 2 == 0
            and cos.shape[1] == sin.shape[1] == 1 and cos.shape[2] == sin.shape[2] == x.shape[2]
            and cos.shape[0] in (1, x.shape[0]) and sin.shape[0] in (1, x.shape[0])
            and x.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1 and usable(x, cos, sin))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """positions.apply_rope's rotation (its numbers exactly) in one pass; x may be a strided
    view (the transposed q or k projection). Returns (B, H, T, D) contiguous."""
    if _needs_grad(x):
        return _Rotate.apply(x, cos, sin)
    return kernels().rotate(x, cos, sin, 1)


# ----------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up, from the stacked gate-and-up matmul
# ----------------------------------------------------------------------------------------
class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return _silu_mul(*gate_up.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, g):
        (gate_up,) = ctx.saved_tensors
        # The gradient of both halves side by side: what the stacked matmul's backward takes
        # (no cat of two separate gradients).
        return kernels().swiglu_backward(g.contiguous(), gate_up)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    F_ = gate.shape[-1]
    gate, up = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, up))
    return kernels().swiglu_forward(gate.reshape(-1, F_), up.reshape(-1, F_)).view(*gate.shape)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (..., F) from gate_up (..., 2F), the gate's F numbers first: in
    training, the stacked matmul's output (its gradient comes back stacked too)."""
    gate_up = gate_up.contiguous()
    if _needs_grad(gate_up):
        return _SwiGLU.apply(gate_up)
    return _silu_mul(*gate_up.chunk(2, dim=-1))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of two separate (..., F) tensors, no gradient: inference's
    two matmuls, the same numbers as swiglu on them stacked."""
    return _silu_mul(gate, up)


# ----------------------------------------------------------------------------------------
# Attention: softmax(scale q k^T + mask) v over short rows
# ----------------------------------------------------------------------------------------
# A row's scores are held whole; longer rows go to PyTorch's flash kernel, which blocks the keys
# (at 512 ours was still 0.7-0.9x its time, causal, no gradient; beyond, not measured).
ATTENTION_MAX_KEYS = 512


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, source, B, T):
        out, lse = kernels().attention_forward(q, k, v, mask, causal, scale, source, B, T)  # out (tokens, H, D)
        ctx.save_for_backward(q, k, v, out, lse, mask, source)
        ctx.causal, ctx.scale, ctx.B, ctx.T = causal, scale, B, T
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, mask, source = ctx.saved_tensors
        g = g if g.stride(-1) == 1 else g.contiguous()
        dq, dk, dv = kernels().attention_backward(g, q, k, v, out, lse, mask, ctx.causal, ctx.scale, source,
                                                  ctx.B, ctx.T)
        return dq, dk, dv, None, None, None, None, None, None


def _tokens_major(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, D) -> (B * T, heads, D), the layout the kernel reads and writes."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


class _PaddedAttention(torch.autograd.Function):
    """The padded layout's wrapper: q (B, H, T, D) views in, (B, H, T, D) out, a view of the
    kernel's (B, T, H, D)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out, lse = kernels().attention_forward(q, k, v, mask, causal, scale, None, 0, 0)  # (B * T, H, D)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        B, H, T, D = q.shape
        return out.view(B, T, H, D).transpose(1, 2)

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, mask = ctx.saved_tensors
        B, H, T, D = q.shape
        S = k.shape[2]
        dq, dk, dv = kernels().attention_backward(_tokens_major(g), q, k, v, out, lse, mask, ctx.causal, ctx.scale,
                                                  None, 0, 0)
        Hkv = k.shape[1]
        return (dq.view(B, T, H, D).transpose(1, 2), dk.view(B, S, Hkv, D).transpose(1, 2),
                dv.view(B, S, Hkv, D).transpose(1, 2), None, None, None)


def _attention_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     keys: int) -> bool:
    if mask is not None and (mask.dtype != torch.float32 or mask.dim() != 4 or mask.shape[1] != 1):
        return False
    return keys <= ATTENTION_MAX_KEYS and q.shape[1] % k.shape[1] == 0 and q.shape[-1] % 16 == 0 and usable(q, k, v)


def attention_fits(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether attention takes these: float32 CPU tensors (B, heads, T, D), at most
    ATTENTION_MAX_KEYS keys, head_dim a multiple of 16, and a mask (if any) additive in
    float32, (B or 1, 1, T, S)."""
    return q.dim() == k.dim() == 4 and _attention_takes(q, k, k, mask, k.shape[2])


def unpadded_attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            T: int) -> bool:
    """Whether unpadded_attention takes these: as attention_fits, for per-token (n, heads, D)
    tensors of a batch T positions wide."""
    return q.dim() == k.dim() == 3 and _attention_takes(q, k, v, mask, T)


def _mask_rows(mask: torch.Tensor | None, B: int, T: int, S: int) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = mask[:, 0].expand(B, T, S)  # (B, T, S): the kernel's view
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    without dropout, for q (B, H, T, D), k and v (B, Hkv, S, D) (views with D contiguous) and
    an additive float mask (B or 1, 1, T, S); ``causal``: query i (position S - T + i) sees
    keys up to its own too. Returns (B, H, T, D), a view of a (B, T, H, D) tensor (so the heads
    side by side are a free reshape)."""
    B, H, T, D = q.shape
    scale = scale if scale is not None else D ** -0.5
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = _mask_rows(mask, B, T, k.shape[2])
    if _needs_grad(q, k, v):
        return _PaddedAttention.apply(q, k, v, mask, causal, scale)
    out = kernels().attention_forward(q, k, v, mask, causal, scale, None, 0, 0)[0]
    return out.view(B, T, H, D).transpose(1, 2)


def unpadded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, B: int, T: int,
                       mask: torch.Tensor | None = None, causal: bool = True, scale: float | None = None
                       ) -> torch.Tensor:
    """attention over the n real tokens of a (B, T) batch, as they are: q (n, H, D), k and v
    (n, Hkv, D), ``source`` (B * T,) each position's token (n at the padding: unpadding.Unpadded's),
    the mask (B or 1, 1, T, T) over positions. Returns (n, H, D). The padding's queries are
    skipped and its keys are zeros no query may see (the mask's or causality's job)."""
    if not usable(q, k, v):
        raise ValueError("unpadded_attention takes float32 CPU tensors and the built kernels")
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = _mask_rows(mask, B, T, T)
    if _needs_grad(q, k, v):
        return _Attention.apply(q, k, v, mask, causal, scale, source, B, T)
    return kernels().attention_forward(q, k, v, mask, causal, scale, source, B, T)[0]


__all__ = ["kernels", "usable", "rms_norm", "rotate", "rotate_fits", "swiglu", "silu_mul", "attention", "attention_fits",
           "unpadded_attention", "unpadded_attention_fits"]
