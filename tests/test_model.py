"""The Transformer against Hugging Face transformers and torch references.

Every Hugging Face model here is built in the test with random weights (nothing is
downloaded); its state dict goes through scratchlm.hf and the logits must agree.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers

from scratchlm import ModelConfig, Transformer
from scratchlm.errors import ScratchLMError
from scratchlm.hf import from_hf_model
from scratchlm.model import KVCache, causal_mask, check_token_ids
from scratchlm.positions import apply_rope, rope_table

transformers.logging.set_verbosity_error()
ATOL = 1e-4


def _hf_gpt2(**kw):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=211, n_positions=128, n_embd=64, n_layer=3, n_head=4,
                                     bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(config).eval()


def _hf_llama(n_kv_heads=4, tie=False, rope_scaling=None, max_positions=128, theta=10000.0):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=199, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=max_positions, rope_theta=theta,
        rope_scaling=rope_scaling, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}

HF_CASES = {
    "gpt2": lambda: _hf_gpt2(),
    "llama2-mha": lambda: _hf_llama(n_kv_heads=4),
    "llama3-gqa": lambda: _hf_llama(n_kv_heads=2, theta=500000.0),
    # original context 32, model context 256: positions up to 200 are "beyond the original context"
    "llama3.1-rope-scaling": lambda: _hf_llama(n_kv_heads=2, rope_scaling=LLAMA31_SCALING, max_positions=256),
    "llama3.2-tied": lambda: _hf_llama(n_kv_heads=2, tie=True, rope_scaling=LLAMA31_SCALING, max_positions=256),
    "mqa": lambda: _hf_llama(n_kv_heads=1),
}


@pytest.mark.parametrize("case", HF_CASES)
@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "reference"])
def test_logits_equal_hugging_face(case, use_sdpa):
    hf = HF_CASES[case]()
    ours = from_hf_model(hf).eval()
    ours.use_sdpa = use_sdpa
    T = 200 if "rope-scaling" in case or "tied" in case else 100
    ids = torch.randint(0, hf.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_tied_head_shares_one_matrix():
    ours = from_hf_model(HF_CASES["llama3.2-tied"]())
    assert ours.lm_head.weight is ours.tok_emb.weight
    untied = from_hf_model(HF_CASES["llama2-mha"]())
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_rope_equals_hugging_face_rotary_embedding():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf = HF_CASES["llama3.1-rope-scaling"]()
    ours = from_hf_model(hf)
    rotary = LlamaRotaryEmbedding(hf.config)
    positions = torch.arange(0, 256)[None]
    x = torch.randn(1, 4, 256, 16)
    hf_cos, hf_sin = rotary(x, positions)
    cos, sin = rope_table(ours.config, 256)
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-5, rtol=0)
    q, k = torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos[None, None], sin[None, None]), hf_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos[None, None], sin[None, None]), hf_k, atol=1e-5, rtol=0)


def test_rope_scaling_changes_only_low_frequencies():
    base = ModelConfig.preset("llama-tiny", context_length=256)
    scaled = base.replace(rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_context_length": 32})
    from scratchlm.positions import rope_frequencies

    f0, f1 = rope_frequencies(base), rope_frequencies(scaled)
    assert torch.equal(f0[0], f1[0])  # the fastest rotation is kept
    torch.testing.assert_close(f1[-1], f0[-1] / 8)  # the slowest is slowed by `factor`


def test_rope_preserves_norm_and_relative_position():
    config = ModelConfig.preset("llama-tiny")
    cos, sin = rope_table(config, 64)
    q, k = torch.randn(config.head_dim), torch.randn(config.head_dim)

    def rot(x, p):
        return apply_rope(x[None, None, None], cos[p][None, None, None], sin[p][None, None, None]).flatten()

    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # <R_m q, R_n k> depends only on m - n: the reason RoPE encodes relative positions
    torch.testing.assert_close(rot(q, 7) @ rot(k, 3), rot(q, 14) @ rot(k, 10), atol=1e-5, rtol=0)


# ---- reference attention vs F.scaled_dot_product_attention ------------------------------
ATTENTION_KINDS = {"mha": 4, "gqa": 2, "mqa": 1}
POSITION_KINDS = ["learned", "sinusoidal", "rope"]


def _tiny(positions="rope", n_kv_heads=2, **kw):
    torch.manual_seed(0)
    norm, mlp = ("rmsnorm", "swiglu") if positions == "rope" else ("layernorm", "gelu")
    config = ModelConfig(vocab_size=97, context_length=96, d_model=64, n_layers=2, n_heads=4,
                         n_kv_heads=n_kv_heads, d_ff=128, norm=norm, mlp=mlp, positions=positions, **kw)
    model = Transformer(config).eval()
    with torch.no_grad():  # make every weight matter (norm gains and biases start at 1 / 0)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_reference_attention_equals_sdpa(kind):
    model = _tiny(n_kv_heads=ATTENTION_KINDS[kind])
    ids = torch.randint(0, 97, (3, 50))
    with torch.no_grad():
        fast = model(ids)
        model.use_sdpa = False
        reference = model(ids)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_reference_attention_matches_torch_functional_with_mask():
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    model = _tiny(n_kv_heads=4)
    attn = model.blocks[0].attn
    mask = causal_mask(5, 9)
    torch.testing.assert_close(attn._reference(q, k, v, None),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=0)


def test_causal_mask_shape_and_offset():
    mask = causal_mask(2, 5)  # 2 new queries after 3 cached positions
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_future_tokens_do_not_change_past_logits():
    model = _tiny()
    ids = torch.randint(0, 97, (1, 30))
    changed = ids.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :20], model(changed)[:, :20])


# ---- KV cache -------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", POSITION_KINDS)
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_cached_decoding_equals_uncached(positions, kind):
    model = _tiny(positions=positions, n_kv_heads=ATTENTION_KINDS[kind])
    prompt = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    steps = 50
    with torch.no_grad():
        # uncached: the whole sequence again at every step
        ids = prompt
        uncached_logits = []
        for _ in range(steps):
            logits = model(ids)[:, -1]
            uncached_logits.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        # cached: the prompt once, then one token at a time
        cache = model.new_cache(batch_size=1)
        logits = model(prompt, cache=cache)[:, -1]
        cached_ids, cached_logits = prompt, []
        for _ in range(steps):
            cached_logits.append(logits)
            next_id = logits.argmax(-1, keepdim=True)
            cached_ids = torch.cat([cached_ids, next_id], dim=1)
            logits = model(next_id, cache=cache)[:, -1]
    assert torch.equal(ids, cached_ids)  # same greedy tokens
    torch.testing.assert_close(torch.stack(cached_logits), torch.stack(uncached_logits), atol=1e-5, rtol=0)
    assert cache.length == 7 + steps


def test_cache_is_written_in_place_and_chunked_prefill_works():
    model = _tiny()
    cache = model.new_cache(batch_size=2, max_length=40)
    storage = [k.data_ptr() for k in cache.k]
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        chunks = [model(ids[:, a:b], cache=cache) for a, b in [(0, 12), (12, 13), (13, 30)]]
        full = model(ids)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
    assert [k.data_ptr() for k in cache.k] == storage  # preallocated, never reallocated
    assert cache.k[0].shape == (2, 2, 40, 16)  # (batch, n_kv_heads, max_length, head_dim)


@pytest.mark.parametrize("positions", POSITION_KINDS)
def test_left_padded_row_equals_unpadded(positions):
    """A batch row padded on the left (masked keys, positions from 0) gives the same logits."""
    model = _tiny(positions=positions)
    short = torch.randint(1, 97, (1, 6))
    pad = 4
    ids = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    positions_ = torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(6)])[None]
    with torch.no_grad():
        cache = model.new_cache(1)
        cache.key_mask = torch.zeros(1, cache.max_length, dtype=torch.bool)
        cache.key_mask[0, pad:] = True
        padded = model(ids, cache=cache, positions=positions_)[:, pad:]
        alone = model(short)
        next_id = alone[:, -1:].argmax(-1)
        step_padded = model(next_id, cache=cache, positions=torch.tensor([[6]]))
        step_alone = model(torch.cat([short, next_id], dim=1))[:, -1:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(step_padded, step_alone, atol=1e-5, rtol=0)


# ---- bad input --------------------------------------------------------------------------------
def test_token_ids_outside_vocabulary():
    """Ids are checked where they enter (check_token_ids), naming the bad id; forward itself
    no longer reads ids back to the host (see test_forward_has_no_graph_break)."""
    for ids in ([[1, 97]], torch.tensor([[1, 97]]), [5, 2, 97, 3], [[0], [1, 2, 98]]):
        with pytest.raises(ScratchLMError, match=r"token id 9[78] is outside the vocabulary \[0, 97\)"):
            check_token_ids(ids, 97)
    with pytest.raises(ScratchLMError, match="token id -1 is outside"):
        check_token_ids(torch.tensor([[-1, 3]]), 97)
    check_token_ids([[0, 96], [5]], 97)  # in range: no error
    check_token_ids([], 97)


def test_sequence_longer_than_context():
    model = _tiny()
    with pytest.raises(ValueError, match="exceeds the context length 96"):
        model(torch.zeros(1, 97, dtype=torch.long))
    cache = model.new_cache(1, max_length=10)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the context length 10"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# ---- training-time behaviour ------------------------------------------------------------------
# ---- no host sync, no graph break ------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
def test_forward_has_no_graph_break(preset):
    """torch.compile sees one graph for a training forward (ids -> logits) and for a cached
    decode step (one token with a KVCache, plain and with a padding key mask)."""
    torch._dynamo.reset()
    model = Transformer(ModelConfig.preset(preset, context_length=32)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    model.eval()
    with torch.no_grad():
        for padded in (False, True):
            cache = model.new_cache(2, 16)
            if padded:
                cache.key_mask = torch.ones(2, 16, dtype=torch.bool)
                cache.key_mask[1, :3] = False
            model(ids, cache=cache)
            explained = torch._dynamo.explain(model)(ids[:, :1], cache=cache, positions=torch.tensor([[8], [5]]))
            assert explained.graph_break_count == 0, explained.break_reasons
            assert cache.length == 9
    torch._dynamo.reset()


# ---- cache views ------------------------------------------------------------------------------
def test_cache_view_writes_land_in_the_whole_cache():
    """A view of the first rows, at a given length, shares storage: decoding two rows through
    a view of a 4-row cache gives what a 2-row cache of their own gives, and the writes land
    in the 4-row cache's first rows and columns."""
    model = _tiny()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    whole = model.new_cache(4, 20)
    whole.key_mask = torch.ones(4, 20, dtype=torch.bool)
    own = model.new_cache(2, 20)
    with torch.no_grad():
        view = whole.view(slice(0, 2), length=0)
        assert (view.batch_size, view.max_length, view.length) == (2, 20, 0)
        assert view.key_mask.shape == (2, 20) and view.key_mask.data_ptr() == whole.key_mask.data_ptr()
        through_view = model(ids, cache=view)
        alone = model(ids, cache=own)
        torch.testing.assert_close(through_view, alone)
        assert view.length == 6 and whole.length == 0  # the view keeps its own length
        torch.testing.assert_close(whole.k[1][:2, :, :6], own.k[1][:, :, :6])
        assert whole.k[1][2:].abs().sum() == 0  # rows outside the view untouched
        step = whole.view(slice(0, 2), length=6)  # a new view where the first one ended
        torch.testing.assert_close(model(ids[:, :1], cache=step), model(ids[:, :1], cache=own))
    wrapped = KVCache.from_tensors(whole.k, whole.v, length=3)
    assert (wrapped.batch_size, wrapped.max_length, wrapped.key_mask) == (4, 20, None)
    with pytest.raises(ValueError, match="outside the cache"):
        KVCache.from_tensors(whole.k, whole.v, length=21)


