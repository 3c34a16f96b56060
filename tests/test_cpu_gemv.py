"""Our CPU decode kernels (csrc/gemv.cpp through cpu_gemv.py) against torch's matmul, and the
layers that use them against the same layers on PyTorch's kernels."""

import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer, cpu_gemv
from scratchlm.decode_weights import BF16Linear, Int4Linear, Int8Linear, prepare_for_decode

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the kernels")


@pytest.fixture(scope="module")
def kernels():
    k = cpu_gemv.kernels()
    assert k is not None, "a C++ compiler is here, so the kernels must build"
    return k


def gen(seed):
    return torch.Generator().manual_seed(seed)


# N = 37 is not a multiple of the 4 rows a pass takes: the tail rows run one at a time.
# M = 13: 8 rows of x a pass over the weights, then 5.
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("N,K", [(37, 64), (96, 576), (1536, 48)])
def test_float_weights_equal_matmul(kernels, M, N, K):
    w, x = torch.randn(N, K, generator=gen(0)), torch.randn(M, K, generator=gen(1))
    torch.testing.assert_close(cpu_gemv.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
    wb = w.bfloat16()  # bf16 weights and activations, fp32 sums: what the fp32 math on them gives
    expected = x.bfloat16().float() @ wb.float().T
    torch.testing.assert_close(cpu_gemv.linear(x.bfloat16(), wb).float(), expected, rtol=1e-2, atol=2e-2)
    assert cpu_gemv.linear(x.bfloat16(), wb).dtype == torch.bfloat16  # out in x's dtype
    # fp32 x on bf16 weights: the sums of the exact products, in fp32 (with vdpbf16ps x is
    # rounded to bf16 first; without it, the even / odd split or the widening loop keeps x)
    x_seen = x.bfloat16().float() if kernels.BF16DOT and K % 32 == 0 else x
    torch.testing.assert_close(cpu_gemv.linear(x, wb), x_seen @ wb.float().T, rtol=1e-5, atol=1e-4)


# The transposed (in, out) fp32 layout: N = 80 is 4 vectors of a tile and one more (the tail of
# one-vector tiles), N = 48 one 3-vector tile at 7-8 rows; K = 17 is not a multiple of anything.
@pytest.mark.parametrize("M", [1, 2, 4, 6, 7, 8, 13])
@pytest.mark.parametrize("K,N", [(576, 960), (17, 80), (1536, 48), (64, 16)])
def test_transposed_weights_equal_matmul(kernels, M, K, N):
    w_t, x, bias = (torch.randn(K, N, generator=gen(2)), torch.randn(M, K, generator=gen(3)),
                    torch.randn(N, generator=gen(4)))
    torch.testing.assert_close(cpu_gemv.linear_transposed(x, w_t), x @ w_t, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_gemv.linear_transposed(x, w_t, bias), torch.addmm(bias, x, w_t),
                               rtol=1e-5, atol=1e-4)
    strided = torch.randn(M, 2 * K, generator=gen(5))[:, ::2]  # copied to contiguous rows first
    torch.testing.assert_close(cpu_gemv.linear_transposed(strided, w_t), strided @ w_t, rtol=1e-5, atol=1e-4)
    assert cpu_gemv.transposed_fits(x, w_t) == (2 <= M <= cpu_gemv.TRANSPOSED_ROWS)
    for ids in (torch.tensor([0]), torch.tensor([N - 1, 3 % N, 0]), torch.arange(N)):  # any order, tails of 16
        torch.testing.assert_close(kernels.columns_transposed(x, w_t, ids), x @ w_t[:, ids], rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.columns_transposed(x, w_t, torch.tensor([N]))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_gemv.linear_transposed(x, torch.randn(K, N + 1))
    with pytest.raises(RuntimeError, match="float32"):
        cpu_gemv.linear_transposed(x.bfloat16(), w_t)


def test_transposed_layer_takes_our_kernel_at_two_to_eight_rows(kernels, monkeypatch):
    """TransposedLinear (the fp32 layout) on 1-9 rows against nn.Linear: at 2-8 rows our kernel
    runs, at 1 and 9 MKL (a fused block's Projection likewise: test_decode_block.py)."""
    from scratchlm.decode_weights import TransposedLinear
    linear = torch.nn.Linear(64, 96)
    layer = TransposedLinear.from_linear(linear)
    calls = []
    real = cpu_gemv.linear_transposed
    monkeypatch.setattr(cpu_gemv, "linear_transposed", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for M in range(1, 10):
        x = torch.randn(3, M, 64, generator=gen(M))[1]
        with torch.no_grad():
            torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    assert calls == list(range(2, 9))


def as_the_kernel_sees(x: torch.Tensor, kernels, levels: int = 32767) -> torch.Tensor:
    """x as the int8 / int4 kernels multiply it: with the integer dot products (VNNI), each run
    of 64 inputs rounded to steps of its own max|x| / levels (int8: 16 bits, 32767; int4: 15
    bits, 16383, split into two bytes); else x itself."""
    if not kernels.VNNI or x.shape[-1] % 64:
        return x
    runs = x.view(x.shape[0], -1, 64)
    step = runs.abs().amax(-1, keepdim=True) / levels
    return (torch.round(runs / step) * step).view_as(x)


# K = 96 is not a multiple of 64: the widening loop instead of the integer dot products.
@pytest.mark.parametrize("M", [1, 4, 8, 19])
@pytest.mark.parametrize("K", [96, 576])
def test_int8_weights_with_row_scales_equal_the_dequantized_matmul(kernels, M, K):
    q = torch.randint(-127, 128, (53, K), dtype=torch.int8, generator=gen(2))
    scale, x = torch.rand(53, generator=gen(3)), torch.randn(M, K, generator=gen(4))
    expected = as_the_kernel_sees(x, kernels) @ (q.float() * scale[:, None]).T
    # (up to fp32 summation order, and x / step against x * (1 / step) at a rounding tie)
    torch.testing.assert_close(cpu_gemv.linear(x, q, scale), expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    # and the rounding of x costs nothing that shows against the float product: 16 bits per run of 64,
    # even where one large activation sets a run's scale (LLMs have them: |x| ~30 among values ~1)
    x[:, 7] = 40.0
    exact = x @ (q.float() * scale[:, None]).T
    assert float((cpu_gemv.linear(x, q, scale) - exact).norm() / exact.norm()) < 1e-4


@pytest.mark.parametrize("M", [1, 3, 8, 21])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_equal_the_dequantized_matmul(kernels, M, group):
    N, K = 48, 256  # three tiles of 16 rows
    q = torch.randint(0, 16, (N, K), generator=gen(5))
    scale = torch.rand(N, K // group, generator=gen(6)).half()
    offset = torch.randn(N, K // group, generator=gen(7)).half()
    w = (q.view(N, -1, group).float() * scale.float()[..., None] + offset.float()[..., None]).view(N, K)
    x = torch.randn(M, K, generator=gen(8))
    packed = cpu_gemv.pack_nibbles(q)
    assert packed.shape == (N, K // 2) and torch.equal(cpu_gemv.unpack_nibbles(packed), q.to(torch.uint8))
    scale, offset = cpu_gemv.tile_groups(scale), cpu_gemv.tile_groups(offset)  # the kernel's order
    expected = as_the_kernel_sees(x, kernels, 16383) @ w.T
    torch.testing.assert_close(cpu_gemv.linear_int4(x, packed, scale, offset, group), expected,
                               rtol=0, atol=2e-5 * float(expected.abs().max()))
    x[:, 7] = 40.0  # one large activation: 15 bits of x (int4) are half as fine as int8's 16
    exact = x @ w.T
    assert float((cpu_gemv.linear_int4(x, packed, scale, offset, group) - exact).norm() / exact.norm()) < 2e-4


def test_int4_tiles_hold_the_documented_bytes():
    """pack_nibbles' order, written out: for row n = 16t + l and input k = 64c + 32h + 4j + b,
    byte ((t * runs + c) * 8 + j) * 64 + 4l + b of the buffer, low nibble for h = 0, high for 1;
    tile_groups puts a group's 16 rows side by side."""
    N, K = 32, 128
    q = torch.randint(0, 16, (N, K), generator=gen(11))
    flat = cpu_gemv.pack_nibbles(q).flatten()
    for n, k in [(0, 0), (5, 3), (17, 36), (31, 127), (16, 64), (9, 95)]:
        t, lane, c, h, j, b = n // 16, n % 16, k // 64, (k % 64) // 32, (k % 32) // 4, k % 4
        byte = int(flat[((t * (K // 64) + c) * 8 + j) * 64 + 4 * lane + b])
        assert (byte >> 4 if h else byte & 15) == int(q[n, k])
    groups = torch.arange(N * 3).view(N, 3)
    tiled = cpu_gemv.tile_groups(groups).flatten()
    assert int(tiled[(1 * 3 + 2) * 16 + 4]) == int(groups[20, 2])
    assert torch.equal(cpu_gemv.untile_groups(cpu_gemv.tile_groups(groups)), groups)


def test_bad_shapes_are_clear_errors(kernels):
    w = torch.randn(8, 32)
    with pytest.raises(RuntimeError, match="no rows"):
        cpu_gemv.linear(torch.randn(0, 32), w)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_gemv.linear(torch.randn(1, 40), torch.randn(8, 40))
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_gemv.linear(torch.randn(1, 32), w.double())
    assert not cpu_gemv.fits(torch.randn(9, 32), 32) and cpu_gemv.fits(torch.randn(1, 1, 32), 32)
    assert cpu_gemv.fits(torch.randn(16, 32), 32, cpu_gemv.MAX_ROWS_QUANTIZED)
    q = torch.zeros(40, 32, dtype=torch.uint8)  # 40 rows: not whole tiles of 16
    halves = torch.zeros(40, 1, dtype=torch.int16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_gemv.linear_int4(torch.randn(1, 64), q, halves, halves, 64)


def test_torch_compile_sees_one_op_not_a_graph_break(kernels):
    w, x = torch.randn(48, 64, generator=gen(9)), torch.randn(1, 64, generator=gen(10))
    step = torch.compile(lambda x: cpu_gemv.linear(x, w).relu(), backend="eager", fullgraph=True)
    torch.testing.assert_close(step(x), (x @ w.T).relu(), rtol=1e-5, atol=1e-4)
    w_t, x4 = w.T.contiguous(), torch.randn(4, 64, generator=gen(11))
    step = torch.compile(lambda x: cpu_gemv.linear_transposed(x, w_t).relu(), backend="eager", fullgraph=True)
    torch.testing.assert_close(step(x4), (x4 @ w_t).relu(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["bf16", "int8", "int4"])
def test_layers_decode_the_same_with_and_without_the_kernels(kernels, layout, monkeypatch):
    """A decoding model (1 row) on our kernels against the same layers on PyTorch's: the same
    weights, so only summation order and the activations' rounding differ."""
    torch.manual_seed(0)
    model = prepare_for_decode(Transformer(ModelConfig.preset("llama-tiny")).eval(), layout, group_size=32)
    layer = model.blocks[0].mlp.up_proj
    assert type(layer) is {"bf16": BF16Linear, "int8": Int8Linear, "int4": Int4Linear}[layout]
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(ids[:, :3], cache=cache)  # a 3-token prompt: PyTorch's kernels
        fast = model(ids[:, 3:], cache=cache)[:, -1].float()  # one token: ours
        monkeypatch.setattr(cpu_gemv, "kernels", lambda: None)
        cache = model.new_cache(1, 8)
        model(ids[:, :3], cache=cache)
        slow = model(ids[:, 3:], cache=cache)[:, -1].float()
        dtype = model.tok_emb.weight.dtype  # the activations': fp32 where the CPU lacks native bf16
        x = torch.randn(1, layer.in_features).to(dtype)
        matrix = (layer.dequantized() if layout == "int4" else
                  layer.weight_int8.bfloat16() * layer.scales.bfloat16()[:, None] if layout == "int8" else layer.weight)
        reference = F.linear(x, matrix.to(dtype))
    assert float((fast - slow).norm() / slow.norm()) < 0.02
    assert fast.argmax() == slow.argmax()
    monkeypatch.undo()
    torch.testing.assert_close(layer(x).float(), reference.float(), rtol=0.02, atol=0.02)


def test_dequantize_gives_the_layers_own_matrices(kernels):
    """The bf16 matrices a prompt multiplies by: exactly the int8 / int4 weights times their
    scales (plus offsets), each rounded to bf16 once."""
    from scratchlm.decode_weights import Int4Linear, Int8Linear

    linear = torch.nn.Linear(192, 80, bias=False)
    int8 = Int8Linear.from_linear(linear)
    want = (int8.weight_int8.float() * int8.scales_fp32[:, None]).bfloat16()
    assert torch.equal(cpu_gemv.dequantize(int8.weight_int8, int8.scales_fp32), want)
    for group in (32, 64):
        int4 = Int4Linear.from_linear(linear, group)
        q = cpu_gemv.unpack_nibbles(int4.weight_int4).view(80, -1, group).float()
        s, o = (cpu_gemv.untile_groups(t).view(torch.float16).float() for t in (int4.scales, int4.offsets))
        want = (q * s[..., None] + o[..., None]).view(80, 192).bfloat16()
        assert torch.equal(cpu_gemv.dequantize(int4.weight_int4, int4.scales, int4.offsets, group), want)
        x = torch.randn(40, 192).bfloat16()  # a prompt of 40 rows: through the dequantized matrix
        torch.testing.assert_close(int4(x).float(), (x.float() @ want.float().T), rtol=2e-2, atol=2e-2)


def test_builds_are_cached_per_cpu_instruction_set(tmp_path):
    """A build made with -march=native on one CPU is never loaded on a CPU with other
    instruction sets (it would die of SIGILL): the cache name carries the CPU's flags."""
    from scratchlm.extension import cpu_tag

    def info(name, flags):
        path = tmp_path / name
        path.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
        return str(path)

    zen4 = cpu_tag(info("zen4", "fpu sse2 avx2 avx512f avx512_bf16"))
    icelake = cpu_tag(info("icelake", "fpu sse2 avx2 avx512f"))
    assert zen4 != icelake
    assert cpu_tag(info("reordered", "avx512_bf16 avx512f avx2 sse2 fpu")) == zen4
    assert re.fullmatch("[0-9a-f]{8}", zen4)
    assert re.fullmatch("[0-9a-f]{8}", cpu_tag(str(tmp_path / "missing")))  # no /proc: still a name
    if cpu_gemv.kernels() is not None:  # the build in use is this CPU's
        assert cpu_gemv.kernels().__name__ == f"scratchlm_gemv_{cpu_tag()}"


@pytest.mark.skipif(cpu_gemv.kernels() is None, reason="the decode kernels cannot be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_strided_x_gives_the_contiguous_result(dtype):
    """x a non-contiguous view (the last position of each row of a prompt's hidden states, as
    the head sees it) multiplies like its contiguous copy, for every weight format."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 64).to(dtype)
    x = hidden[:, -1]  # (3, 64), strides (320, 1)
    assert not x.is_contiguous()
    w = torch.randn(32, 64)
    for weight in (w, w.bfloat16()):
        torch.testing.assert_close(cpu_gemv.linear(x, weight), cpu_gemv.linear(x.contiguous(), weight), rtol=0, atol=0)
