"""`scratchlm demo`: prepare Python's docstrings, train a small model for a fixed time on
the CPU, and print samples before and after. configs/demo.yaml holds the same settings.

The settings were chosen by measuring validation bits per byte at an equal compute budget
(a quarter of the demo's, bf16, on a loaded 2-core AVX-512 BF16 CPU): BPE 2048 d_model 256
x 4 layers 2.28 < BPE d128 x 4 (batch 32) 2.29 < BPE d192 x 4 2.40 << characters d192 x 4
(context 256) 3.86. BPE wins clearly: each token carries ~3.2 bytes, so the same compute
sees 3x more text.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .core import Trainer, TrainResult
from .precision import autocast
from .pretrain import TrainConfig, make_trainer

DEMO_MINUTES = 3.0
# The report card at the end (scored by the eval hook the CLI passes in: eval sits above train):
# bits per byte on the held-out docstrings, and a 4-way choice of docstring endings.
DEMO_EVAL_TASKS = "python-docs:val,python-docs-choice"
DEMO_TOKENIZER = {"tokenizer": "bpe", "vocab_size": 2048}
DEMO_CONFIG = dict(
    model="gpt-small-cpu", context_length=128, d_model=256, n_layers=4, n_heads=8,
    batch_size=16, grad_accum=1, max_steps=100_000, lr=2e-3, min_lr=2e-4, warmup_steps=50,
    weight_decay=0.1, eval_every=50, eval_batches=10, log_every=10, save_every=1000,
    sample_tokens=48, precision="auto", sampler="random",
)


def pick_threads(trainer: Trainer) -> int:
    """The faster of torch's default thread count and 1, timed on a forward + backward pass
    of a copy of the model (training state untouched). On an idle machine that is the
    default; on a busy one a single thread can be several times faster, because OpenMP
    threads wait at every barrier for a sibling the OS has descheduled."""
    default = torch.get_num_threads()
    if default == 1 or trainer.device.type != "cpu":
        return default
    model = copy.deepcopy(trainer.raw_model)
    x, y = trainer.task.batches.micro_batch(0, 0)
    best: dict[int, float] = {}
    for threads in (default, 1, default, 1):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        with autocast(trainer.device, trainer.autocast_dtype):
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        best[threads] = min(best.get(threads, math.inf), time.perf_counter() - start)
    choice = min(best, key=best.get)
    torch.set_num_threads(choice)
    return choice


def demo(minutes: float = DEMO_MINUTES, out: str = "runs/demo", data: str = "data/python-docs",
         threads: int | None = None, overrides: dict | None = None, eval_hook=None) -> TrainResult:
    """Prepare, train, sample; with ``eval_hook`` (eval/train_hook.py) also score
    DEMO_EVAL_TASKS at the end and write the report to ``out/eval``."""
    from ..data import load_meta, prepare
    from ..errors import ScratchLMError

    data_dir = Path(data)
    try:
        meta = load_meta(data_dir)
        ready = (meta.get("source"), meta.get("tokenizer"), meta.get("requested_vocab_size")) == (
            "python-docs", DEMO_TOKENIZER["tokenizer"], DEMO_TOKENIZER.get("vocab_size"))
    except (FileNotFoundError, ScratchLMError, ValueError):
        ready = False
    if not ready:
        print(f"preparing the built-in corpus (Python's docstrings) into {data_dir} ...")
        t0 = time.perf_counter()
        prepare(corpus="python-docs", out_dir=data_dir, **DEMO_TOKENIZER)
        print(f"  done in {time.perf_counter() - t0:.0f}s")
    meta = load_meta(data_dir)
    print(f"corpus: {meta['splits']['train']['tokens']:,} train tokens, {meta['splits']['val']['tokens']:,} "
          f"val tokens, vocabulary {meta['vocab_size']:,}")
    evals = {"eval_tasks": DEMO_EVAL_TASKS} if eval_hook is not None else {}
    cfg = TrainConfig.from_dict({**DEMO_CONFIG, "data": str(data_dir), "out_dir": out, "max_minutes": minutes,
                                 "threads": threads, **evals, **(overrides or {})})
    trainer = make_trainer(cfg, eval_hook=eval_hook)
    if threads is None:
        pick_threads(trainer)
    n = trainer.raw_model.num_parameters()
    print(f"model: {n / 1e6:.2f}M parameters, {cfg.n_layers} layers, d_model {cfg.d_model}, context "
          f"{cfg.context_length}; precision: {'bf16 autocast' if trainer.autocast_dtype else 'fp32'}; "
          f"{torch.get_num_threads()} threads; {minutes:g} minutes")
    prompts = ("", "Return the")  # a new docstring from scratch, and one with a start
    sample = trainer.task.generate_sample
    for prompt in prompts[:1]:
        print(f"\n--- sample before training ---\n{sample(trainer.raw_model, 120, prompt)}\n")
    result = trainer.run()
    print(f"\n--- samples after training ({result.step} steps, {result.tokens:,} tokens) ---")
    for prompt in prompts:
        print(f"{sample(trainer.raw_model, 120, prompt)}\n")
    if result.val_loss is not None:
        print(f"final validation loss: {result.val_loss:.4f} nats/token = {result.val_bpb:.3f} bits/byte "
              f"(perplexity {math.exp(result.val_loss):.1f})")
    if result.eval_scores:
        print("report card: " + ", ".join(f"{k} {v:.3f}" for k, v in result.eval_scores.items())
              + f" (random choice: 0.25); {Path(out) / 'eval' / 'report.md'}")
    print(f"wrote {Path(out)}/: latest/ (checkpoint), best/, metrics.jsonl, loss.png"
          + (", eval/ (report.md, report.json, scores.png)" if result.eval_scores else ""))
    return result


__all__ = ["DEMO_EVAL_TASKS", "DEMO_MINUTES", "DEMO_TOKENIZER", "DEMO_CONFIG", "pick_threads", "demo"]
