"""Full fine-tuning vs LoRA on GPT-2 124M (random weights, CPU): tokens/s and peak memory.

    .venv/bin/python benchmarks/finetune.py                      # batch 2 x 256, 4 timed steps each
    .venv/bin/python benchmarks/finetune.py --batch 4 --seq 128 --steps 6

Every variant does the same per step: forward + masked cross-entropy + backward + AdamW
step, on one batch of the same shape (half of each row masked as "prompt").

- Speed: both variants live in one process and their steps alternate (full, lora, full,
  lora, ...), so load from other work on the machine hits both alike; median step time.
- Memory: peak resident set size only grows, so each variant also runs in a fresh process
  (one warm-up + one step) and reports its peak RSS and the part added by training (peak
  minus RSS once the model is built). The analytic count next to it: weights + gradients
  + AdamW's two moments, 4 bytes each, for the numbers that train.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LORA_TARGETS = ["qkv_proj", "out_proj", "up_proj", "down_proj"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(variant: str, rank: int, base=None):
    import torch

    from scratchlm import ModelConfig, Transformer
    from scratchlm.lora import apply_lora

    if base is None:
        torch.manual_seed(0)
        base = Transformer(ModelConfig.preset("gpt2"))
    model = copy.deepcopy(base).train()
    if variant == "lora":
        apply_lora(model, rank=rank, alpha=2 * rank, targets=LORA_TARGETS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    return model, opt


def batch_of(batch: int, seq: int):
    import torch

    ids = torch.randint(0, 50257, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[:, : seq // 2] = -100  # half of each row is "prompt": masked like instruction data
    return x, y


def step(model, opt, x, y) -> float:
    from scratchlm.finetune.instruct import masked_loss

    start = time.perf_counter()
    masked_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def memory_child(variant: str, batch: int, seq: int, rank: int, threads: int) -> dict:
    import torch

    from scratchlm.lora import count_parameters

    torch.set_num_threads(threads)
    model, opt = build(variant, rank)
    after_load = rss_mb()
    x, y = batch_of(batch, seq)
    for _ in range(2):
        step(model, opt, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    trainable, total = count_parameters(model)
    frozen = total - trainable
    analytic = (4 * trainable * 4 + 4 * frozen) / 2**20  # trained: weight, grad, 2 moments; frozen: weight
    return {"trainable": trainable, "peak_rss_mb": peak, "training_mb": peak - after_load,
            "state_mb": analytic}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up each)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine every multi-threaded op waits for "
                         "its other threads to be scheduled, which measures the scheduler, not the model)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(memory_child(args.child, args.batch, args.seq, args.rank, args.threads)))
        return

    import torch

    torch.set_num_threads(args.threads)
    variants = ["full", "lora"]
    memory = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--child", v, "--batch", str(args.batch), "--seq", str(args.seq),
               "--rank", str(args.rank), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[v] = json.loads(out.strip().splitlines()[-1])

    full = build("full", args.rank)
    lora = build("lora", args.rank, base=full[0])
    runs = {"full": full, "lora": lora}
    x, y = batch_of(args.batch, args.seq)
    times = {v: [] for v in variants}
    for i in range(args.steps + 1):
        for v in variants:
            t = step(*runs[v], x, y)
            if i:  # the first step of each warms up (allocations, optimizer state)
                times[v].append(t)
    tokens = args.batch * args.seq
    tps = {v: tokens / statistics.median(times[v]) for v in variants}

    print(f"GPT-2 124M, random weights, CPU ({args.threads} threads), batch {args.batch} x {args.seq} tokens, "
          f"AdamW; median of {args.steps} alternating steps")
    print(f"LoRA: rank {args.rank} on {', '.join(LORA_TARGETS)}")
    print(f"{'':5} {'trainable':>12} {'tokens/s':>9} {'s/step':>7} {'peak RSS MB':>12} {'training MB':>12} "
          f"{'weights+grads+AdamW MB':>23}")
    for v in variants:
        m = memory[v]
        print(f"{v:5} {m['trainable']:>12,} {tps[v]:>9.0f} {tokens / tps[v]:>7.2f} {m['peak_rss_mb']:>12.0f} "
              f"{m['training_mb']:>12.0f} {m['state_mb']:>23.0f}")
    print(f"LoRA / full: speed x{tps['lora'] / tps['full']:.2f}, peak RSS x"
          f"{memory['lora']['peak_rss_mb'] / memory['full']['peak_rss_mb']:.2f}, training memory x"
          f"{memory['lora']['training_mb'] / memory['full']['training_mb']:.2f}")


if __name__ == "__main__":
    main()
