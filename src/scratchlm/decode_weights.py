"""Weight layouts for fast decoding: transposed fp32, bf16, int8 and int4 weight-only.

Generating one token at a time is memory-bound: every weight matrix is read once per token
and each weight feeds a single multiply-add. Speed is then bytes read / bandwidth, plus
how well the matrix-vector kernel streams those bytes. The ways to store the weights:

    "fp32"  the same numbers, each Linear stored transposed, (in, out). y = x @ W_t walks
            W_t row by row, adding x[k] * W_t[k, :] into y: contiguous, vectorised reads.
            The (out, in) layout of nn.Linear needs one dot product per output instead,
            which streams ~1.4-1.7x slower on CPU (benchmarks/decode.py). At 2-8 rows of x
            (a batch, a speculative verify pass) MKL's product costs 1.5-1.8x its one-row
            time; ours (cpu_gemv.linear_transposed) reads each weight once for all the rows.
    "bf16"  half the bytes (BF16Linear).
    "int8"  a quarter of the fp32 bytes: w ~= scale[n] * q[n, k] with q in [-127, 127], one
            scale per output row (Int8Linear).
    "int4"  an eighth: each group of ``group_size`` (32-128) inputs of a row has its own scale
            and offset, w ~= scale * q + offset with q in [0, 15] (gpt-fast's and llama.cpp
            Q4_1's scheme; Int4Linear).

    bf16, int8 and int4 decode through our own CPU kernels (cpu_gemv.py, csrc/gemv.cpp): a
    dot product per weight row, streamed front to back, with the CPU's bf16 and 16-bit integer
    dot-product instructions where it has them. Per matrix at one row of x, against PyTorch's
    kernels on the same weights (benchmarks/decode_kernels.py, one 2-core Sapphire Rapids
    machine): bf16 ~2.3x oneDNN's F.linear, int8 ~1.6x torch._weight_int8pack_mm, int4 ~1.1x
    torch's int4 kernel. Up to ``kernel_rows`` rows of x go through the kernels; a longer
    prompt multiplies the matrix dequantized to bf16 for the call (our ``cpu_gemv.dequantize``)
    with oneDNN's bf16 matmul, AMX where the CPU has it (widened to fp32 where it has no
    native bf16). Where the kernels cannot be built (no C++ compiler), PyTorch's kernels serve
    decoding too.

    The activations between the matrices (and the norms, the embeddings, the cache) are bf16,
    except for "bf16" on a CPU without native bf16: fp32 there, since our kernel widens x to
    fp32 anyway and PyTorch's emulated bf16 ops are slower than its fp32 ones.

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

from . import cpu_gemv
from .errors import ScratchLMError
from .sampling import SamplingOptions, sample_next

WEIGHTS = ("fp32", "bf16", "int8", "int4", "int8-dynamic")
INT4_GROUP_SIZES = (32, 64, 128)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 / AMX) and oneDNN uses them.

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` alone: that is also True on AVX-512
    CPUs without them (an Ice Lake server), where oneDNN emulates bf16 matmuls at ~0.3x the
    speed of fp32 ones (512 x 576 by 576 x 1536 here: 15.2 against 4.6 ms)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(check is None for check in checks):  # a torch without the probes: trust oneDNN's answer
        return True
    return any(check() for check in checks)


def kernel_rows(weights: str) -> int:
    """Rows of x up to which a "bf16", "int8" or "int4" layer multiplies through our kernel (in
    passes of 8 rows over the weights) rather than ``prompt_linear``'s matmul on the whole matrix.

    Where the CPU has native bf16, oneDNN's bf16 matmul wins from ~8 rows (bf16) and ~16 rows
    (int8, int4: the matrix dequantized to bf16 first). Without it the prompt path widens the
    matrix to fp32 for MKL (allocating, and faulting in, a float copy of every matrix each
    call), and the kernel stays ahead much longer: all of smollm2-135m's matrices on an Ice Lake
    server, 2 threads, kernel against prompt path, bf16 32 rows 137 against 174-260 ms, 48 rows
    197 / 185; int8 64 rows 129-136 / 160-166, 128 rows 292 / 240; int4 64 rows 126-143 /
    217-297, 128 rows 335 / 402. int4 stops at 64 all the same: its kernel takes x in 15 bits a
    run of 64 inputs, coarser than bf16 next to a massive activation, and a long prompt is where
    that precision shows (SmolLM2-Instruct from its GGUF, three chats as one 114-row batch: a
    first token 0.08 from a tie flipped; tests/test_gguf_quant.py)."""
    if cpu_has_native_bf16():
        return cpu_gemv.MAX_ROWS if weights == "bf16" else cpu_gemv.MAX_ROWS_QUANTIZED
    return {"bf16": 32, "int8": 64, "int4": 64}[weights]


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
        b = self._buffers  # as a dict: see Int8Linear.forward
        weight_t, bias = b["weight_t"], b["bias"]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if cpu_gemv.transposed_fits(x2, weight_t):  # 2-8 rows: ours, 1.2-1.3x MKL's product there
            y = cpu_gemv.linear_transposed(x2, weight_t, bias)
        else:  # one row (MKL's GEMV, ours's equal) or a prompt
            y = x2 @ weight_t if bias is None else torch.addmm(bias, x2, weight_t)
        return y.view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The outputs ``ids`` only: x (N, in) -> (N, len(ids)) (HeadScreen's exact check)."""
        b = self._buffers
        ops = cpu_gemv.kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        if ops is not None:  # 16 columns a gather instruction, the next rows' lines prefetched
            y = ops.columns_transposed(x, b["weight_t"], ids)
        else:
            y = x @ b["weight_t"].index_select(1, ids)  # a strided gather of a few columns
        return y if b["bias"] is None else y + b["bias"][ids]

    def decode_spec(self) -> tuple:
        """This layer as decode_ops.cpp's FusedBlock runs it (its Projection's fields)."""
        b = self._buffers
        return 2, b["weight_t"], None, None, b["bias"], 0, 0

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
        self.scales_fp32 = scales.float()  # the kernel's copy (N floats), not state
        self.kernel_rows = kernel_rows("int8")  # asked once: a plain int for torch.compile

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        q, scales = quantize_int8(linear.weight.detach())
        return cls(q, scales.to(dtype), None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # read as a dict: nn.Module.__getattr__ costs ~1 us a buffer, at ~150 calls a step
        weight, scales, bias = b["weight_int8"], b["scales"], b["bias"]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if x2.dtype != scales.dtype:
            x2 = x2.to(scales.dtype)
        if cpu_gemv.fits(x2, self.in_features, self.kernel_rows):  # decoding, short prompts: our kernel (cpu_gemv.py)
            y = cpu_gemv.linear(x2, weight, self.scales_fp32)
        elif _dequantizes(x2):  # a prompt: the matrix in bf16 for this call
            y = prompt_linear(x2, cpu_gemv.dequantize(weight, self.scales_fp32))
        elif x2.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x2, weight, scales)  # (M, out), no dequantized copy
        else:  # other devices: dequantize on the fly (correct, not the fast path)
            y = F.linear(x2, weight.to(x2.dtype) * scales[:, None])
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], self.out_features)

    def decode_spec(self) -> tuple | None:
        """This layer as decode_ops.cpp's FusedBlock runs it (a step of 1-8 rows: our kernel)."""
        b = self._buffers
        cast = {torch.bfloat16: 1, torch.float32: 2}.get(b["scales"].dtype)
        return None if cast is None else (0, b["weight_int8"], self.scales_fp32, None, b["bias"], 0, cast)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _dequantizes(x: torch.Tensor) -> bool:
    """Whether a prompt x goes to an int8 matrix dequantized to bf16 for the call: on a CPU with
    our kernels (which dequantize it)."""
    return (x.device.type == "cpu" and x.shape[-1] % 64 == 0
            and cpu_gemv.kernels() is not None)  # the dequantizer's unit: runs of 64 inputs