def test_gpt2_style_init_scales_residual_projections():
    config = ModelConfig.preset("gpt2", n_layers=8, vocab_size=1000, context_length=64)
    torch.manual_seed(0)
    model = Transformer(config)
    std_out = model.blocks[0].attn.out_proj.weight.std().item()
    std_qkv = model.blocks[0].attn.qkv_proj.weight.std().item()
    assert abs(std_qkv - 0.02) < 0.002
    assert abs(std_out - 0.02 / (2 * 8) ** 0.5) < 0.001


def test_dropout_only_in_training_mode():
    model = _tiny(dropout=0.5)
    ids = torch.randint(0, 97, (1, 20))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_tables_are_shared_not_copied_per_layer():
    model = _tiny(positions="rope")
    buffers = dict(model.named_buffers())
    assert set(buffers) == {"rope_cos", "rope_sin"}  # one table for the model, none per layer
    assert "rope_cos" not in model.state_dict()  # rebuilt on load, never stored


@pytest.mark.parametrize("preset", ["llama-tiny", "gemma3-tiny"])
def test_a_packed_row_gives_each_sequence_its_own_forward(preset):
    """Two sequences in one row (attn_mask block-diagonal, positions from 0 for each) give
    the logits of their separate forwards; for gemma3-tiny the sequences are longer than
    its sliding window, so the packed window (a gap in positions) is exercised."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=64)).eval()
    window = model.config.sliding_window
    n = 2 * window if window else 20
    a, b = torch.randint(0, 64, (1, n)), torch.randint(0, 64, (1, n - 3))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(n), torch.arange(n - 3)])[None]
    segment = torch.tensor([0] * n + [1] * (n - 3))
    mask = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    with torch.no_grad():
        packed = model(row, positions=positions, attn_mask=mask[None])
        torch.testing.assert_close(packed[:, :n], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[:, n:], model(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt-tiny", "moe-tiny", "gemma3-tiny", "olmo2-tiny", "qwen3-tiny"])
@pytest.mark.parametrize("kernels", ["fused", "pytorch"])
def test_unpadded_forward_equals_the_padded_one_at_the_real_tokens(preset, kernels, monkeypatch):
    """real_index: the token-wise layers run on the real tokens only. A right-padded batch
    (causal: no real query sees the padding) gives the padded forward's logits at those
    positions, the loss over their targets, and the same gradients of every weight; with the
    fused CPU kernels (the attention reads the tokens unpadded) and without them (the tokens
    go back into the padded layout for PyTorch's attention, as on a GPU)."""
    from scratchlm import fused_ops

    if kernels == "pytorch":
        monkeypatch.setitem(fused_ops._built, "module", None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=50, dropout=0.0)).train()
    lengths = [9, 4, 6]
    ids = torch.randint(0, 50, (3, 9))
    real = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]  # (3, 9)
    index = real.flatten().nonzero()[:, 0]
    targets = torch.randint(0, 50, (3, 9)).masked_fill(~real, -100)

    def grads(loss):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.autograd.grad(loss, params, allow_unused=True)

    with torch.no_grad():
        padded, unpadded = model(ids).flatten(0, 1)[index], model(ids, real_index=index)
    assert unpadded.shape == (len(index), 50)
    torch.testing.assert_close(unpadded, padded, atol=1e-5, rtol=0)
    weights = torch.randn(len(index), model.config.d_model)
    g_padded = grads((model(ids, return_hidden=True).flatten(0, 1)[index] * weights).sum())
    g_unpadded = grads((model(ids, return_hidden=True, real_index=index) * weights).sum())
    for a, b in zip(g_padded, g_unpadded):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(ids, targets=targets, real_index=index), model(ids, targets=targets),
                               atol=1e-5, rtol=0)
    with pytest.raises(ScratchLMError, match="no cache"):
        model(ids, cache=model.new_cache(3, 16), real_index=index)


