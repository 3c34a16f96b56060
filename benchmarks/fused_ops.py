"""The fused CPU training kernels (fused_ops.py) against the PyTorch ops they replace, per
call, forward + backward, at the sizes of benchmarks/posttrain.py's DPO step (2 threads);
the attention on 8 packed rows of rows / 8 positions, against PyTorch's flash kernel.

    .venv/bin/python benchmarks/fused_ops.py              # rows 528, d_model 128, d_ff 341
    .venv/bin/python benchmarks/fused_ops.py --rows 4096 --d-model 576 --d-ff 1536   # smollm2-135m

Rounds alternate plain, fused, plain, fused, ... (a shared, noisy machine hits both alike);
the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from scratchlm import fused_ops
from scratchlm.norms import _RMSNormWithBackward
from scratchlm.positions import _RopeWithBackward


def cases(rows: int, d_model: int, d_ff: int, head_dim: int = 32):
    """name -> (plain step, fused step): each a forward and a backward of one op."""
    torch.manual_seed(0)
    x = torch.randn(rows, d_model, requires_grad=True)
    w = torch.randn(d_model, requires_grad=True)
    gx = torch.randn(rows, d_model)
    heads = d_model // head_dim
    qkv = torch.randn(1, rows, heads, head_dim, requires_grad=True)
    q = qkv.transpose(1, 2)  # (1, heads, rows, head_dim): a strided view, as in the model
    cos, sin = torch.randn(1, 1, rows, head_dim), torch.randn(1, 1, rows, head_dim)
    gq = torch.randn(1, heads, rows, head_dim)
    gate_up = torch.randn(rows, 2 * d_ff, requires_grad=True)
    gh = torch.randn(rows, d_ff)

    # Attention as a DPO step has it: 8 packed rows of T positions, half as many key heads,
    # a packed mask (causal, and each row's second response off its first).
    B, T, kv_heads = 8, rows // 8, max(heads // 2, 1)
    aq = torch.randn(B, T, heads, head_dim).transpose(1, 2).requires_grad_(True)
    ak = torch.randn(B, T, kv_heads, head_dim).transpose(1, 2).requires_grad_(True)
    av = torch.randn(B, T, kv_heads, head_dim).transpose(1, 2).requires_grad_(True)
    keep = torch.ones(T, T, dtype=torch.bool).tril()
    keep[2 * T // 3:, T // 3:2 * T // 3] = False
    amask = torch.zeros(1, 1, T, T).masked_fill(~keep, float("-inf")).expand(B, 1, T, T)
    ga = torch.randn(B, heads, T, head_dim)

    def plain_swiglu():
        gate, up = gate_up.split(d_ff, dim=-1)
        return F.silu(gate) * up

    def step(op, inputs, grad):  # forward, then the gradients (autograd.grad: nothing accumulates)
        return lambda: torch.autograd.grad(op(), inputs, grad)

    # plain: what runs without the kernels (the hand-written backwards of norms.py and
    # positions.py, autograd through F.silu * up, PyTorch's flash attention kernel)
    return {
        "rms_norm": (step(lambda: _RMSNormWithBackward.apply(x, w, 1e-5), (x, w), gx),
                     step(lambda: fused_ops.rms_norm(x, w, 1e-5), (x, w), gx)),
        "rotation": (step(lambda: _RopeWithBackward.apply(q, cos, sin), (qkv,), gq),
                     step(lambda: fused_ops.rotate(q, cos, sin), (qkv,), gq)),
        "swiglu": (step(plain_swiglu, (gate_up,), gh), step(lambda: fused_ops.swiglu(gate_up), (gate_up,), gh)),
        "attention": (step(lambda: F.scaled_dot_product_attention(aq, ak, av, attn_mask=amask, enable_gqa=True),
                           (aq, ak, av), ga),
                      step(lambda: fused_ops.attention(aq, ak, av, amask, causal=True), (aq, ak, av), ga)),
    }


def per_call(step, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=528, help="positions in the batch")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-ff", type=int, default=341)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50, help="calls per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if fused_ops.kernels() is None:
        raise SystemExit("the fused kernels cannot be built here")
    print(f"forward + backward per call, {args.rows} rows, d_model {args.d_model}, d_ff {args.d_ff}, "
          f"{args.threads} threads, median of {args.rounds} alternating rounds")
    print(f"{'op':10} {'plain us':>9} {'fused us':>9} {'speed-up':>9}")
    for name, (plain, fused) in cases(args.rows, args.d_model, args.d_ff).items():
        times = {"plain": [], "fused": []}
        for step in (plain, fused):  # warm-up
            per_call(step, 5)
        for _ in range(args.rounds):
            times["plain"].append(per_call(plain, args.calls))
            times["fused"].append(per_call(fused, args.calls))
        p, f = statistics.median(times["plain"]), statistics.median(times["fused"])
        print(f"{name:10} {p:>9.1f} {f:>9.1f} {p / f:>8.2f}x")


if __name__ == "__main__":
    main()