def prompt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, in) times a bf16 weight (out, in), plus bias, for a prompt (more rows than our kernels take):
    oneDNN's bf16 matmul where the CPU has native bf16 (AVX512-BF16, AMX); elsewhere on a CPU
    the same bf16 numbers widened to fp32 for the call and MKL's fp32 matmul, since emulated bf16
    matmuls are slower than fp32 ones (a 512-token prompt of smollm2-135m on an Ice Lake server:
    213 tokens/s in bf16 against 596 in fp32). Out in x's dtype."""
    if x.device.type == "cpu" and not cpu_has_native_bf16():
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)


class BF16Linear(nn.Module):
    """A Linear with its (out, in) weight in bf16: half the bytes of fp32 to read per token.

    Decoding and short prompts (up to ``kernel_rows("bf16")`` rows of x) go through our kernel
    (cpu_gemv.py): vdpbf16ps where the CPU has AVX512-BF16, else each bf16 weight widened to
    fp32 as it is streamed, so no native bf16 matmul is needed; more rows go to prompt_linear:
    oneDNN's bf16 matmul, or the matrix widened to fp32 for the call where the CPU lacks native
    bf16. x and y are in ``dtype`` (bf16, or fp32: prepare_for_decode's choice).
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        # x and y's dtype (bf16, or fp32 where the CPU lacks native bf16: prepare_for_decode) as an
        # empty buffer, not state: model.to(dtype) moves it with the norms and the embeddings.
        self.register_buffer("activations", torch.empty(0, dtype=dtype), persistent=False)
        self.kernel_rows = kernel_rows("bf16")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # as a dict: see Int8Linear.forward
        weight, bias, dtype = b["weight"], b["bias"], b["activations"].dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        if cpu_gemv.fits(x, self.in_features, self.kernel_rows):
            y = cpu_gemv.linear(x.reshape(-1, self.in_features), weight)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return prompt_linear(x.reshape(-1, self.in_features), weight, bias).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The outputs ``ids`` only, x (N, in) -> (N, len(ids)), in fp32 rounded to the layer's dtype
        as its kernel's are (HeadScreen's exact check)."""
        b = self._buffers
        y = x.float() @ b["weight"].index_select(0, ids).float().t()
        if b["bias"] is not None:
            y = y + b["bias"][ids].float()
        return y.to(b["activations"].dtype)

    def decode_spec(self) -> tuple:
        """This layer as decode_ops.cpp's FusedBlock runs it (a step of 1-8 rows: our kernel)."""
        b = self._buffers
        return 0, b["weight"], None, None, b["bias"], 0, 1 if b["activations"].dtype == torch.bfloat16 else 2

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations={str(self.activations.dtype).removeprefix('torch.')}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric 8-bit quantization of w (out, in): q (out, in) int8 in [-127, 127]
    and scales (out,) float32 with w ~= scales[:, None] * q; the row's largest |w| maps to 127."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class HeadScreen(nn.Module):
    """The greedy token of an output head, found from an int8 copy of the head instead of all of it.

    Greedy decoding needs one thing from the head W (vocab, d): the row with the largest
    W[i] . x, not every logit. The head is the largest matrix of a small model (SmolLM2-135M:
    113 of 538 MB a token in fp32; GPT-2: 154 of 498), and its int8 copy (quantize_int8, one
    scale a row) is a quarter of it. That copy gives each logit to within a bound b_i known in
    advance up to a few numbers of x (below): a row whose approx_i + b_i is under the best
    approx_j - b_j cannot be the largest, so only the rows left (on SmolLM2-135M-Instruct's real
    weights 3 at the median, 63 at most over 120 steps) are computed again from the exact
    weights. The result is the exact head's argmax; only ties closer than fp32 rounding could
    go either way, as between any two kernels.

    The bound on |exact_i - approx_i|, with d = W - s q the rounding of the copy (known here),
    n1 = |x|_1, n2 = |x|_2:
      the copy's rounding    |d_i . x| <= min(max|d_i| n1, |d_i|_2 n2)
      the kernel's x         s_i |q_i . (x - x')| <= s_i |q_i|_2 |x - x'|_2 (gemv.cpp rounds each
                             run of 64 inputs of x to 16-bit integers, x'; screen_int8 redoes it)
      fp32 sums, both sides  <= (d + d/64 + 2) 2^-24 127 s_i n1
    each coefficient with 1% to spare.

    >>> w = torch.randn(1000, 64)
    >>> x = torch.randn(3, 64)
    >>> keep = HeadScreen(w).candidates(x, len(w))
    >>> bool(torch.isin((x @ w.t()).argmax(-1), keep).all()), len(keep) < 20
    (True, True)
    """

    def __init__(self, weight: torch.Tensor, output_dtype: torch.dtype = torch.float32, chunk: int = 8192):
        super().__init__()
        vocab, d = weight.shape
        # bf16 logits tie where they round alike: the rows that may round to the largest stay.
        self.output_rounding = 2.0 ** -8 if output_dtype == torch.bfloat16 else 0.0
        self.max_keep = 256  # more rows left than this: the whole head is cheaper
        q, scales = quantize_int8(weight)
        q = q.contiguous()  # (a transposed table's rows come out strided)
        # The copy's rounding per row, in float64 and a few thousand rows at a time (a large
        # vocabulary's float64 copy would be ~1 GB).
        worst, l2 = torch.empty(vocab, dtype=torch.float64), torch.empty(vocab, dtype=torch.float64)
        q_l2 = torch.empty(vocab, dtype=torch.float64)
        for start in range(0, vocab, chunk):
            rows = slice(start, start + chunk)
            q64 = q[rows].double()
            rounding = weight[rows].double() - scales[rows].double()[:, None] * q64
            worst[rows], l2[rows], q_l2[rows] = rounding.abs().amax(1), rounding.norm(dim=1), q64.norm(dim=1)
        s = scales.double()
        sums = (d + d / 64 + 2) * 2.0 ** -24 * 127 * s
        self.register_buffer("weight_int8", q, persistent=False)  # derived from the head: not state
        self.register_buffer("scales", scales.float(), persistent=False)
        self.register_buffer("per_n1", (worst * 1.01).float(), persistent=False)
        self.register_buffer("per_n2", (l2 * 1.01).float(), persistent=False)
        self.register_buffer("per_x_rounding", (s * q_l2 * 1.01).float(), persistent=False)
        self.register_buffer("per_n1_sums", (sums * 1.01).float(), persistent=False)

    def candidates(self, x: torch.Tensor, limit: int, top: int = 1) -> torch.Tensor | None:
        """Ids (sorted) among the first ``limit`` rows that may hold the largest logit of some
        row of x (N, d), or with ``top`` = k one of its k largest (top-k sampling: the floor is
        then the k-th largest lower bound, which k rows' exact logits reach); None where the
        screen cannot tell (a NaN in x, or over max(256, 8 k) rows left)."""
        b = self._buffers  # as a dict: see Int8Linear.forward
        x = x.float().contiguous()
        ops = cpu_gemv.kernels()
        max_keep = max(self.max_keep, 8 * top)
        if ops is not None:  # the same as below in one call (gemv.cpp screen_int8)
            keep = ops.screen_int8(x, b["weight_int8"], b["scales"], b["per_n1"], b["per_n2"], b["per_x_rounding"],
                                   b["per_n1_sums"], limit, self.output_rounding, max_keep, top)
            return keep if len(keep) else None
        approx = (x @ b["weight_int8"][:limit].float().t()) * b["scales"][:limit]  # (N, limit)
        n1 = x.abs().sum(-1, keepdim=True)  # (N, 1)
        n2 = x.norm(dim=-1, keepdim=True)
        bound = torch.minimum(b["per_n1"][:limit] * n1, b["per_n2"][:limit] * n2)
        bound += b["per_n1_sums"][:limit] * n1  # (x is not rounded here)
        bound += approx.abs() * 1e-6  # the rounding of these sums themselves
        lower = (approx - bound).nan_to_num(nan=float("-inf"))
        floor = lower.topk(top, dim=-1).values[:, -1:]  # (N, 1): `top` rows' exact logits reach it
        floor -= floor.abs() * self.output_rounding
        keep = (approx + bound >= floor).any(0).nonzero()[:, 0]  # NaN compares False: none kept
        return keep if 0 < len(keep) <= max_keep else None


