"""The norms of every family: RMSNorm (Llama, Qwen3, Gemma 3's (1 + weight), OLMo 2) and
LayerNorm (GPT-2), picked by the config (make_norm). model.py puts them in each block.

>>> import torch
>>> norm = RMSNorm(4)
>>> [round(v, 4) for v in norm(torch.tensor([3.0, -3.0, 3.0, -3.0])).tolist()]  # rms 3: each / 3 (eps aside)
[1.0, -1.0, 1.0, -1.0]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused_ops
from .config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Llama's norm: no mean subtraction and no bias.

    Computed in float32 whatever the input dtype, as Llama does, because the mean of
    squares overflows/underflows easily in half precision. Gemma's (``plus_one``) scales by
    (1 + weight), its weight stored around 0, and multiplies before the cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-5, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) [* weight] in one call (five ops written out).
        # Llama's weight multiplies after the cast back, in the input dtype; Gemma's 1 + weight
        # before it. Where that is float32 arithmetic anyway, the weight goes inside the call:
        # the same numbers, one op less per norm (a decode step runs dozens of norms).
        dim = (x.shape[-1],)
        weight = 1.0 + self.weight.float() if self.plus_one else self.weight
        if x.dtype == weight.dtype == torch.float32:
            if fused_ops.usable(x, weight):
                return fused_ops.rms_norm(x, weight, self.eps)  # one pass each way, on the CPU
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                return _RMSNormWithBackward.apply(x, weight, self.eps)  # training: half autograd's time
            return F.rms_norm(x, dim, weight, self.eps)
        if self.plus_one:
            return F.rms_norm(x.float(), dim, weight, self.eps).to(x.dtype)
        return self.weight * F.rms_norm(x.float(), dim, eps=self.eps).to(x.dtype)


class _RMSNormWithBackward(torch.autograd.Function):
    """F.rms_norm(x, weight) in float32, the same numbers (the same ops in the same order as
    PyTorch's CPU composite), with its backward written out. Autograd through the composite
    goes back through each of its ops; the gradient in closed form takes four passes.
    x (..., D), weight (D,):

        y = xhat * w,  xhat = x * r,  r = 1 / sqrt(mean(x^2) + eps)        (r: one per row)
        dL/dw = sum over rows of g * xhat
        dL/dx = r * (g w - xhat * mean(g w * xhat))

    Fwd + bwd at (2, 256, 1024), 2 threads: about half the time of autograd through F.rms_norm."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # (..., 1)
        xhat = x * r  # (..., D)
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, g):
        xhat, r, weight = ctx.saved_tensors
        grad_w = (g * xhat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None  # (D,)
        gw = g * weight  # (..., D)
        grad_x = gw.addcmul_(xhat, (gw * xhat).mean(-1, keepdim=True), value=-1).mul_(r)
        return grad_x, grad_w, None


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over the last ``dim`` (default d_model) features."""
    dim = dim or config.d_model
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps, plus_one=config.norm_plus_one)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


__all__ = ["RMSNorm", "make_norm"]
