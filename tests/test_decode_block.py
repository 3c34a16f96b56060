"""decode_block.DecodeBlock: one-token steps through the fused ops of csrc/decode_ops.cpp give
model.py's Block numbers, for every family, past a sliding window, with padding, in fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer, cpu_gemv
from scratchlm.decode_block import DecodeBlock
from scratchlm.decode_weights import prepare_for_decode
from scratchlm.generate import generate

pytestmark = pytest.mark.skipif(cpu_gemv.kernels() is None, reason="the decode kernels cannot be built here")

FAMILIES = ["gpt-tiny", "llama-tiny", "moe-tiny", "qwen3-tiny", "gemma3-tiny", "olmo2-tiny"]


def pair(preset: str, dtype=torch.float32, seed: int = 0):
    """(plain model, the same weights with DecodeBlocks). Weights nudged off their init, so that
    norms' weights and biases are not all ones and zeros."""
    torch.manual_seed(seed)
    plain = Transformer(ModelConfig.preset(preset)).eval().to(dtype)
    for p in plain.parameters():
        p.data += 0.05 * torch.randn_like(p)
    fast = Transformer(plain.config).eval().to(dtype)
    fast.load_state_dict(plain.state_dict())
    fast.blocks = torch.nn.ModuleList(DecodeBlock(b) for b in fast.blocks)
    return plain, fast


class Counting:
    """The kernels module, counting calls of the fused attention (to prove the path is taken)."""

    def __init__(self, ops):
        self.ops, self.calls = ops, 0

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def attend_one(self, *args):
        self.calls += 1
        return self.ops.attend_one(*args)

    def FusedBlock(self, *args):  # noqa: N802 (the extension's class)
        block, spy = self.ops.FusedBlock(*args), self

        class Step:
            fused = block  # what run_blocks takes

            def step(self, *step_args):
                spy.calls += 1
                return block.step(*step_args)
        return Step()

    def run_blocks(self, plans, *args):  # every block's step in one call: one count a block
        self.calls += len(plans)
        return self.ops.run_blocks([p.fused for p in plans], *args)


@pytest.fixture
def counting(monkeypatch):
    spy = Counting(cpu_gemv.kernels())
    monkeypatch.setitem(cpu_gemv._built, "module", spy)
    return spy


def steps(model, prompt, new_ids, padded_mask=None):
    """Logits of a prefill then one cached step per column of new_ids (B, n): [(B, 1, V), ...]."""
    B = prompt.shape[0]
    cache = model.new_cache(B, prompt.shape[1] + new_ids.shape[1])
    positions = None
    if padded_mask is not None:
        full = torch.cat([padded_mask, torch.ones_like(new_ids, dtype=torch.bool)], 1)
        cache.key_mask = full
        all_positions = (full.long().cumsum(1) - 1).clamp(min=0)
        positions = all_positions[:, :prompt.shape[1]]
    out = []
    with torch.inference_mode():
        model(prompt, cache=cache, positions=positions)
        for t in range(new_ids.shape[1]):
            p = None if padded_mask is None else all_positions[:, prompt.shape[1] + t:prompt.shape[1] + t + 1]
            out.append(model(new_ids[:, t:t + 1], cache=cache, positions=p))
    return out, cache


@pytest.mark.parametrize("preset", FAMILIES)
def test_fp32_steps_equal_the_plain_block_past_the_window(preset, counting):
    plain, fast = pair(preset)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 500, (2, 3), generator=gen)
    new = torch.randint(0, 500, (2, 40), generator=gen)  # gemma3-tiny's window is 16
    a, cache_a = steps(plain, prompt, new)
    b, cache_b = steps(fast, prompt, new)
    assert counting.calls == 40 * plain.config.n_layers
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    for x, y in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["llama-tiny", "gemma3-tiny", "gpt-tiny"])
def test_left_padded_rows_equal_the_plain_block(preset, counting):
    plain, fast = pair(preset, seed=2)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 500, (3, 5), generator=gen)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True], [False] * 4 + [True]])
    new = torch.randint(0, 500, (3, 25), generator=gen)
    a, _ = steps(plain, prompt, new, mask)
    b, _ = steps(fast, prompt, new, mask)
    assert counting.calls == 25 * plain.config.n_layers
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny", "gemma3-tiny", "olmo2-tiny"])
def test_bf16_steps_are_as_close_to_fp32_as_the_plain_bf16_block(preset):
    """bf16 rounds at the same places as model.py, but sums in another order: the fused
    step's distance to the fp32 logits is that of model.py's own bf16 step, not more."""
    reference, _ = pair(preset)
    plain, fast = pair(preset, torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 500, (2, 3), generator=gen)
    new = torch.randint(0, 500, (2, 30), generator=gen)
    ref, _ = steps(reference, prompt, new)
    a, _ = steps(plain, prompt, new)
    b, _ = steps(fast, prompt, new)
    err = lambda out: max((o.float() - r).abs().max().item() for o, r in zip(out, ref))  # noqa: E731
    scale = max(r.abs().max().item() for r in ref)
    assert err(b) <= 1.5 * err(a) + 1e-3 * scale


