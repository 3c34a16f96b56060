"""Where a token is: rotary embeddings (RoPE, with Llama 3.1's frequency scaling and
Gemma 3's local base) and the fixed sinusoidal table. Each table is built once per model and
shared by every layer (model.Transformer.rope_tables); apply_rope rotates q and k in
model.Attention. docs/positions.md walks through them.

>>> import torch
>>> from scratchlm.config import ModelConfig
>>> cos, sin = rope_table(ModelConfig.preset("llama-tiny"), 8)
>>> cos.shape, bool((cos ** 2 + sin ** 2 - 1).abs().max() < 1e-6)
(torch.Size([8, 16]), True)
"""

from __future__ import annotations

import math

import torch

from . import fused_ops
from .config import ModelConfig


def rope_frequencies(config: ModelConfig, local: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/head_dim), i = 0..head_dim/2-1, shape (head_dim/2,).

    With Llama 3.1 ``rope_scaling``, low frequencies (wavelength longer than
    original_context / low_freq_factor) are divided by ``factor``, high frequencies
    (wavelength shorter than original_context / high_freq_factor) are kept, and the band
    in between is blended smoothly. This lets a model trained on 8k positions read 128k.
    ``local``: the frequencies of the sliding-window layers, base ``rope_local_theta`` (Gemma 3:
    1e4 against the global layers' 1e6), never scaled (they never see far-apart positions).
    """
    head_dim = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    s = config.rope_scaling
    if s is None or local:
        return inv_freq
    factor, low, high, original = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_context_length"]
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_mid = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_mid, blended, scaled)


def rope_table(config: ModelConfig, length: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (length, head_dim).

    The half-split layout (frequencies repeated as [f0..f_{d/2-1}, f0..f_{d/2-1}]) pairs
    dimension i with i + head_dim/2, the convention of the Hugging Face Llama weights.
    """
    inv_freq = rope_frequencies(config, local)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (length, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its angle. x: (B, H, T, D); cos, sin: (B, 1, T, D).

    With x = (x1, x2) its halves and c, s the cos and sin (each half repeats the frequencies):

        y1 = x1 c - x2 s,   y2 = x2 c + x1 s

    written into one output tensor (the same numbers as x * cos + cat(-x2, x1) * sin, which
    makes five tensors). Training takes the backward written out, the rotation by -angle."""
    if fused_ops.rotate_fits(x, cos, sin):  # CPU float32: one pass each way, the same numbers
        return fused_ops.rotate(x, cos, sin)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RopeWithBackward.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    y = x * cos
    y[..., :h].sub_(x[..., h:] * sin[..., :h])
    y[..., h:].add_(x[..., :h] * sin[..., h:])
    return y


class _RopeWithBackward(torch.autograd.Function):
    """apply_rope with its gradient in closed form: dx1 = g1 c + g2 s, dx2 = g2 c - g1 s.
    Fwd + bwd at (2, 16, 256, 128), 2 threads: under half the time of autograd's."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        dx = g * cos
        dx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1)
        return dx, None, None


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """The fixed positions of "Attention Is All You Need", (length, d_model):
    PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


__all__ = ["rope_frequencies", "rope_table", "apply_rope", "sinusoidal_table"]
