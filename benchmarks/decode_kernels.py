"""Our decode kernels (cpu_gemv.py) against PyTorch's, matrix by matrix, in one process.

One pass = every weight matrix of a model shape (smollm2-135m by default: 30 layers of
qkv, out, gate, up, down, and the tied head) times one row of x, as one decode step does.
Each layout runs ours and PyTorch's kernel on the same quantized weights, interleaved
round by round; the best pass of each is printed with the read rate it implies.

    python benchmarks/decode_kernels.py
    python benchmarks/decode_kernels.py --preset qwen3-0.6b --rounds 9
    python benchmarks/decode_kernels.py --rows 1 2 5 8   # also fp32 (in, out) at 2-8 rows of x

A second table (``--rows``) times the fp32 layout's (in, out) matrices at several rows of x
(a batch, a speculative verify pass): MKL's ``x @ W_t`` against our ``linear_transposed``,
which decode_weights uses at 2-8 rows (MKL's GEMV at one).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from scratchlm import ModelConfig, Transformer, cpu_gemv
from scratchlm.decode_weights import pack_int4, quantize_int4, quantize_int8


def matrices(preset: str) -> list[tuple[int, int]]:
    """(out, in) of every Linear one decode step multiplies by (the tied head included)."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset(preset))
    return [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", type=int, nargs="*", default=[],
                    help="rows of x for the fp32 (in, out) table (e.g. 1 2 5 8; none: skip it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_gemv.kernels()
    if kernels is None:
        raise SystemExit("the kernels could not be built here (no C++ compiler?)")
    G = args.group_size
    shapes = matrices(args.preset)
    gen = torch.Generator().manual_seed(0)
    layouts = {"fp32": [], "bf16": [], "int8": [], "int4": []}
    for N, K in shapes:
        w = torch.randn(N, K, generator=gen) * 0.02
        layouts["fp32"].append(w)
        layouts["bf16"].append(w.bfloat16())
        q8, s8 = quantize_int8(w)
        layouts["int8"].append((q8, s8, s8.bfloat16()))
        q4, s4, z4 = quantize_int4(w, G)
        ours = pack_int4([(q4, s4, z4)], N, K)
        theirs = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1),
                  torch.stack([s4, z4], -1).transpose(0, 1).contiguous().bfloat16())
        layouts["int4"].append((ours, theirs))
    xs = {K: torch.randn(1, K, generator=gen).bfloat16() for _, K in shapes}
    xs32 = {K: x.float() for K, x in xs.items()}

    def fp32(ours):
        for (_, K), w in zip(shapes, layouts["fp32"]):
            kernels.linear(xs32[K], w, None) if ours else F.linear(xs32[K], w)

    def bf16(ours):
        for (_, K), w in zip(shapes, layouts["bf16"]):
            kernels.linear(xs[K], w, None) if ours else F.linear(xs[K], w)

    def int8(ours):
        for (_, K), (q, s, sb) in zip(shapes, layouts["int8"]):
            kernels.linear(xs[K], q, s) if ours else torch._weight_int8pack_mm(xs[K], q, sb)

    def int4(ours):
        for (_, K), (mine, theirs) in zip(shapes, layouts["int4"]):
            if ours:
                kernels.linear_int4(xs[K], *mine, G)
            else:
                torch.ops.aten._weight_int4pack_mm_for_cpu(xs[K], theirs[0], G, theirs[1])

    runs = {("fp32", "MKL F.linear"): lambda: fp32(False), ("fp32", "ours"): lambda: fp32(True),
            ("bf16", "oneDNN F.linear"): lambda: bf16(False), ("bf16", "ours"): lambda: bf16(True),
            ("int8", "torch._weight_int8pack_mm"): lambda: int8(False), ("int8", "ours"): lambda: int8(True),
            ("int4", "torch._weight_int4pack_mm_for_cpu"): lambda: int4(False), ("int4", "ours"): lambda: int4(True)}
    weight_bytes = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
    n_weights = sum(N * K for N, K in shapes)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - start)
    print(f"{args.preset}: {len(shapes)} matrices, {n_weights / 1e6:.1f}M weights, one row of x, "
          f"{args.threads} threads, best of {args.rounds} interleaved passes "
          f"(VNNI {kernels.VNNI}, BF16 dot {kernels.BF16DOT})")
    print(f"{'layout':6s} {'kernel':36s} {'ms / pass':>10s} {'GB/s':>7s} {'ours x':>7s}")
    for (layout, name), t in best.items():
        ours = best[layout, "ours"]
        print(f"{layout:6s} {name:36s} {t * 1e3:10.2f} {n_weights * weight_bytes[layout] / t / 1e9:7.1f} "
              f"{t / ours:7.2f}")
    if args.rows:
        transposed_rows(shapes, layouts["fp32"], args.rows, args.rounds, kernels)


def transposed_rows(shapes, weights, rows: list[int], rounds: int, kernels) -> None:
    """fp32 (in, out) matrices times M rows of x: MKL against linear_transposed, interleaved."""
    gen = torch.Generator().manual_seed(1)
    weights_t = [w.t().contiguous() for w in weights]
    xs = {(M, K): torch.randn(M, K, generator=gen) for M in rows for _, K in shapes}

    def mkl(M):
        for (_, K), w_t in zip(shapes, weights_t):
            xs[M, K] @ w_t

    def ours(M):
        for (_, K), w_t in zip(shapes, weights_t):
            kernels.linear_transposed(xs[M, K], w_t, None)

    best = {(name, M): float("inf") for M in rows for name in ("MKL x @ W_t", "ours linear_transposed")}
    for _ in range(rounds):
        for M in rows:
            for name, run in (("MKL x @ W_t", mkl), ("ours linear_transposed", ours)):
                start = time.perf_counter()
                run(M)
                best[name, M] = min(best[name, M], time.perf_counter() - start)
    n_bytes = 4 * sum(N * K for N, K in shapes)
    print(f"\nfp32 (in, out), rows of x {rows}: best of {rounds} interleaved passes")
    print(f"{'rows':>4s} {'kernel':28s} {'ms / pass':>10s} {'GB/s':>7s} {'x MKL':>7s}")
    for (name, M), t in best.items():
        print(f"{M:4d} {name:28s} {t * 1e3:10.2f} {n_bytes / t / 1e9:7.1f} {best['MKL x @ W_t', M] / t:7.2f}")


if __name__ == "__main__":
    main()
