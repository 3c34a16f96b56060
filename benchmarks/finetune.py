"""Full fine-tuning vs LoRA on GPT-2 124M (random weights, CPU): tokens/s and peak memory.

    .venv/bin/python benchmarks/finetune.py                      # B=4, T=256, 3 timed steps
    .venv/bin/python benchmarks/finetune.py --batch 2 --seq 128 --steps 2 --rounds 1

Each variant runs in a fresh process (peak RSS only grows, so variants must not share
one), in alternating rounds (full, lora, full, lora, ...) so that load from other work on
the machine hits both alike; the median of the rounds is reported. Every variant does the
same thing per step: forward + masked cross-entropy + backward + AdamW step on one
batch of the same shape. Memory: peak resident set size of the process (ru_maxrss) and
the part of it added by training (peak - RSS after building the model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(variant: str, batch: int, seq: int, steps: int, rank: int, threads: int) -> dict:
    import torch

    from scratchlm import ModelConfig, Transformer
    from scratchlm.finetune.instruct import masked_loss
    from scratchlm.lora import apply_lora, count_parameters

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("gpt2")).train()
    if variant == "lora":
        apply_lora(model, rank=rank, alpha=2 * rank, targets=["qkv_proj", "out_proj", "up_proj", "down_proj"])
    trainable, total = count_parameters(model)
    after_load = rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, 50257, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[:, : seq // 2] = -100  # half of each row is "prompt": masked like instruction data
    times = []
    for step in range(steps + 1):  # the first step warms up (allocations, optimizer state)
        start = time.perf_counter()
        loss = masked_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"variant": variant, "trainable": trainable, "total": total,
            "tokens_per_s": batch * seq / statistics.median(times), "step_s": statistics.median(times),
            "rss_after_load_mb": after_load, "peak_rss_mb": peak, "training_mb": peak - after_load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of full / LoRA runs")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.batch, args.seq, args.steps, args.rank, args.threads)))
        return

    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for variant in runs:
            cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--rank", str(args.rank), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))

    def med(variant, key):
        return statistics.median(r[key] for r in runs[variant])

    print(f"GPT-2 124M, random weights, CPU ({args.threads} threads), batch {args.batch} x {args.seq} tokens, "
          f"AdamW, median of {args.rounds} runs x {args.steps} steps")
    print(f"LoRA: rank {args.rank} on qkv_proj, out_proj, up_proj, down_proj")
    print(f"{'':6} {'trainable params':>17} {'tokens/s':>9} {'s/step':>7} {'peak RSS MB':>12} {'training MB':>12}")
    for v in runs:
        r = runs[v][0]
        print(f"{v:6} {r['trainable']:>17,} {med(v, 'tokens_per_s'):>9.0f} {med(v, 'step_s'):>7.2f} "
              f"{med(v, 'peak_rss_mb'):>12.0f} {med(v, 'training_mb'):>12.0f}")
    print(f"LoRA / full: speed x{med('lora', 'tokens_per_s') / med('full', 'tokens_per_s'):.2f}, "
          f"peak memory x{med('lora', 'peak_rss_mb') / med('full', 'peak_rss_mb'):.2f}, "
          f"training memory x{med('lora', 'training_mb') / med('full', 'training_mb'):.2f}")


if __name__ == "__main__":
    main()
