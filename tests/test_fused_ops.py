"""fused_ops: the CPU training kernels (csrc/train_ops.cpp) give the numbers and gradients of
PyTorch's plain ops (autograd through them), and a model trains the same with them or without."""

import pytest
import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer, fused_ops
from scratchlm.positions import _rotate

pytestmark = pytest.mark.skipif(fused_ops.kernels() is None, reason="the training kernels cannot be built here")


def leaf(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape).requires_grad_(True)


@pytest.mark.parametrize("shape", [(2, 7, 64), (5, 128), (3, 4, 9, 32)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_values_and_gradients_equal_autograd(shape, weight_grad):
    x = leaf(*shape)
    w = (1 + 0.1 * torch.randn(shape[-1])).requires_grad_(weight_grad)
    g = torch.randn(shape)
    ours = fused_ops.rms_norm(x, w, 1e-5)
    ours.backward(g)
    dx, dw = x.grad.clone(), w.grad.clone() if weight_grad else None
    x.grad = None
    w.grad = None
    ref = F.rms_norm(x, (shape[-1],), w, 1e-5)
    ref.backward(g)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, x.grad, rtol=1e-4, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(dw, w.grad, rtol=1e-4, atol=1e-4)
    else:
        assert w.grad is None


def test_rms_norm_takes_a_strided_view_and_is_deterministic():
    x = leaf(4, 6, 3, 32).transpose(1, 2)  # (4, 3, 6, 32): a view, as qk-norm over heads sees it
    w = torch.randn(32)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (32,), w, 1e-6), rtol=1e-5, atol=1e-5)
    # the weight's gradient is summed in fixed blocks of rows: the same bits every time
    x2, w2 = leaf(3000, 64), torch.randn(64).requires_grad_(True)
    grads = []
    for _ in range(2):
        w2.grad = None
        fused_ops.rms_norm(x2, w2, 1e-5).sum().backward()
        grads.append(w2.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("table_batch", [1, 3])
def test_rotate_is_bit_for_bit_apply_ropes_ops_and_its_gradient_the_transpose(table_batch):
    qkv = leaf(3, 5, 6, 16)  # (B, T, heads, D): the projection's layout
    x = qkv.transpose(1, 2)  # (B, heads, T, D), strided
    cos, sin = torch.randn(table_batch, 1, 5, 16), torch.randn(table_batch, 1, 5, 16)
    ours = fused_ops.rotate(x, cos, sin)
    assert torch.equal(ours, _rotate(x.detach(), cos, sin))
    g = torch.randn(3, 6, 5, 16)
    ours.backward(g)
    ours_grad = qkv.grad.clone()
    qkv.grad = None
    _rotate(x, cos, sin).backward(g)  # autograd through the plain ops
    torch.testing.assert_close(ours_grad, qkv.grad, rtol=1e-6, atol=1e-6)


def test_rotate_fits_only_what_it_takes():
    x, t = torch.randn(2, 3, 4, 8), torch.randn(1, 1, 4, 8)
    assert fused_ops.rotate_fits(x, t, t)
    assert not fused_ops.rotate_fits(x.double(), t.double(), t.double())
    assert not fused_ops.rotate_fits(x, t[..., :4], t[..., :4])  # a partial rotation
    assert not fused_ops.rotate_fits(x.transpose(-1, -2).contiguous().transpose(-1, -2), t, t)  # last dim strided


@pytest.mark.parametrize("shape", [(2, 9, 2 * 37), (1, 2 * 341)])
def test_swiglu_values_and_gradient_equal_autograd(shape):
    gate_up = leaf(*shape)
    with torch.no_grad():
        gate_up[..., 0] = -100.0  # far tails of the gate: exp's clamp
        gate_up[..., 1] = 100.0
    g = torch.randn(*shape[:-1], shape[-1] // 2)
    ours = fused_ops.swiglu(gate_up)
    ours.backward(g)
    ours_grad = gate_up.grad.clone()
    gate_up.grad = None
    ref = F.silu(gate_up.chunk(2, dim=-1)[0]) * gate_up.chunk(2, dim=-1)[1]  # PyTorch's ops
    ref.backward(g)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, gate_up.grad, rtol=1e-5, atol=1e-6)
    assert torch.isnan(fused_ops.swiglu(torch.tensor([[float("nan"), 1.0]]))).all()  # NaN is not hidden


def heads(B, H, T, D, seed):
    """(B, H, T, D) as the model has it: a transposed view of (B, T, H, D), a leaf."""
    torch.manual_seed(seed)
    return torch.randn(B, T, H, D).transpose(1, 2).requires_grad_(True)


def sdpa_reference(q, k, v, mask, causal):
    """F.scaled_dot_product_attention with the causal mask aligned bottom-right, as model.causal_mask."""
    T, S = q.shape[2], k.shape[2]
    if causal:
        keep = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
        causal_part = torch.zeros(T, S).masked_fill(~keep, float("-inf"))
        mask = causal_part if mask is None else mask + causal_part
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def assert_same_values_and_gradients(out, expected, inputs):
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(out)
    got, want = torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g)
    for a, b, name in zip(got, want, "qkv"):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("B,H,Hkv,T,S,D", [(2, 4, 2, 7, 7, 16), (3, 6, 3, 5, 12, 48), (1, 2, 2, 37, 37, 32),
                                           (8, 4, 2, 85, 85, 32), (2, 8, 1, 3, 40, 64)])