def test_prompts_training_and_autograd_take_model_py(counting):
    plain, fast = pair("llama-tiny")
    ids = torch.randint(0, 500, (1, 6))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids, cache=fast.new_cache(1, 8)), plain(ids, cache=plain.new_cache(1, 8)))
    assert counting.calls == 0  # a prompt of 6 tokens is Block.forward's
    cache = fast.new_cache(1, 8)
    with torch.inference_mode():
        fast(ids, cache=cache)
    fast.train()
    fast(ids[:, :1], cache=cache)  # one token, but training (and autograd on)
    assert counting.calls == 0
    fast.eval()
    fast.use_sdpa = False  # the written-out reference attention stays the reference
    with torch.inference_mode():
        fast(ids[:, :1], cache=cache)
    assert counting.calls == 0


@pytest.mark.parametrize("layout", ["fp32", "bf16", "int8", "int4"])
def test_prepare_for_decode_fuses_and_keeps_greedy_tokens(layout, counting):
    config = ModelConfig.preset("llama-tiny")
    torch.manual_seed(5)
    base = Transformer(config).eval()
    fused = Transformer(config).eval()
    fused.load_state_dict(base.state_dict())
    prepare_for_decode(base, layout, fused=False)
    prepare_for_decode(fused, layout, fused=True)
    assert all(type(b) is DecodeBlock for b in fused.blocks)
    assert not any(type(b) is DecodeBlock for b in base.blocks)
    prompts = [[1, 2, 3, 4], [7, 8]]  # left-padded batch
    want = [c.token_ids for c in generate(base, None, prompts, max_new_tokens=12)]
    calls = counting.calls
    got = [c.token_ids for c in generate(fused, None, prompts, max_new_tokens=12)]
    assert counting.calls > calls
    if layout == "fp32":
        assert got == want
    else:  # the sums' order differs: most tokens agree
        agree = sum(x == y for g, w in zip(got, want) for x, y in zip(g, w))
        assert agree >= 0.8 * sum(len(w) for w in want)


@pytest.mark.parametrize("layout", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny", "gemma3-tiny", "olmo2-tiny", "gpt-tiny"])
def test_the_cpp_block_step_gives_the_fused_python_steps_exactly(preset, layout, monkeypatch):
    """FusedBlock (the whole one-token step of a block in one C++ call) makes the same kernel
    calls as DecodeBlock.forward's Python, in the same order: the same bits, for every family's
    norms, QK-norm, activation and bias, on every decode layout, batched and left-padded."""
    config = ModelConfig.preset(preset)
    torch.manual_seed(3)
    model = prepare_for_decode(Transformer(config).eval(), layout, group_size=32)
    prompt, new = torch.tensor([[3, 1, 4, 1], [0, 0, 5, 9]]), torch.tensor([[2, 6, 5], [3, 5, 8]])
    padded = torch.tensor([[True] * 4, [False, False, True, True]])
    with_plan, cache_a = steps(model, prompt, new, padded)
    assert all(b._plan is not None for b in model.blocks)  # the C++ step ran
    monkeypatch.setattr(DecodeBlock, "_fused_plan", lambda self: None)
    without, cache_b = steps(model, prompt, new, padded)
    for a, b in zip(with_plan, without):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v))


def test_the_block_step_is_rebuilt_when_a_layer_or_its_tensors_change():
    model = prepare_for_decode(Transformer(ModelConfig.preset("llama-tiny")).eval(), "bf16")
    steps(model, torch.tensor([[1, 2]]), torch.tensor([[3]]))
    block = model.blocks[0]
    first = block._plan
    assert first is not None and block._fused_plan() is first  # built once
    model.to(torch.bfloat16)  # .to() may give new tensors: the plan holding the old ones is dropped
    assert block._plan is None
    steps(model, torch.tensor([[1, 2]]), torch.tensor([[3]]))
    assert block._plan is not None and block._plan is not first
    block.mlp.up_proj = torch.nn.Linear(block.mlp.up_proj.in_features, block.mlp.up_proj.out_features, bias=False)
    assert block._fused_plan() is None  # a layer FusedBlock does not run: the Python step


