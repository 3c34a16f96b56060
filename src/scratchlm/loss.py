"""The output head and the next-token loss in one step: cross_entropy(hidden @ weight^T, targets).

Training computes, for N positions, logits (N, vocab) = hidden (N, d_model) @ weight^T and the
mean cross-entropy of the targets. With the vocabularies of today's models (Qwen3: 151,936,
Gemma 3: 262,144) those logits are the largest tensor of a training step: at batch 2 x 256
positions, 512 x 262,144 fp32 numbers are 537 MB, written by the matmul, then read and
written again by log-softmax, by its backward (the gradient of the logits is as large) and
by the slicing around them. At small model sizes that memory traffic is a large part of
the step.

``linear_cross_entropy`` does it a chunk of positions at a time and never holds all the
logits: for each chunk it computes the logits, their log-sum-exp and the loss, and, as the
gradient of the loss with respect to the logits is known in closed form at that moment,

    d loss / d logits = (softmax(logits) - onehot(target)) / n_valid      (0 on ignored rows)

it turns the chunk's logits into that gradient in place and multiplies it out straight
away into the gradients of ``hidden`` (g @ weight) and of ``weight`` (g^T @ hidden). The
backward pass then only scales what the forward pass kept. The matmuls are the same three
a plain head does (forward, and the two of its backward), so nothing is recomputed; what
goes away is the full-size logits, their gradient and the passes over them. (Liger
Kernel's "fused linear cross-entropy" is the same idea on GPUs.)

>>> import torch
>>> h, w, y = torch.randn(6, 4), torch.randn(10, 4), torch.tensor([1, 2, -100, 3, 4, 5])
>>> torch.allclose(linear_cross_entropy(h, w, y, chunk_size=4), torch.nn.functional.cross_entropy(h @ w.T, y))
True
"""

from __future__ import annotations

import torch

# Rows per chunk. Each chunk reads all of ``weight`` twice and adds into its gradient, so
# fewer, larger chunks cost less weight traffic; smaller ones hold fewer logits at a time.
# 4096 positions keep the usual CPU batches (and a GPU micro-batch) to one or two chunks,
# while bounding the logits at 4096 x vocab (4 GB at Gemma 3's vocabulary, fp32).
CHUNK_SIZE = 4096


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (hidden @ weight^T) against targets, gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        # hidden (N, d), weight (V, d), targets (N,) int64
        valid = targets != ignore_index  # (N,)
        n_valid = valid.sum()  # a tensor: no host sync
        safe_targets = torch.where(valid, targets, 0)[:, None]  # (N, 1): an index for every row
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Each row's share of the mean (0 for ignored rows), applied to the small (n, d) side of
        # each gradient matmul rather than to the (n, V) gradient of the logits.
        row_scale = (valid / n_valid).to(hidden.dtype)[:, None]  # (N, 1)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            h = hidden[start:end]  # (n, d)
            logits = (h @ weight.T).float()  # (n, V), in fp32 whatever the weights' dtype
            target_logit = logits.gather(1, safe_targets[start:end])[:, 0]  # (n,)
            # log-sum-exp written out, in place (torch.logsumexp makes two (n, V) temporaries):
            # e = exp(logits - max) overwrites the logits, which are not needed any more.
            top = logits.amax(dim=-1)  # (n,)
            e = logits.sub_(top[:, None]).exp_()  # (n, V)
            sum_e = e.sum(dim=-1)  # (n,)
            total += ((top + sum_e.log() - target_logit) * valid[start:end]).sum()  # -log softmax[target]
            if not (want_h or want_w):
                continue
            # softmax - onehot(target) = (e - sum_e * onehot) / sum_e: subtract at the targets,
            # and leave the division by sum_e (a per-row factor) to the small side of the matmuls.
            g = e.scatter_add_(1, safe_targets[start:end], -sum_e[:, None]).to(hidden.dtype)  # (n, V)
            scale = row_scale[start:end] / sum_e[:, None].to(hidden.dtype)  # (n, 1)
            if want_h:
                grad_h[start:end] = (g @ weight) * scale  # (n, d)
            if want_w:
                hs = h * scale  # (n, d)
                grad_w = g.T @ hs if grad_w is None else grad_w.addmm_(g.T, hs)  # (V, d)
        # Kept on ctx rather than save_for_backward: backward scales them in place, once.
        ctx.grads = (grad_h, grad_w)
        return total / n_valid  # nan when every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy supports one backward pass per forward")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # grad_loss is 1 for a plain loss.backward(), 1/accum with gradient accumulation.
        grad_h = grad_h.mul_(grad_loss) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_loss) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index) (the mean over the
    targets that are not ``ignore_index``), without the (N, vocab) logits: see the module docstring.

    hidden (N, d_model) or (B, T, d_model); weight (vocab, d_model), an output head's;
    targets (N,) or (B, T). The loss is computed in float32 whatever the dtype of hidden.
    One backward pass per call (the gradients are made in the forward pass and handed out once).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_size)


__all__ = ["linear_cross_entropy", "CHUNK_SIZE"]
