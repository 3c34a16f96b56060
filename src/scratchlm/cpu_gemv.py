"""Our own CPU matrix-vector kernels for decoding (csrc/gemv.cpp), compiled on first use.

Decoding one token reads every weight once, so a step's speed is how fast the weight
kernels stream memory. At 1-8 rows of x, PyTorch's CPU kernels (MKL's GEMV, oneDNN, and
``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``) reach a fraction of the read
bandwidth that llama.cpp's hand-written dot products do (benchmarks/decode.py; kernel against
kernel: benchmarks/decode_kernels.py). gemv.cpp is
the plain version of those: each output is one dot product over a contiguous weight row, in
fp32 accumulators, for fp32, bf16, int8 (one scale per row) and int4 (an fp16 scale and offset
per group of 32-128 inputs) weights.

The C++ file is built once per machine with torch.utils.cpp_extension (``-O3 -march=native``:
AVX-512 where the CPU has it; ~1 minute; cached under torch's extension directory, e.g.
``~/.cache/torch_extensions``). Where no compiler is found, or ``SCRATCHLM_NO_GEMV=1``,
``kernels()`` is None and decode_weights falls back to PyTorch's kernels.

The ops are registered with torch.library, so ``torch.compile`` sees them as single ops
(with shapes from the fake implementations below) rather than breaking the graph.

>>> import torch
>>> if kernels() is not None:
...     w, x = torch.randn(48, 64), torch.randn(2, 64)
...     assert torch.allclose(linear(x, w), x @ w.T, atol=1e-4)
"""

from __future__ import annotations

import torch

from .extension import build

# Rows of x up to which the kernels beat the alternative: 8 a pass over the weights, so for
# bf16 (oneDNN's matmul, AMX where there is one) a prompt is F.linear's; for int8 and int4 two
# passes still beat the matrix dequantized to bf16 (``dequantize``) for oneDNN's matmul, which
# wins from ~16 rows on (measured per smollm2-135m matrix: 0.2-0.5 against 0.4-0.8 ms at 32 rows).
MAX_ROWS = 8
MAX_ROWS_QUANTIZED = 16
# fp32 on the transposed (in, out) layout: MKL's GEMV at one row (our kernel's equal), ours
# (linear_transposed) at 2-8 rows, where MKL's product costs 1.5-1.8x its one-row time.
TRANSPOSED_ROWS = 8  # decode_ops.cpp's too
SOURCES = ["gemv.cpp", "decode_ops.cpp"]  # in csrc/


_built: dict = {}  # "module": the extension, or None where it cannot be built; set on first use


def kernels():
    """The compiled extension module, or None where it cannot be built (warned once).

    A plain dict, not functools.cache: torch.compile reads it as a constant once it is set,
    where it would trace into a cached function (prepare_for_decode builds it up front)."""
    if "module" not in _built:
        _built["module"] = _build()
    return _built["module"]


def _build():
    return build("scratchlm_gemv", SOURCES, "the CPU decode kernels", "SCRATCHLM_NO_GEMV")


def fits(x: torch.Tensor, in_features: int, max_rows: int = MAX_ROWS) -> bool:
    """Whether x (..., in_features) goes through the kernels: CPU, 1 to max_rows rows, whole
    vectors (int4 also needs in_features a multiple of 64: decode_weights.int4_fits)."""
    rows = x.numel() // in_features if in_features else 0
    return (x.device.type == "cpu" and 1 <= rows <= max_rows and in_features % 16 == 0
            and kernels() is not None)


@torch.library.custom_op("scratchlm::gemv", mutates_args=())
def _gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return kernels().linear(x, weight, scale)


@_gemv.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("scratchlm::gemv_int4", mutates_args=())
def _gemv_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
               group_size: int) -> torch.Tensor:
    return kernels().linear_int4(x, q, scale, offset, group_size)


@_gemv_int4.register_fake
def _(x, q, scale, offset, group_size):
    return x.new_empty(x.shape[0], q.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) fp32 or bf16 @ weight.T, weight (out, in) fp32, bf16 or int8, times scale
    (out,) fp32 per output when given -> (M, out) in x's dtype."""
    if torch.compiler.is_compiling():  # the registered op: one node of the graph
        return _gemv(x, weight, scale)
    return kernels().linear(x, weight, scale)  # eager: straight in (the op's dispatch costs ~25 us a call)