def test_bf16_int8_int4_layouts_fuse_by_default():
    model = prepare_for_decode(Transformer(ModelConfig.preset("llama-tiny")).eval(), "int4")
    assert all(type(b) is DecodeBlock for b in model.blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_equal_torch_over_a_wide_range(dtype):
    ops = cpu_gemv.kernels()
    a = torch.linspace(-120, 120, 4801).to(dtype)[None]
    b = torch.randn(a.shape).to(dtype)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ops.activation(a, b, 0), F.silu(a) * b, **tol)
    torch.testing.assert_close(ops.activation(a, b, 1), F.gelu(a, approximate="tanh") * b, **tol)
    torch.testing.assert_close(ops.activation(a, None, 2), F.relu(a), **tol)


def test_nan_activations_stay_nan():
    """A NaN (a diverged model) must show in the logits, not be turned into a number."""
    ops = cpu_gemv.kernels()
    x = torch.full((1, 40), float("nan"))
    for act in (0, 1):
        assert torch.isnan(ops.activation(x, None, act)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, Hkv, D", [(9, 3, 64), (4, 2, 24), (20, 2, 16)])
def test_attend_one_equals_sdpa_on_the_cache(H, Hkv, D, dtype):
    """The fused one-query attention (no rotary) against F.scaled_dot_product_attention on the
    cache it wrote: D a multiple of 16 and up to 8 queries a key head take the register kernel
    (9, 3, 64: SmolLM2's heads), the others the portable loop; with and without a key mask."""
    ops = cpu_gemv.kernels()
    gen = torch.Generator().manual_seed(5)
    B, C, keys, column = 2, 40, 37, 36
    Q, KV = H * D, Hkv * D
    qkv = torch.randn(B, Q + 2 * KV, generator=gen).to(dtype)
    for masked in (False, True):
        k_cache = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
        v_cache = torch.randn(B, Hkv, C, D, generator=gen).to(dtype)
        mask = (torch.rand(B, keys, generator=gen) > 0.3) if masked else None
        if mask is not None:
            mask[:, column] = True
        y = ops.attend_one(qkv, None, None, k_cache, v_cache, column, keys, mask, H, Hkv, 0.0, 0, 0, None, None, 1e-5)
        k_new, v_new = qkv[:, Q:Q + KV].view(B, Hkv, D), qkv[:, Q + KV:].view(B, Hkv, D)
        assert torch.equal(k_cache[:, :, column], k_new) and torch.equal(v_cache[:, :, column], v_new)
        q = qkv[:, :Q].view(B, H, 1, D).float()
        k, v = k_cache[:, :, :keys].float(), v_cache[:, :, :keys].float()
        attn_mask = None if mask is None else mask[:, None, None, :]
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True).view(B, Q)
        assert y.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y.float(), expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_one_split_over_the_keys_equals_sdpa(dtype):
    """A long cache at batch 1 (SmolLM2's 3 key heads) is cut into runs of keys, one task each,
    as many as makes the tasks divide among the threads (2 threads: 2 runs, 4 threads: 4; 1
    thread or 3: none); the runs' softmaxes are combined into the softmax over all keys. Left
    padding masks the whole first run (it must weigh nothing, not turn into a NaN)."""
    ops = cpu_gemv.kernels()
    gen = torch.Generator().manual_seed(7)
    H, Hkv, D, C, keys = 9, 3, 64, 700, 650
    Q, KV = H * D, Hkv * D
    qkv = torch.randn(1, Q + 2 * KV, generator=gen).to(dtype)
    k_cache = torch.randn(1, Hkv, C, D, generator=gen).to(dtype)
    v_cache = torch.randn(1, Hkv, C, D, generator=gen).to(dtype)
    padded = torch.ones(1, keys, dtype=torch.bool)
    padded[:, :400] = False
    scattered = torch.rand(1, keys, generator=gen) > 0.5
    scattered[:, keys - 1] = True
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3, 4):
            torch.set_num_threads(n_threads)
            for mask in (None, padded, scattered):
                y = ops.attend_one(qkv, None, None, k_cache, v_cache, keys - 1, keys, mask, H, Hkv, 0.0, 0, 0,
                                   None, None, 1e-5)
                q = qkv[:, :Q].view(1, H, 1, D).float()
                k, v = k_cache[:, :, :keys].float(), v_cache[:, :, :keys].float()
                attn_mask = None if mask is None else mask[:, None, None, :]
                expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True).view(1, Q)
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
                torch.testing.assert_close(y.float(), expected, **tol)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("preset, layout", [(p, "fp32") for p in FAMILIES] + [("llama-tiny", "bf16"),
                                                                             ("gemma3-tiny", "int8")])
