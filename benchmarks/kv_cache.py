"""Why the KV cache matters: decode time with and without it as the sequence grows (GPT-2 124M).

For each length L the script times one decode step at that length, both ways:

    KV cache   one new token attends to the L cached keys/values: one token's worth of matmuls
    no cache   the whole sequence of L tokens goes through the model again

and the total time to generate a sequence of L tokens, which is the sum of its steps (the
step times interpolated between the lengths measured): re-running ~L^2/2 token-forwards at
L=1024 would take an hour on a small CPU. For lengths up to --measure-total (default 128)
generate(use_cache=True/False) is also timed end to end, as a check of that sum. It prints the speed-up at each length and writes docs/images/kv_cache.png.

    python benchmarks/kv_cache.py                          # 128, 256, 512, 768, 1024
    python benchmarks/kv_cache.py --lengths 128 256 --threads 2 --out /tmp/kv.png
"""

from __future__ import annotations

import argparse
import time

import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.generate import generate


def step_time(model, length: int, use_cache: bool, repeats: int) -> float:
    """Best time (s) of the step that reads the ``length``-th token and predicts the next."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            if use_cache:
                cache = model.new_cache(1, length)
                model(ids[:, :-1], cache=cache, return_hidden=True)  # fill the cache (not timed)
                start = time.perf_counter()
                model.lm_head(model(ids[:, -1:], cache=cache, return_hidden=True)[:, -1])
            else:
                start = time.perf_counter()
                model.lm_head(model(ids, return_hidden=True)[:, -1])
            best = min(best, time.perf_counter() - start)
    return best


def total_from_steps(lengths: list[int], steps: list[float], upto: int) -> float:
    """Sum of step times for sequence lengths 1..upto, the step time interpolated linearly
    between the measured lengths (and held flat below the first)."""
    import numpy as np

    return float(np.interp(np.arange(1, upto + 1), lengths, steps).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 768, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timings per point; the best is kept")
    ap.add_argument("--measure-total", type=int, default=128,
                    help="time whole generations end to end up to this length (the rest is summed from steps)")
    ap.add_argument("--out", default="docs/images/kv_cache.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2")).eval()
    lengths = sorted(args.lengths)
    print(f"GPT-2 124M (random weights, fp32), {args.threads} threads, best of {args.repeats}")

    with_cache = {"step": [], "total": []}
    without = {"step": [], "total": []}
    for L in lengths:  # interleaved: a busy machine slows both alike
        with_cache["step"].append(step_time(model, L, True, args.repeats))
        without["step"].append(step_time(model, L, False, args.repeats))
        print(f"  step at {L:5d}: cache {with_cache['step'][-1] * 1e3:7.1f} ms   "
              f"no cache {without['step'][-1] * 1e3:8.1f} ms", flush=True)

    measured = {}
    for L in [L for L in lengths if L <= args.measure_total]:
        prompt = [[1]]
        for use_cache in (True, False):
            start = time.perf_counter()
            generate(model, None, prompt, max_new_tokens=L - 1, use_cache=use_cache)
            measured[(L, use_cache)] = time.perf_counter() - start
    for L in lengths:  # the curves use the sums of steps (consistent); end-to-end runs check them
        for table in (with_cache, without):
            table["total"].append(total_from_steps(lengths, table["step"], L))

    print(f"\n{'length':>7} {'step: cache':>12} {'no cache':>10} {'speed-up':>9}   "
          f"{'total: cache':>13} {'no cache':>10} {'speed-up':>9}")
    for i, L in enumerate(lengths):
        how = "sum of steps"
        print(f"{L:7d} {with_cache['step'][i] * 1e3:10.1f}ms {without['step'][i] * 1e3:8.1f}ms "
              f"{without['step'][i] / with_cache['step'][i]:8.1f}x   {with_cache['total'][i]:11.1f}s "
              f"{without['total'][i]:9.1f}s {without['total'][i] / with_cache['total'][i]:8.1f}x   ({how})")
    for L in lengths:
        if (L, True) in measured:
            est_c = total_from_steps(lengths, with_cache["step"], L)
            est_n = total_from_steps(lengths, without["step"], L)
            print(f"check at {L}: sum of steps predicts {est_c:.1f}s / {est_n:.1f}s, "
                  f"generate() took {measured[(L, True)]:.1f}s / {measured[(L, False)]:.1f}s")

    from scratchlm.plots import plot_kv_cache

    print("wrote", plot_kv_cache(lengths, with_cache, without, args.out,
                                 title=f"GPT-2 124M on CPU ({args.threads} threads): decoding with and without a KV cache"))


if __name__ == "__main__":
    main()
