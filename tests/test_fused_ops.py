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
