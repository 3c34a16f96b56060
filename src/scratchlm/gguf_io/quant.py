"""Kept quantized: a GGUF file's blocks -> decode_weights' int8 / int4 layers, tensor by tensor.

``load_gguf(path, layout="int4")`` gives the model that ``prepare_for_decode`` would make
of the dequantized file, without the float copy: each matrix goes from its blocks (read a
slice of rows at a time) straight into its Int4Linear / Int8Linear. Which types map how::

    GGUF type   a block of 32 weights          int4 layout, group 32 (w = (q - 8) * scale + zero)
    Q4_0        w = d * (q - 8), q in 0..15    scale d, zero 0: the same q            exact
    Q4_1        w = d * q + m,   q in 0..15    scale d, zero m + 8 d: the same q      exact
    Q8_0        w = d * q,       q in -128..127   no 4-bit match: requantized
    others      (Q5_*, K-quants, F16, F32)      dequantized, then requantized

"Exact" is bit for bit: Int4Linear keeps a scale and an offset per group in fp16
(w = scale * q + offset, offset = zero - 8 * scale = m or -8 d), which holds an f16 d and m
exactly (-8 d too: a power of two times an f16).

The int8 layout has one scale per row (torch._weight_int8pack_mm), not one per 32 weights,
so even Q8_0 is requantized: dequantized one slice of rows at a time, rounded to bf16
(what prepare_for_decode's ``model.to(bfloat16)`` does), quantized per row. Requantized
tensors are therefore bit-for-bit what prepare_for_decode gives from the float model.

Row order: llama.cpp's Q and K rows are permuted within each head (arch.unpermute_rows).
A block never crosses rows (blocks run along a row), so permuting whole rows of q, scale
and zero is the same as permuting the rows of the dequantized matrix.
"""

from __future__ import annotations

import torch

from ..decode_weights import Int4Linear, Int8Linear, int4_fits, pack_int4, quantize_int4, quantize_int8
from . import container
from .arch import Slot, unpermute_rows
from .container import GGUFError, GGUFFile, dequantize_rows

EXACT_INT4 = {"Q4_0": 18, "Q4_1": 20}  # type -> bytes per block of 32 (the int4 layout's group 32)
# In a file of 4-bit matrices, those it keeps in 5 bits or more become int8 (keep_8bit).
NARROW = {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"}
WIDE = {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}


def four_bit_file(file: GGUFFile) -> bool:
    """Whether some matrix of the file is in 4 bits or fewer (a llama.cpp "Q4" file)."""
    return any(info.type_name in NARROW for info in file.tensors.values() if len(info.shape) == 2)


def int4_blocks(raw: torch.Tensor, type_name: str, row_len: int):
    """Q4_0 / Q4_1 rows (rows, bytes) uint8 -> q (rows, row_len) int32 in 0..15, scale and
    zero (rows, row_len / 32) float32, with w = (q - 8) * scale + zero.

    A block is d (f16) [, m (f16)], then 16 bytes: byte j holds weight j in its low nibble
    and weight j + 16 in its high one."""
    rows = raw.shape[0]
    blocks = raw.view(rows, row_len // 32, EXACT_INT4[type_name])
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # (rows, n_blocks)
    nibbles = blocks[..., -16:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).to(torch.int32).view(rows, row_len)
    if type_name == "Q4_0":
        return q, d, torch.zeros_like(d)
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    return q, d, m + 8 * d


def _pieces(file: GGUFFile, sources: list[tuple[str, Slot]], layout: str, group_size: int, config):
    """Yield the quantized rows of a layer, slice by slice, in row order: (q, scale, zero) for
    int4, (q, scales) for int8. ``sources``: its GGUF tensors (q, k, v for a stacked qkv_proj)."""
    for name, slot in sources:
        info = file.tensors[name]
        row_len = info.shape[-1]
        # A rotary tensor (q or k: at most d_model rows) is read whole, to unpermute its heads.
        step = info.shape[0] if slot.rotary_heads else max(1, container.SLICE_WEIGHTS // row_len)
        exact = layout == "int4" and group_size == 32 and info.type_name in EXACT_INT4
        for _, raw in file.raw_rows(name, step):
            if exact:
                parts = int4_blocks(torch.from_numpy(raw), info.type_name, row_len)
            else:
                w = dequantize_rows(raw, info).to(torch.bfloat16)  # as prepare_for_decode quantizes
                parts = quantize_int4(w, group_size) if layout == "int4" else quantize_int8(w)
            if slot.rotary_heads:
                heads = getattr(config, slot.rotary_heads)
                parts = tuple(unpermute_rows(t, heads) for t in parts)
            yield parts


def quantized_layer(file: GGUFFile, sources: list[tuple[str, Slot]], shape: tuple[int, int],
                    bias: torch.Tensor | None, layout: str, group_size: int, config, path, keep_8bit: bool = True):
    """The Int4Linear / Int8Linear of weight ``shape`` (out, in) made from ``sources``' blocks.

    int4: a layer with a Q4_0 / Q4_1 source keeps the blocks' group of 32 (its other sources
    are requantized at 32 too); a layer the int4 kernel cannot hold (out not a multiple of
    16) is int8, as in prepare_for_decode; so is, with ``keep_8bit``, a layer stored in 5 bits
    or more (WIDE: a Q8_0 embedding or Q6_K value projections of a Q4 file), the precision
    the file's maker chose for it."""
    out_features, in_features = shape
    rows = sum(file.tensors[name].shape[0] for name, _ in sources)
    for name, _ in sources:
        if len(file.tensors[name].shape) != 2 or file.tensors[name].shape[1] != in_features or rows != out_features:
            raise GGUFError(f"{path}: tensor {name} has shape {file.tensors[name].shape}, but the metadata implies "
                            f"{in_features} inputs and {out_features} outputs in all")
    if layout == "int4" and any(file.tensors[name].type_name in EXACT_INT4 for name, _ in sources):
        group_size = 32
    if keep_8bit and any(file.tensors[name].type_name in WIDE for name, _ in sources):
        layout = "int8"
    if layout == "int4" and int4_fits(out_features, in_features, group_size):
        parts = pack_int4(_pieces(file, sources, "int4", group_size, config), out_features, in_features)
        return Int4Linear(*parts, bias, group_size)
    q = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features)
    start = 0
    for q_rows, row_scales in _pieces(file, sources, "int8", group_size, config):
        q[start:start + len(q_rows)], scales[start:start + len(q_rows)] = q_rows, row_scales
        start += len(q_rows)
    return Int8Linear(q, scales.to(torch.bfloat16), bias)
