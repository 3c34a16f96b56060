"""Weight layouts for fast decoding: transposed fp32, bf16, and int8 weight-only.

Generating one token at a time is memory-bound: every weight matrix is read once per token
and each weight feeds a single multiply-add. Speed is then bytes read / bandwidth, plus
how well the matrix-vector kernel streams those bytes. Three ways to store the weights:

    "fp32"  the same numbers, each Linear stored transposed, (in, out). y = x @ W_t walks
            W_t row by row, adding x[k] * W_t[k, :] into y: contiguous, vectorised reads.
            The (out, in) layout of nn.Linear needs one dot product per output instead,
            which streams ~1.4-1.7x slower on CPU (benchmarks/decode.py).
    "bf16"  half the bytes. Each weight is reordered once into oneDNN's blocked layout
            (PackedBF16Linear): the plain bf16 F.linear re-plans and re-reads its (out, in)
            matrix on every call and is slower than fp32 at batch 1 (benchmarks/decode.py).
            Where the CPU has no native bf16 matmul (AVX512-BF16 or AMX), bf16 emulated in
            fp32 is slower than fp32 itself: prepare_for_decode warns and uses "fp32".
    "int8"  a quarter of the fp32 bytes: w ~= scale[n] * q[n, k] with q in [-127, 127], one
            scale per output row; activations in bf16; torch._weight_int8pack_mm.
    "int4"  an eighth: each group of ``group_size`` (32-128) inputs of a row has its own scale
            and offset, w ~= (q - 8) * scale + zero with q in [0, 15] (gpt-fast's and
            llama.cpp Q4_1's scheme), through PyTorch's tinygemm CPU kernel
            (torch.ops.aten._weight_int4pack_mm_for_cpu), activations in bf16.

    "int8-dynamic"  int8 weights and int8 activations (each row of x quantized on the fly
            to uint8 with its own range; fbgemm's VNNI kernel). Not weight-only: about
            twice the error of "int8" for ~1.4x its speed on CPU.

``prepare_for_decode`` swaps the model's Linear modules in place. The result is for
inference only: its state dict no longer matches a model directory (save the original).
A GGUF file's quantized blocks become these layers without a float model in between
(gguf_io/quant.py builds Int4Linear / Int8Linear from their parts, through ``pack_int4``).

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
>>> ids = torch.tensor([[1, 2, 3]])
>>> before = model(ids)
>>> fast = prepare_for_decode(model, "fp32")  # in place; returns the model
>>> type(fast.blocks[0].mlp.up_proj).__name__, bool(torch.allclose(fast(ids), before, atol=1e-5))
('TransposedLinear', True)
>>> small = prepare_for_decode(Transformer(ModelConfig.preset("gpt-tiny")).eval(), "int8")
>>> type(small.lm_head).__name__, small.tok_emb.weight.dtype
('Int8Linear', torch.bfloat16)
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ScratchLMError

WEIGHTS = ("fp32", "bf16", "int8", "int4", "int8-dynamic")
INT4_GROUP_SIZES = (32, 64, 128)


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX512-BF16 / AMX), not emulated."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class TransposedLinear(nn.Module):
    """y = x @ weight_t + bias, with weight_t (in, out) contiguous: the fast fp32 GEMV layout."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight_t.shape
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TransposedLinear:
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.weight.detach().t().contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TransposedEmbedding(nn.Module):
    """Token lookup from a transposed table (d_model, vocab): a tied output head stored as
    TransposedLinear serves the lookups too, so the matrix is still held once. A lookup
    gathers one strided column per token, which costs nothing next to a matmul."""

    def __init__(self, weight_t: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_t", weight_t)

    @property
    def weight(self) -> torch.Tensor:  # (vocab, d_model) view, for code that reads .weight
        return self.weight_t.t()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_t.t()[ids]  # (..., d_model)


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with one scale per output feature.

    weight_int8 (out, in) int8; scales (out,) and bias in the activation dtype (bf16).
    Rounding to 255 levels per row keeps each weight within 0.4% of the row's largest.
    """

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.to(scales.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        q, scales = quantize_int8(linear.weight.detach())
        return cls(q, scales.to(dtype), None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)  # (M, in)
        if x2.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)  # (M, out), no dequantized copy
        else:  # other devices: dequantize on the fly (correct, not the fast path)
            y = F.linear(x2, self.weight_int8.to(x2.dtype) * self.scales[:, None])
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedBF16Linear(nn.Module):
    """A bf16 Linear whose weight oneDNN has reordered once, ahead of time, into the blocked
    layout its matmul kernel reads (what torch.compile's CPU freezing does); any batch size.

    weight_packed: the (out, in) matrix in oneDNN's opaque layout (CPU only, inference only).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().to(torch.bfloat16)
        self.weight_packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # packed for batch 1
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight_packed, self.bias,
                                                  "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric 8-bit quantization of w (out, in): q (out, in) int8 in [-127, 127]
    and scales (out,) float32 with w ~= scales[:, None] * q; the row's largest |w| maps to 127."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit quantization of w (out, in).

    Returns q (out, in) int32 in [0, 15], scale and zero (out, in / group_size) float32 with
    w ~= (q - 8) * scale + zero: the group's minimum maps to q = 0 and its maximum to 15.
    """
    out_features, in_features = w.shape
    g = w.float().reshape(out_features, in_features // group_size, group_size)
    low, high = g.amin(dim=-1), g.amax(dim=-1)  # (out, groups)
    scale = ((high - low) / 15.0).clamp(min=1e-8)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out_features, in_features), scale, low + 8 * scale


@functools.cache
def int4_pack_rows() -> int:
    """The CPU packing kernel lays rows out in tiles whose height depends on the CPU (32 with
    AVX2, 64 on AVX-512 machines): packing a run of rows that starts at a multiple of the tile
    gives exactly those rows of the whole matrix packed at once. Found once by trying, since
    torch does not say (tests check pieces against the whole)."""
    q = torch.randint(0, 16, (512, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for rows in (32, 64, 128, 256):
        parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i:i + rows].contiguous(), 1)
                 for i in range(0, 512, rows)]
        if torch.equal(torch.cat(parts), whole):
            return rows
    return 1 << 30  # no tiling found: pack the whole matrix at once


def pack_int4(pieces, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_int4, scales_and_zeros) of Int4Linear from ``pieces``: (q, scale, zero) of
    consecutive rows, from the first row on (q (rows, in) int32 in [0, 15], scale and zero
    (rows, groups)). Rows are packed as soon as a multiple of int4_pack_rows() is pending, so a
    big matrix is never held as int32 whole: the peak is the packed matrix plus one piece."""
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)  # two weights a byte
    scales, zeros, pending = [], [], []
    done = filled = 0
    tile = int4_pack_rows()
    for q, scale, zero in pieces:
        scales.append(scale.float())
        zeros.append(zero.float())
        pending.append(q)
        filled += q.shape[0]
        ready = (filled - done) // tile * tile
        if ready or filled == out_features:
            rows = torch.cat(pending) if len(pending) > 1 else pending[0]
            ready = rows.shape[0] if filled == out_features else ready
            packed[done:done + ready] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                rows[:ready].contiguous(), 1)
            pending, done = ([rows[ready:]] if ready < rows.shape[0] else []), done + ready
    if done != out_features:
        raise ValueError(f"pack_int4: pieces gave {filled} rows, expected {out_features}")
    scales_and_zeros = torch.stack([torch.cat(scales), torch.cat(zeros)], dim=-1)  # (out, groups, 2)
    return packed, scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


