"""Quantized decode weights keep a trained model's quality: perplexity on held-out text
against fp32, and greedy agreement. Random weights would say nothing here (every layout
is near-uniform on random logits), so a small byte-level Llama is trained first."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer
from scratchlm.corpus import python_reference
from scratchlm.decode_weights import Int4Linear, prepare_for_decode, quantize_int4
from scratchlm.errors import ScratchLMError
from scratchlm.generate import generate


def _bytes(texts) -> torch.Tensor:
    return torch.tensor(list("\n".join(texts).encode("utf-8")), dtype=torch.long)


@pytest.fixture(scope="module")
def trained():
    """A 2-layer GQA Llama (d_model 128, 4 query heads sharing 2 kv heads) trained for a few
    seconds on the Python language reference, and held-out topics to score it on."""
    torch.manual_seed(0)
    docs = python_reference()
    train, held_out = _bytes(docs[:60])[:400_000], _bytes(docs[60:])[:4096]
    cfg = ModelConfig.preset("llama-tiny").replace(vocab_size=256, d_model=128, n_heads=4, n_kv_heads=2,
                                                   d_ff=384, context_length=128)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        starts = torch.randint(0, len(train) - 65, (16,), generator=g)
        batch = torch.stack([train[s:s + 65] for s in starts.tolist()])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), held_out


@torch.no_grad()
def perplexity(model, text: torch.Tensor, window: int = 128) -> float:
    chunks = text[: len(text) // window * window].view(-1, window)
    logits = model(chunks[:, :-1]).float()
    return math.exp(F.cross_entropy(logits.flatten(0, 1), chunks[:, 1:].flatten()).item())


def greedy_agreement(model, reference, prompts, n: int = 32) -> float:
    """Fraction of the n greedy tokens that equal the reference's, up to the first difference
    per prompt (after a difference the two continue different texts)."""
    same = 0
    for p in prompts:
        a = generate(model, None, [p], max_new_tokens=n)[0].token_ids
        b = generate(reference, None, [p], max_new_tokens=n)[0].token_ids
        same += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n)
    return same / (n * len(prompts))


def top1_agreement(model, reference, text: torch.Tensor, window: int = 128) -> float:
    """Fraction of held-out positions where both models' most likely next token is the same
    (teacher forcing: every position reads the true text, so one near-tie flips one token,
    not the rest of a generation as in greedy_agreement)."""
    chunks = text[: len(text) // window * window].view(-1, window)
    return (model(chunks).argmax(-1) == reference(chunks).argmax(-1)).float().mean().item()


def test_quantized_weights_keep_perplexity_and_greedy_tokens(trained):
    model, held_out = trained
    ppl32 = perplexity(model, held_out)
    assert ppl32 < 12, f"the model did not learn (perplexity {ppl32:.1f} of 256 bytes): the check would be void"
    prompts = [list(b"The "), list(b"def f(x):\n    return"), list(b"An assignment statement")]
    # (perplexity ratio below, next-token agreement on held-out text at least). The greedy
    # run of 3 x 32 tokens is printed, not asserted: where it first differs depends on near-ties
    # that the CPU's kernels (AVX2 or AVX-512 int8 paths) break differently.
    limits = {"bf16": (1.01, 0.97), "int8": (1.02, 0.95), "int4": (1.05, 0.85)}
    for weights, (max_ratio, min_agreement) in limits.items():
        fast = prepare_for_decode(copy.deepcopy(model), weights, group_size=32)
        ratio = perplexity(fast, held_out) / ppl32
        agreement = top1_agreement(fast, model, held_out)
        print(f"{weights}: perplexity {ratio:.4f}x fp32's {ppl32:.2f}, next-token agreement {agreement:.1%}, "
              f"greedy agreement {greedy_agreement(fast, model, prompts):.0%}")
        assert ratio < max_ratio, weights
        assert agreement >= min_agreement, weights


def test_int4_quantization_round_trip_error_is_bounded():
    """Each dequantized weight lies within half a step (scale / 2) of the original."""
    w = torch.randn(48, 256)
    q, scale, zero = quantize_int4(w, 64)
    assert q.min() >= 0 and q.max() <= 15
    back = (q.view(48, 4, 64).float() - 8) * scale[..., None] + zero[..., None]
    assert ((back.view(48, 256) - w).abs() <= scale.repeat_interleave(64, dim=1) / 2 + 1e-6).all()


def test_int4_linear_equals_its_dequantized_matrix():
    lin = torch.nn.Linear(128, 96, bias=True)
    q4 = Int4Linear.from_linear(lin, group_size=32)
    q, scale, zero = quantize_int4(lin.weight.detach(), 32)
    scale, offset = scale.half().float(), (zero - 8 * scale).half().float()  # as stored: fp16
    w = (q.view(96, 4, 32).float() * scale[..., None] + offset[..., None]).view(96, 128)
    assert torch.equal(q4.dequantized(torch.float32), w)
    x = torch.randn(3, 5, 128)
    expected = x.bfloat16().float() @ w.t() + lin.bias.detach().bfloat16().float()
    torch.testing.assert_close(q4(x).float(), expected, rtol=0.02, atol=0.02)


def test_int4_bad_group_size_is_a_clear_error():
    model = Transformer(ModelConfig.preset("llama-tiny"))
    with pytest.raises(ScratchLMError, match="group size"):
        prepare_for_decode(model, "int4", group_size=48)
    with pytest.raises(ScratchLMError, match="does not divide"):
        Int4Linear.from_linear(torch.nn.Linear(100, 8), group_size=32)


def test_bf16_falls_back_to_fp32_without_our_kernels_or_native_bf16(monkeypatch):
    import scratchlm.cpu_gemv as cpu_gemv
    import scratchlm.decode_weights as dw

    monkeypatch.setattr(dw, "cpu_has_native_bf16", lambda: False)
    if cpu_gemv.kernels() is not None:  # our kernel widens bf16 itself: no native bf16 needed
        fast = dw.prepare_for_decode(Transformer(ModelConfig.preset("llama-tiny")).eval(), "bf16")
        assert type(fast.blocks[0].mlp.up_proj).__name__ == "BF16Linear"
    monkeypatch.setattr(cpu_gemv, "kernels", lambda: None)
    model = Transformer(ModelConfig.preset("llama-tiny")).eval()
    with pytest.warns(UserWarning, match="native bf16"):
        fast = dw.prepare_for_decode(model, "bf16")
    assert type(fast.blocks[0].mlp.up_proj).__name__ == "TransposedLinear"
    assert fast.tok_emb.weight.dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_prompts_on_bf16_and_quantized_matrices_by_native_bf16(monkeypatch, native):
    """A prompt (more rows than our kernels take) multiplies by the layer's bf16 matrix: in
    oneDNN's bf16 matmul where the CPU has native bf16, else widened to fp32 for the call
    (emulated bf16 matmuls are slower than fp32 ones): then the products are exact."""
    import torch.nn.functional as F

    import scratchlm.decode_weights as dw

    monkeypatch.setattr(dw, "cpu_has_native_bf16", lambda: native)
    lin = torch.nn.Linear(128, 48, bias=True)
    layers = {"bf16": dw.BF16Linear(lin), "int8": dw.Int8Linear.from_linear(lin),
              "int4": dw.Int4Linear.from_linear(lin, group_size=32)}
    matrices = {"bf16": lambda layer: layer.weight,  # the bf16 numbers each one multiplies by
                "int8": lambda layer: (layer.weight_int8.float() * layer.scales.float()[:, None]).bfloat16(),
                "int4": lambda layer: layer.dequantized(torch.bfloat16)}
    for name, layer in layers.items():
        x = torch.randn(dw.kernel_rows(name) + 1, 128).bfloat16()  # a prompt: one row past the kernel's
        w, y = matrices[name](layer), layer(x)
        assert y.dtype == torch.bfloat16
        if name == "bf16":  # the bias inside the matmul, as F.linear adds it
            expected = (F.linear(x, w, layer.bias) if native
                        else F.linear(x.float(), w.float(), layer.bias.float()).bfloat16())
        else:
            expected = (F.linear(x, w) if native else F.linear(x.float(), w.float()).bfloat16()) + layer.bias
        torch.testing.assert_close(y.float(), expected.float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("native", [True, False])
def test_short_prompts_go_through_the_kernel_up_to_kernel_rows(monkeypatch, native):
    """Up to kernel_rows(weights) rows a bf16 / int8 / int4 layer multiplies through our kernel
    (prompt_linear is not called), from one row more through prompt_linear; without native bf16
    the kernel keeps longer prompts (the prompt path would widen every matrix to fp32)."""
    import scratchlm.cpu_gemv as cpu_gemv
    import scratchlm.decode_weights as dw

    if cpu_gemv.kernels() is None:
        pytest.skip("our CPU kernels are not built here")
    monkeypatch.setattr(dw, "cpu_has_native_bf16", lambda: native)
    calls = []
    real = dw.prompt_linear
    monkeypatch.setattr(dw, "prompt_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    lin = torch.nn.Linear(128, 48, bias=False)
    layers = {"bf16": dw.BF16Linear(lin), "int8": dw.Int8Linear.from_linear(lin),
              "int4": dw.Int4Linear.from_linear(lin, group_size=32)}
    for name, layer in layers.items():
        rows = dw.kernel_rows(name)
        assert rows >= cpu_gemv.MAX_ROWS
        calls.clear()
        y = layer(torch.randn(rows, 128).bfloat16())
        assert y.shape == (rows, 48) and calls == [], name
        layer(torch.randn(rows + 1, 128).bfloat16())
        assert calls == [1], name
    if not native:  # the widened fp32 path is the slow one: the kernel takes longer prompts
        assert min(dw.kernel_rows(w) for w in layers) > cpu_gemv.MAX_ROWS_QUANTIZED
