"""loss.linear_cross_entropy against F.cross_entropy of the full logits: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer
from scratchlm.loss import linear_cross_entropy


def reference(hidden, weight, targets, ignore_index=-100):
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)


def loss_and_grads(fn, hidden, weight, targets, scale=1.0):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = fn(h, w, targets)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [4096, 7, 1])
@pytest.mark.parametrize("ignore", [False, True])
def test_equals_cross_entropy(chunk_size, ignore):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(23, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (23,), generator=g)
    if ignore:  # prompt positions, the last position of a row, padding
        targets[[0, 1, 5, 22]] = -100
    ours = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk_size), hidden, weight,
                          targets, scale=0.25)  # 1/grad_accum: backward gets grad_loss != 1
    ref = loss_and_grads(reference, hidden, weight, targets, scale=0.25)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_ignore_index_and_shapes():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[:, -1] = 3  # ignore_index=3: every target 3 is skipped
    ours = linear_cross_entropy(hidden, weight, targets, ignore_index=3, chunk_size=3)
    torch.testing.assert_close(ours, reference(hidden.flatten(0, 1), weight, targets.flatten(), ignore_index=3))


def test_all_ignored_is_nan_as_cross_entropy():
    hidden, weight = torch.randn(3, 4), torch.randn(6, 4)
    targets = torch.full((3,), -100)
    assert reference(hidden, weight, targets).isnan()
    assert linear_cross_entropy(hidden, weight, targets).isnan()


def test_bfloat16_loss_in_float32():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(9, 8, generator=g).bfloat16(), torch.randn(20, 8, generator=g).bfloat16()
    targets = torch.randint(0, 20, (9,), generator=g)
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    ref = loss_and_grads(reference, hidden, weight, targets)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_no_grad_and_one_backward():
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    targets = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), reference(hidden, weight, targets))
    loss = linear_cross_entropy(hidden, weight.requires_grad_(), targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


@pytest.mark.parametrize("preset", ["qwen3-tiny", "gemma3-tiny", "qwen3-moe-tiny", "gpt-tiny", "olmo2-tiny"])
def test_model_targets_equal_logits_loss(preset):
    """Transformer(ids, targets=...) is the cross-entropy of its logits, and so are the gradients
    of every parameter (a tied head included: the embedding gets both shares)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, dtype="float32")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    loss = model(ids, targets=targets)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert ours.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