def greedy_ids(head: nn.Module, x: torch.Tensor, limit: int | None = None) -> torch.Tensor | None:
    """argmax over the first ``limit`` logits of ``head(x)``, x (N, d) -> ids (N,), through the
    head's HeadScreen: the exact logits of the few rows it leaves. None where the head has no
    screen or it cannot tell: then compute all logits."""
    screen = getattr(head, "screen", None)
    if screen is None or x.device.type != "cpu" or cpu_gemv.kernels() is None:
        return None
    keep = screen.candidates(x, head.out_features if limit is None else limit)
    if keep is None:
        return None
    return keep[head.rows(x, keep).float().argmax(-1)]  # ties: the lowest id, as torch.argmax


TOP_K_SCREENED = 64  # top_logits' largest k: at 50, SmolLM2's real head leaves ~224 rows (1 ms to check)


def top_logits(head: nn.Module, x: torch.Tensor, k: int, limit: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The k largest of the first ``limit`` logits of ``head(x)`` through the head's screen, as
    torch.topk gives them: (values (N, k) descending, in the head's output dtype; ids (N, k)).
    None where the head has no screen or it cannot tell, and for k over TOP_K_SCREENED (the
    rows left, ~4k, would cost more to check than the whole head) or not under ``limit`` (then
    sample_next draws over the vocabulary in id order, not from a sorted top-k). Top-k sampling
    needs only these."""
    screen = getattr(head, "screen", None)
    limit = head.out_features if limit is None else limit
    if (screen is None or x.device.type != "cpu" or cpu_gemv.kernels() is None
            or not 1 <= k <= min(TOP_K_SCREENED, limit - 1)):
        return None
    keep = screen.candidates(x, limit, k)
    if keep is None or len(keep) < k:
        return None
    values, at = torch.topk(head.rows(x, keep), k, dim=-1)
    return values, keep[at]


def sampled_top_k_ids(head: nn.Module, x: torch.Tensor, options: SamplingOptions,
                      generator: torch.Generator | None = None, limit: int | None = None) -> torch.Tensor | None:
    """Top-k sampling (options.top_k, then its temperature, top-p and min-p) of one id per row
    of x (N, d) -> (N,), from the k logits ``top_logits`` gives: sorted as sample_next's own
    torch.topk sorts them, so a seed draws what it would from the whole head. None where
    top_logits is."""
    top = top_logits(head, x, options.top_k, limit)
    if top is None:
        return None
    values, ids = top  # (N, k) each
    return ids.gather(-1, sample_next(values, options, generator)[:, None]).squeeze(-1)


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


def pack_int4(pieces, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight_int4, scales, offsets) of Int4Linear from ``pieces``: (q, scale, zero) of
    consecutive rows, from the first row on (q (rows, in) in [0, 15], scale and zero
    (rows, groups), w = (q - 8) * scale + zero). Pieces of any size: each is packed as it
    comes, in whole tiles of 16 rows (the rows left over wait for the next piece), so a big
    matrix is never held unpacked whole."""
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8)  # two weights a byte
    parts, done, rows, waiting = [], 0, 0, None  # waiting: (q, scale, offset) rows short of a whole tile
    for q, scale, zero in pieces:
        rows += q.shape[0]
        if rows > out_features:
            break
        piece = (q.to(torch.uint8), scale.float(), zero.float() - 8 * scale.float())  # w = scale * q + offset
        if waiting is not None:
            piece = tuple(torch.cat([w, p]) for w, p in zip(waiting, piece))
        whole = piece[0].shape[0] // cpu_gemv.TILE * cpu_gemv.TILE
        waiting = tuple(t[whole:] for t in piece) if whole < piece[0].shape[0] else None
        if whole:
            packed[done:done + whole] = cpu_gemv.pack_nibbles(piece[0][:whole])
            parts.append(tuple(cpu_gemv.tile_groups(t[:whole].half().view(torch.int16)) for t in piece[1:]))
            done += whole
    if done != out_features:
        raise ValueError(f"pack_int4: pieces gave {rows} rows, expected {out_features} (a multiple of {cpu_gemv.TILE})")
    return packed, torch.cat([p[0] for p in parts]).contiguous(), torch.cat([p[1] for p in parts]).contiguous()


class Int4Linear(nn.Module):
    """A Linear stored in 4 bits: groups of ``group_size`` weights along each row share a
    scale and an offset, w = scale * q + offset with q in [0, 15] (fp16 scales and offsets:
    a GGUF file's Q4_0 / Q4_1 blocks, whose d and m are f16, are held exactly).

    weight_int4: (out, in / 2) uint8, two q a byte in tiles of 16 rows (cpu_gemv.pack_nibbles);
    scales, offsets: (out, in / group_size) in the tiles' order (cpu_gemv.tile_groups), fp16
    numbers held as int16 bits, so that ``model.to(dtype)`` (which converts floating-point
    tensors only) leaves them exact.

    Up to ``kernel_rows("int4")`` rows of x (decoding, a short prompt) go through our kernel, which unpacks the
    nibbles as it streams them; more rows, or a machine where the kernel is not built,
    multiply by the matrix dequantized (bf16, or fp32 for fp32 x) for that call.
    """

    def __init__(self, weight_int4: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                 bias: torch.Tensor | None, group_size: int):
        super().__init__()
        self.out_features, groups = scales.shape
        self.in_features, self.group_size = groups * group_size, group_size
        self.register_buffer("weight_int4", weight_int4)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        self.kernel_rows = kernel_rows("int4")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        if not int4_fits(linear.out_features, linear.in_features, group_size):
            raise ScratchLMError(f"int4: group size {group_size} does not divide in_features={linear.in_features}, "
                                 f"in_features is not a multiple of 64, or out_features={linear.out_features} "
                                 f"is not a multiple of {cpu_gemv.TILE}")
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        parts = pack_int4([(q, scale, zero)], linear.out_features, linear.in_features)
        return cls(*parts, None if linear.bias is None else linear.bias.detach(), group_size)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (out, in) matrix the layer multiplies by."""
        if dtype == torch.bfloat16 and self.weight_int4.device.type == "cpu" and cpu_gemv.kernels() is not None:
            return cpu_gemv.dequantize(self.weight_int4, self.scales, self.offsets, self.group_size)  # the same numbers
        q = cpu_gemv.unpack_nibbles(self.weight_int4).view(self.out_features, -1, self.group_size)
        scale, offset = (cpu_gemv.untile_groups(t).view(torch.float16).float() for t in (self.scales, self.offsets))
        w = q.float() * scale[..., None] + offset[..., None]  # (out, groups, group_size)
        return w.view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # as a dict: see Int8Linear.forward
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if cpu_gemv.fits(x2, self.in_features, self.kernel_rows):  # any float x: fp32 sums
            y = cpu_gemv.linear_int4(x2, b["weight_int4"], b["scales"], b["offsets"], self.group_size)
        elif x2.dtype == torch.float32:
            y = F.linear(x2, self.dequantized(torch.float32))
        else:
            y = prompt_linear(x2.to(torch.bfloat16), self.dequantized(torch.bfloat16))
        if b["bias"] is not None:
            y = y + b["bias"]
        return y.view(*x.shape[:-1], self.out_features)

    def decode_spec(self) -> tuple:
        """This layer as decode_ops.cpp's FusedBlock runs it (a step of 1-8 rows: our kernel)."""
        b = self._buffers
        return 1, b["weight_int4"], b["scales"], b["offsets"], b["bias"], self.group_size, 0

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
    """The int4 layout needs whole groups along each row, whole runs of 64 inputs and whole
    tiles of 16 rows (the packing's and the kernel's units, cpu_gemv.pack_nibbles)."""
    return (in_features % group_size == 0 and in_features % 64 == 0 and group_size % 32 == 0
            and out_features % cpu_gemv.TILE == 0)


def prepare_for_decode(model: nn.Module, weights: str = "fp32", group_size: int = 64,
                       fused: bool | None = None, screen_head: bool = True) -> nn.Module:
    """Store ``model``'s weights the fast way for decoding (one of WEIGHTS), in
    place. Only the Transformer's own Linear layers are swapped (merge LoRA adapters first).

    A mixture-of-experts layer (moe.py) has its router swapped like any Linear, and each
    expert's stacked matrices (gate_up_proj[e], down_proj[e]) become two layers of the layout.

    group_size: inputs per scale for "int4" (one of INT4_GROUP_SIZES); a layer whose input
    size it does not divide, or whose output size is not a multiple of 16 (the packing
    kernel's tile), keeps int8 weights.

    fused: run one-token steps through decode_block.DecodeBlock (the small ops between the
    matrices fused in C++: 1.4-1.8x a step of smollm2-135m). None: on the CPU. That builds our
    kernels the first time on a machine (about a minute, cached after; a line on stderr says
    so); where they cannot be built, the model's own Block runs.

    screen_head: give an fp32 or bf16 output head a HeadScreen (on the CPU, with our kernels),
    through which greedy decoding reads an int8 copy of the head instead of the whole of it
    and gets the same tokens (generate.py; a quarter of the head's fp32 bytes more in memory).
    """
    from .model import MLP, Attention, Transformer
    from .moe import MoE

    if weights not in WEIGHTS:
        raise ScratchLMError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise ScratchLMError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and (fused is not False or weights in ("bf16", "int8", "int4")):
        cpu_gemv.kernels()  # built (once per machine) or found now, not inside a compiled step
    if weights == "bf16" and on_cpu and cpu_gemv.kernels() is None and not cpu_has_native_bf16():
        warnings.warn("neither scratchlm's decode kernels (cpu_gemv.py) nor a native bf16 matmul (AVX512-BF16 "
                      "or AMX) are here: bf16 would decode slower than fp32, so the fp32 layout is used", stacklevel=2)
        weights = "fp32"
    if weights == "int4" and not on_cpu:
        raise ScratchLMError("int4 weights use PyTorch's CPU int4 kernel: move the model to the CPU first")
    # The activations (and the norms, the embeddings, the cache): bf16 for "bf16" where the CPU
    # has native bf16 (its kernel multiplies bf16 x) or off the CPU; fp32 where our kernel runs
    # without native bf16, as llama.cpp keeps them with F16 weights: the kernel widens x to fp32
    # anyway, and PyTorch's bf16 ops between the matrices are emulated, slower than fp32 ones
    # (smollm2-135m on an Ice Lake server, 64 tokens: bf16 weights 1.44x our fp32 with bf16
    # activations, 1.52x with fp32 ones, interleaved rounds). int8 and int4 keep bf16 ones: their
    # weights are quantized from the bf16-rounded matrices, as a GGUF file's are (gguf_io/quant.py).
    float_activations = (on_cpu and weights == "bf16" and cpu_gemv.kernels() is not None
                         and not cpu_has_native_bf16())
    dtype = torch.float32 if weights in ("fp32", "int8-dynamic") or float_activations else torch.bfloat16
    tied = isinstance(model, Transformer) and model.lm_head.weight is model.tok_emb.weight
    if weights == "fp32" and tied:  # one transposed table serves the head and the lookups
        table_t = model.tok_emb.weight.detach().to(dtype).t().contiguous()  # (d_model, vocab)
        model.lm_head = TransposedLinear(table_t, None)
        model.tok_emb = TransposedEmbedding(table_t)
    model.to(dtype)

    def swap(linear: nn.Linear) -> nn.Module:
        if weights == "fp32":
            return TransposedLinear.from_linear(linear)
        if weights == "bf16" and on_cpu:
            return BF16Linear(linear, dtype)
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
    head = getattr(model, "lm_head", None)
    if screen_head and on_cpu and isinstance(head, (TransposedLinear, BF16Linear)) and cpu_gemv.kernels() is not None:
        weight = head.weight_t.t() if isinstance(head, TransposedLinear) else head.weight
        head.screen = HeadScreen(weight, torch.bfloat16 if isinstance(head, BF16Linear) and dtype == torch.bfloat16
                                 else torch.float32)
    if fused is None:
        fused = on_cpu
    if fused and on_cpu and isinstance(model, Transformer) and cpu_gemv.kernels() is not None:
        from .decode_block import DecodeBlock, DecodeBlocks

        model.blocks = DecodeBlocks(DecodeBlock(b) for b in model.blocks)
    model.requires_grad_(False)
    if hasattr(model, "config"):
        model.config = model.config.replace(dtype="float32" if dtype == torch.float32 else "bfloat16")
    return model