def test_all_blocks_in_one_call_equal_the_block_by_block_steps(preset, layout, run_blocks_calls):
    """DecodeBlocks (what prepare_for_decode installs) runs a one-token step of every block in
    one C++ call (run_blocks): the same numbers as the DecodeBlocks called one by one, past
    gemma3-tiny's sliding window (a ring cache, the local rope and mask) and with left padding;
    a MoE block's step is not fusable, and the model's loop runs."""
    import copy

    from scratchlm.decode_block import DecodeBlocks

    plain, _ = pair(preset, seed=6)
    one_call = prepare_for_decode(copy.deepcopy(plain), layout)
    assert isinstance(one_call.blocks, DecodeBlocks)
    by_block = copy.deepcopy(one_call)
    by_block.blocks = torch.nn.ModuleList(list(by_block.blocks))
    calls = run_blocks_calls
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 500, (2, 4), generator=gen)
    new = torch.randint(0, 500, (2, 24), generator=gen)
    for mask in (None, torch.tensor([[True] * 4, [False, False, True, True]])):
        calls.clear()
        a, cache_a = steps(by_block, prompt, new, mask)
        b, cache_b = steps(one_call, prompt, new, mask)
        assert len(calls) == (0 if preset == "moe-tiny" else new.shape[1])
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        for x, y in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v):
            assert torch.equal(x, y)
    seen = []  # a forward hook on a block: the loop calls the blocks, so it runs every step
    handle = one_call.blocks[0].register_forward_hook(lambda module, args, out: seen.append(1))
    calls.clear()
    hooked, _ = steps(one_call, prompt, new)
    handle.remove()
    assert len(seen) == 1 + new.shape[1] and calls == []
    for x, y in zip(steps(by_block, prompt, new)[0], hooked):
        assert torch.equal(x, y)


@pytest.mark.parametrize("preset, layout", [(p, "fp32") for p in FAMILIES] + [("llama-tiny", layout) for layout in
                                                                             ("bf16", "int8", "int4")])
def test_tokens_of_one_row_in_one_call_equal_model_pys_pass(preset, layout, run_blocks_calls):
    """A few new tokens of one row after its cache (a speculative verify pass, a prompt of up
    to 8 tokens) go through run_blocks together, each token attending up to its own key: the
    logits and the cache of model.py's causal pass over the same tokens. Declined (model.py
    runs) with a local layer (gemma3), a MoE block, a batch of rows, or more than 8 tokens."""
    import copy

    plain, _ = pair(preset, seed=8)
    fused = prepare_for_decode(copy.deepcopy(plain), layout)
    loop = copy.deepcopy(fused)
    loop.blocks = torch.nn.ModuleList(list(loop.blocks))  # each DecodeBlock: model.py's Block for T > 1
    seen = run_blocks_calls
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 500, (1, 40), generator=gen)
    tolerance = {"fp32": 1e-4}.get(layout, 2e-2)
    with torch.inference_mode():
        caches = [m.new_cache(1, 40) for m in (fused, loop)]
        at = 0
        for T in (5, 1, 8, 3, 9, 6):  # 9: more than 8 tokens, model.py for both
            seen.clear()
            a, b = (m(ids[:, at:at + T], cache=c) for m, c in zip((fused, loop), caches))
            at += T
            declined = preset == "moe-tiny" or T > 8 or (preset == "gemma3-tiny" and T > 1)
            assert seen == ([] if declined else [T])
            torch.testing.assert_close(a.float(), b.float(), rtol=tolerance, atol=tolerance)
        for x, y in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
            torch.testing.assert_close(x[:, :, :at].float(), y[:, :, :at].float(), rtol=tolerance, atol=tolerance)
        seen.clear()
        two = fused.new_cache(2, 40)
        fused(ids[:, :4].expand(2, 4), cache=two)  # a batch of rows: model.py's pass
        assert seen == []