class Int4Linear(nn.Module):
    """A Linear stored in 4 bits: groups of ``group_size`` weights along each row share a
    scale and a zero point (bf16), packed for the tinygemm CPU kernel.

    weight_int4: the kernel's packed layout of q (out, in) (two weights per byte);
    scales_and_zeros: (in / group_size, out, 2) bf16.
    """

    def __init__(self, weight_int4: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int):
        super().__init__()
        groups, self.out_features, _ = scales_and_zeros.shape
        self.in_features, self.group_size = groups * group_size, group_size
        self.register_buffer("weight_int4", weight_int4)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        if linear.in_features % group_size:
            raise ScratchLMError(f"int4: group size {group_size} does not divide in_features={linear.in_features}")
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        weight_int4, scales_and_zeros = pack_int4([(q, scale, zero)], linear.out_features, linear.in_features)
        return cls(weight_int4, scales_and_zeros, None if linear.bias is None else linear.bias.detach(), group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, in); the kernel needs rows packed
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class DynamicInt8Linear(nn.Module):
    """int8 weights (one scale per output row) times activations quantized to 8 bits on the
    fly, accumulated in int32 by PyTorch's quantized CPU engine; fp32 in and out."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if "fbgemm" not in torch.backends.quantized.supported_engines and \
                "x86" not in torch.backends.quantized.supported_engines:
            raise ScratchLMError("int8-dynamic needs PyTorch's x86/fbgemm quantized engine; use 'int8'")
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():  # torch.ao's eager API is deprecated; these core ops are not
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scales.double(), torch.zeros(w.shape[0], dtype=torch.long), 0,
                                           torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, bias)  # the engine's blocked layout
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed, True)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An nn.Linear (no bias) holding ``weight`` (out, in), e.g. one expert's slice."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """The int4 CPU packing needs whole groups along each row and outputs in tiles of 16."""
    return in_features % group_size == 0 and out_features % 16 == 0


def prepare_for_decode(model: nn.Module, weights: str = "fp32", group_size: int = 64) -> nn.Module:
    """Store ``model``'s weights the fast way for decoding (one of WEIGHTS), in
    place. Only the Transformer's own Linear layers are swapped (merge LoRA adapters first).

    A mixture-of-experts layer (moe.py) has its router swapped like any Linear, and each
    expert's stacked matrices (gate_up_proj[e], down_proj[e]) become two layers of the layout.

    group_size: inputs per scale for "int4" (one of INT4_GROUP_SIZES); a layer whose input
    size it does not divide, or whose output size is not a multiple of 16 (the packing
    kernel's tile), keeps int8 weights.
    """
    from .model import MLP, Attention, Transformer
    from .moe import MoE

    if weights not in WEIGHTS:
        raise ScratchLMError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ScratchLMError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    packed_bf16 = weights == "bf16" and on_cpu and cpu_has_native_bf16()
    if weights == "bf16" and on_cpu and not packed_bf16:
        warnings.warn("this CPU has no native bf16 matmul (AVX512-BF16 or AMX): bf16 would decode "
                      "slower than fp32, so the fp32 layout is used", stacklevel=2)
        weights = "fp32"
    if weights == "int4" and not on_cpu:
        raise ScratchLMError("int4 weights use PyTorch's CPU int4 kernel: move the model to the CPU first")
    dtype = torch.float32 if weights in ("fp32", "int8-dynamic") else torch.bfloat16
    tied = isinstance(model, Transformer) and model.lm_head.weight is model.tok_emb.weight
    if weights == "fp32" and tied:  # one transposed table serves the head and the lookups
        table_t = model.tok_emb.weight.detach().to(dtype).t().contiguous()  # (d_model, vocab)
        model.lm_head = TransposedLinear(table_t, None)
        model.tok_emb = TransposedEmbedding(table_t)
    model.to(dtype)

    def swap(linear: nn.Linear) -> nn.Module:
        if weights == "fp32":
            return TransposedLinear.from_linear(linear)
        if weights == "bf16" and packed_bf16:
            return PackedBF16Linear(linear)
        if weights == "int8" or (weights == "int4" and not int4_fits(linear.out_features, linear.in_features, group_size)):
            return Int8Linear.from_linear(linear, dtype)
        if weights == "int4":
            return Int4Linear.from_linear(linear, group_size)
        if weights == "int8-dynamic":
            return DynamicInt8Linear(linear)
        return linear

    for module in list(model.modules()):
        if not isinstance(module, (Attention, MLP, MoE, Transformer)):
            continue
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, swap(child))
        if isinstance(module, MoE):  # each expert's two matrices become layers of the layout
            module.set_expert_layers([[swap(_linear(w)) for w in pair]
                                      for pair in zip(module.gate_up_proj.detach(), module.down_proj.detach())])
    model.requires_grad_(False)
    if hasattr(model, "config"):
        model.config = model.config.replace(dtype="float32" if dtype == torch.float32 else "bfloat16")
    return model