def test_pad_and_unpad_are_each_others_backward():
    from scratchlm.unpadding import Unpadded, pad, unpad

    u = Unpadded.of(torch.tensor([0, 1, 2, 3, 6]), 3, 3)  # rows of 3, 1 and 1 real tokens
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = pad(x, u)
    assert y.shape == (3, 3, 4) and y[1, 1:].abs().sum() == 0 and y[2, 1:].abs().sum() == 0
    assert torch.equal(y[2, 0], x[4])
    torch.autograd.gradcheck(lambda t: pad(t, u), (x,))
    torch.autograd.gradcheck(lambda t: unpad(t, u), (torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True),))


def test_select_rows_equals_index_select_with_repeated_rows():
    from scratchlm.unpadding import select_rows

    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 4, 2, 5, 0, 4])  # rows 4 and 0 used more than once, 1 and 3 never
    assert torch.equal(select_rows(x, index), x.index_select(0, index))
    torch.autograd.gradcheck(lambda t: select_rows(t, index), (x,))


def test_training_norm_and_rope_backward_equal_autograd_of_the_plain_ops():
    # RMSNorm and apply_rope take a hand-written backward when they need a gradient
    # (norms._RMSNormWithBackward, positions._RopeWithBackward): gradcheck in float64 against
    # finite differences, and the float32 values and gradients against autograd through
    # F.rms_norm and the written-out rotation (what inference runs).
    from scratchlm.norms import RMSNorm, _RMSNormWithBackward
    from scratchlm.positions import _RopeWithBackward

    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(2, 3, 8, dtype=torch.float64, generator=g).requires_grad_()
    w64 = torch.randn(8, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormWithBackward.apply(x, w, 1e-5), (x64, w64))
    cos, sin = (t[:5][None, None].double() for t in rope_table(ModelConfig.preset("llama-tiny").replace(head_dim=8), 5))
    q64 = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: _RopeWithBackward.apply(q, cos, sin), (q64,))

    for plus_one in (False, True):
        norm = RMSNorm(64, eps=1e-6, plus_one=plus_one)
        with torch.no_grad():
            norm.weight.normal_(generator=g)
        x = torch.randn(4, 7, 64, generator=g).requires_grad_()
        up = torch.randn(4, 7, 64, generator=g)
        y = norm(x)
        y.backward(up)
        x2 = x.detach().clone().requires_grad_()
        w2 = norm.weight.detach().clone().requires_grad_()
        y2 = F.rms_norm(x2, (64,), (1 + w2) if plus_one else w2, 1e-6)
        y2.backward(up)
        with torch.no_grad():
            assert torch.equal(y, norm(x))  # training's numbers are inference's
        torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)  # F.rms_norm's (fused_ops: to rounding)
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm.weight.grad, w2.grad, atol=1e-4, rtol=1e-5)

    cos, sin = (t[:9][None, None] for t in rope_table(ModelConfig.preset("llama-tiny").replace(head_dim=16), 9))
    q = torch.randn(3, 4, 9, 16, generator=g).transpose(1, 2).transpose(1, 2).requires_grad_()  # a strided view too
    k = torch.randn(3, 4, 16, 9, generator=g).transpose(-1, -2).detach().requires_grad_()
    for x in (q, k):
        up = torch.randn(x.shape, generator=g)
        y = apply_rope(x, cos, sin)
        y.backward(up)
        x2 = x.detach().clone().requires_grad_()
        half = 8
        y2 = x2 * cos + torch.cat([-x2[..., half:], x2[..., :half]], -1) * sin
        y2.backward(up)
        assert torch.equal(y, y2)  # the same numbers as the written-out form, with or without autograd
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)
        with torch.no_grad():
            assert torch.equal(apply_rope(x, cos, sin), y2)


@pytest.mark.parametrize("preset", ["llama-tiny", "gemma3-tiny"])  # SwiGLU, GeGLU
def test_training_runs_gate_and_up_as_one_matmul_with_the_same_numbers(preset, monkeypatch):
    # MLP._gate_and_up stacks the two weights while a gradient is needed: the output equals
    # inference's two matmuls exactly, the gradients those of the two layers run apart.
    from scratchlm.model import MLP

    torch.manual_seed(0)
    mlp = MLP(ModelConfig.preset(preset))
    x = torch.randn(3, 7, mlp.up_proj.in_features, requires_grad=True)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    y = mlp(x)
    assert calls  # the stacked path ran
    with torch.no_grad():
        assert torch.equal(y, mlp(x))
    up = torch.randn(y.shape)
    y.backward(up)
    grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    act = F.silu if mlp.kind == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
    (mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x)) * up).sum().backward()
    for a, b in zip(grads, [x.grad] + [p.grad for p in mlp.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