@pytest.mark.parametrize("masked,causal", [(False, False), (False, True), (True, False), (True, True)])
def test_attention_values_and_gradients_equal_sdpa(B, H, Hkv, T, S, D, masked, causal):
    """Grouped heads (and MQA), T < S (the queries the last T positions), an additive mask
    broadcast over heads, causal or not: out and dq, dk, dv as PyTorch's kernel gives them."""
    q, k, v = heads(B, H, T, D, 0), heads(B, Hkv, S, D, 1), heads(B, Hkv, S, D, 2)
    mask = None
    if masked:
        torch.manual_seed(3)
        keep = torch.rand(B, 1, T, S) < 0.6
        keep[..., 0] = True  # every query sees a key
        mask = torch.zeros(B, 1, T, S).masked_fill(~keep, float("-inf"))
    assert fused_ops.attention_fits(q, k, mask)
    out = fused_ops.attention(q, k, v, mask, causal=causal)
    expected = sdpa_reference(q, k, v, mask, causal)
    assert_same_values_and_gradients(out, expected, (q, k, v))
    with torch.no_grad():  # the inference path: the forward kernel alone, the same numbers
        torch.testing.assert_close(fused_ops.attention(q, k, v, mask, causal=causal), out, atol=0, rtol=0)


def test_attention_is_deterministic_and_masked_keys_get_no_gradient():
    q, k, v = heads(4, 4, 30, 32, 0), heads(4, 2, 30, 32, 1), heads(4, 2, 30, 32, 2)
    keep = torch.ones(4, 1, 30, 30, dtype=torch.bool)
    keep[..., 20:] = False  # keys 20.. are padding: no query sees them
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    g = torch.randn(4, 4, 30, 32)
    first = torch.autograd.grad(fused_ops.attention(q, k, v, mask), (q, k, v), g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second = torch.autograd.grad(fused_ops.attention(q, k, v, mask), (q, k, v), g)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert first[1][:, :, 20:].abs().max() == 0 and first[2][:, :, 20:].abs().max() == 0


@pytest.mark.parametrize("masked", [False, True])
def test_unpadded_attention_equals_sdpa_on_the_padded_batch(masked):
    """Per token (n, heads, D) through the position map: the real tokens' outputs and
    gradients are those of SDPA over the padded (B, H, T, D) batch; padding costs nothing."""
    from scratchlm.unpadding import Unpadded, pad

    B, H, Hkv, T, D = 3, 4, 2, 13, 32
    lengths = [13, 6, 9]
    real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    u = Unpadded.of(real.flatten().nonzero()[:, 0], B, T)
    n = sum(lengths)
    q, k, v = leaf(n, H, D, seed=0), leaf(n, Hkv, D, seed=1), leaf(n, Hkv, D, seed=2)
    mask = None
    if masked:  # a packed-row style mask: causal, and each query also off the keys 2..3
        keep = torch.ones(B, 1, T, T, dtype=torch.bool)
        keep[..., 2:4] = False
        keep |= torch.eye(T, dtype=torch.bool)
        mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out = fused_ops.unpadded_attention(q, k, v, u.source, B, T, mask, causal=True)
    assert out.shape == (n, H, D)

    def padded(t):  # (n, heads, D) -> (B, heads, T, D)
        return pad(t.flatten(1), u).view(B, T, t.shape[1], D).transpose(1, 2)

    expected = sdpa_reference(padded(q), padded(k), padded(v), mask, causal=True)
    expected = expected.transpose(1, 2).reshape(B * T, H, D)[u.index]
    assert_same_values_and_gradients(out, expected, (q, k, v))


def test_attention_fits_only_what_it_takes():
    q, k = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32)
    assert fused_ops.attention_fits(q, k, None)
    assert not fused_ops.attention_fits(torch.randn(1, 2, 4, 24), torch.randn(1, 2, 4, 24), None)  # head_dim
    assert not fused_ops.attention_fits(q, k, torch.ones(1, 1, 4, 4, dtype=torch.bool))  # a boolean mask
    assert not fused_ops.attention_fits(q.bfloat16(), k.bfloat16(), None)
    long_k = torch.randn(1, 2, fused_ops.ATTENTION_MAX_KEYS + 1, 32)
    assert not fused_ops.attention_fits(q, long_k, None)
    per_token = torch.randn(6, 2, 32)
    assert fused_ops.unpadded_attention_fits(per_token, per_token, per_token, None, 3)
    assert not fused_ops.unpadded_attention_fits(per_token, per_token, per_token, None,
                                                 fused_ops.ATTENTION_MAX_KEYS + 1)
    assert not fused_ops.unpadded_attention_fits(q, k, k, None, 4)  # the padded layout


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen3-tiny", "gemma3-tiny", "olmo2-tiny"])
def test_a_training_step_matches_the_plain_ops(preset, monkeypatch):
    """Loss and every gradient of a model equal those of the same model on PyTorch's ops."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset))
    for p in model.parameters():  # off the init: norm weights not all ones
        p.data += 0.05 * torch.randn_like(p)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []

    class Spy:  # the extension, noting which kernels run
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    real = fused_ops.kernels()
    monkeypatch.setitem(fused_ops._built, "module", Spy())
    fused_loss, fused_grads = step()
    expected = {"rms_norm_forward", "rms_norm_backward", "rotate"} | ({"swiglu_forward", "swiglu_backward"}
                                                                       if model.config.mlp == "swiglu" else set())
    if model.config.head_dim % 16 == 0:
        expected |= {"attention_forward", "attention_backward"}
    assert expected <= set(calls)
    monkeypatch.setitem(fused_ops._built, "module", None)  # as where the extension cannot be built
    plain_loss, plain_grads = step()
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SCRATCHLM_NO_FUSED_OPS", "1")
    monkeypatch.delitem(fused_ops._built, "module")
    assert fused_ops.kernels() is None
    assert not fused_ops.usable(torch.zeros(2))