@torch.library.custom_op("scratchlm::gemv_transposed", mutates_args=())
def _gemv_transposed(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return kernels().linear_transposed(x, weight_t, bias)


@_gemv_transposed.register_fake
def _(x, weight_t, bias):
    return x.new_empty(x.shape[0], weight_t.shape[1])


def transposed_fits(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether x (..., in) @ weight_t (in, out) goes through linear_transposed: CPU, fp32, 2 to
    TRANSPOSED_ROWS rows, out a multiple of 16."""
    in_features, out_features = weight_t.shape
    rows = x.numel() // in_features if in_features else 0
    return (x.device.type == "cpu" and 2 <= rows <= TRANSPOSED_ROWS and out_features % 16 == 0
            and x.dtype == weight_t.dtype == torch.float32 and kernels() is not None)


def linear_transposed(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) fp32 @ weight_t (in, out) fp32 (+ bias (out,)) -> (M, out): M x J outputs at a
    time in registers, each weight row of the tile read once for all M rows of x."""
    if torch.compiler.is_compiling():
        return _gemv_transposed(x, weight_t, bias)
    return kernels().linear_transposed(x, weight_t, bias)


def linear_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (M, in) @ W.T with W[n, k] = scale[n, g] * q[n, k] + offset[n, g], g = k // group_size;
    q packed two a byte in tiles of 16 rows (``pack_nibbles``), scale and offset fp16 in the
    tiles' order (``tile_groups``) -> (M, out) in x's dtype."""
    if torch.compiler.is_compiling():
        return _gemv_int4(x, q, scale, offset, group_size)
    return kernels().linear_int4(x, q, scale, offset, group_size)


TILE = 16  # output rows of an int4 tile (gemv.cpp): out_features must be a multiple


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (out, in) integers in [0, 15], out a multiple of 16 and in of 64 -> (out, in / 2) uint8
    in the kernel's tiles of 16 rows: for tile t, run c of 64 inputs and step j < 8, 64 bytes
    hold row 16t + l's inputs 64c + 4j + b (b < 4) at byte 4l + b, in the low nibble, and its
    inputs 64c + 32 + 4j + b in the high one. One 64-byte load is then 4 weights of each of
    the tile's 16 rows, one vector lane a row (gemv.cpp's header)."""
    out_features, in_features = q.shape
    v = q.to(torch.uint8).reshape(out_features // TILE, TILE, in_features // 64, 2, 8, 4)  # t, l, c, half, j, b
    packed = v[:, :, :, 0] | (v[:, :, :, 1] << 4)  # (t, l, c, j, b)
    return packed.permute(0, 2, 3, 1, 4).reshape(out_features, in_features // 2)  # (t, c, j, l, b)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: (out, in / 2) uint8 -> (out, in) uint8 in [0, 15]."""
    out_features, half = packed.shape
    v = packed.reshape(out_features // TILE, half // 32, 8, TILE, 4).permute(0, 3, 1, 2, 4)  # t, l, c, j, b
    return torch.stack([v & 15, v >> 4], dim=3).reshape(out_features, 2 * half)  # (t, l, c, half, j, b)


def tile_groups(a: torch.Tensor) -> torch.Tensor:
    """Per-group numbers (out, groups) of int4 scales or offsets -> the kernel's order, the 16
    rows of a tile side by side for each group (same shape)."""
    out_features, groups = a.shape
    return a.reshape(out_features // TILE, TILE, groups).transpose(1, 2).reshape(out_features, groups)


def untile_groups(a: torch.Tensor) -> torch.Tensor:
    """The inverse of tile_groups: (out, groups) in row order."""
    out_features, groups = a.shape
    return a.reshape(out_features // TILE, groups, TILE).transpose(1, 2).reshape(out_features, groups)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
               group_size: int = 0) -> torch.Tensor:
    """The bf16 (out, in) matrix of int8 weights q (out, in) times scale (out,) fp32, or of int4
    weights packed as ``pack_nibbles`` with fp16 scale and offset (out, in / group_size) in
    ``tile_groups`` order."""
    return kernels().dequantize(q, scale, offset, group_size)
