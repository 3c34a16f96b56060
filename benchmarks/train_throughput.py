"""Training throughput: GPT-2 124M, forward + backward + AdamW step, scratchlm vs peers.

Peers, in the same process, with the same threads, measured round-robin (one step of
each in turn) so that load from other programs hits all of them alike:

- Hugging Face ``transformers.GPT2LMHeadModel`` (SDPA attention)
- ``llms_from_scratch.ch04.GPTModel`` (Raschka's "LLMs from scratch"; untied output
  head, so 163M parameters: its FLOPs are counted for its own MFU)
- scratchlm ``Transformer`` in fp32 and with bf16 autocast (the default on CPUs with
  AVX-512 BF16 / AMX, and on GPUs)

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, with model FLOPs per
token = 6 * parameters (without position embeddings) + 12 * layers * context * d_model
(attention scores and mixing, forward and backward), and the peaks measured here with a
large square matmul in fp32 and in bf16.

    python benchmarks/train_throughput.py                 # CPU, 2 threads, 4 x 256 tokens
    python benchmarks/train_throughput.py --steps 5 --threads 16
    python benchmarks/train_throughput.py --device cuda   # also bf16 + torch.compile

Needs the peers: ``pip install transformers`` and ``pip install --no-deps llms-from-scratch``
(its ch04 module needs only torch), or ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import time

import torch
import torch.nn.functional as F


# ---- the models ----------------------------------------------------------------------------------
def scratchlm_model():
    from scratchlm import ModelConfig, Transformer

    return Transformer(ModelConfig.preset("gpt2"))


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - older transformers: sdpa is already the default
        pass

    class Logits(torch.nn.Module):  # the same call signature as the others: ids -> logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(input_ids=ids, use_cache=False).logits

    return Logits(model)


def lfs_model():
    from llms_from_scratch.ch04 import GPTModel

    cfg = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
           "drop_rate": 0.0, "qkv_bias": True}
    return GPTModel(cfg)


def flops_per_token(model: torch.nn.Module, n_layers=12, d_model=768, context=256) -> float:
    params = sum(p.numel() for p in model.parameters())
    positions = sum(m.weight.numel() for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Embedding) and m.num_embeddings == 1024)
    return 6 * (params - positions) + 12 * n_layers * context * d_model


# ---- measuring -------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of a few n x n x n matrix products (what the hardware can do)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One model + its optimizer; ``step()`` runs one timed training step."""

    def __init__(self, name, build, device, autocast=None, compile=False, optimizer="torch"):
        self.name, self.device, self.autocast = name, device, autocast
        torch.manual_seed(0)
        self.model = build().to(device).train()
        self.flops_per_token = flops_per_token(self.model)
        self.params = sum(p.numel() for p in self.model.parameters())
        if optimizer == "scratchlm":  # what `scratchlm train` uses: decay groups, fused AdamW
            from scratchlm.train import param_groups

            groups = param_groups(self.model, 0.1)
            self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
        else:  # what the peers' own training code uses: plain torch AdamW
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.fn = torch.compile(self.model) if compile else self.model
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, x, y) -> None:
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        _sync(self.device)
        t = time.perf_counter()
        with ctx:
            logits = self.fn(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        self.times.append(time.perf_counter() - t)
        self.losses.append(loss.item())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warmup step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default="", help="comma-separated subset: hf,lfs,fp32,bf16,bf16-compile")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.context} tokens, GPT-2 124M, fwd + bwd + AdamW")
    peak32 = matmul_peak(torch.float32, device)
    peak16 = matmul_peak(torch.bfloat16, device)
    print(f"matmul peak: fp32 {peak32 / 1e9:,.0f} GFLOP/s, bf16 {peak16 / 1e9:,.0f} GFLOP/s "
          f"({peak16 / peak32:.1f}x)")

    specs = {
        "hf": ("HF GPT2LMHeadModel fp32", hf_model, None, False, "torch"),
        "lfs": ("llms_from_scratch GPTModel fp32", lfs_model, None, False, "torch"),
        "fp32": ("scratchlm fp32", scratchlm_model, None, False, "scratchlm"),
        "bf16": ("scratchlm bf16 autocast", scratchlm_model, torch.bfloat16, False, "scratchlm"),
    }
    if device.type == "cuda":
        specs["bf16-compile"] = ("scratchlm bf16 + compile", scratchlm_model, torch.bfloat16, True, "scratchlm")
    chosen = [k for k in (args.only.split(",") if args.only else specs) if k]
    runners = []
    for key in chosen:
        try:
            name, build, autocast, compile, opt = specs[key]
            runners.append(Runner(name, build, device, autocast, compile, opt))
        except ImportError as e:
            print(f"skipping {key}: {e} (see the docstring for how to install the peers)")

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (args.batch, args.context + 1), generator=g).to(device)
               for _ in range(args.steps + 1)]
    for i, batch in enumerate(batches):  # round-robin: step i of every model, then step i + 1
        x, y = batch[:, :-1], batch[:, 1:]
        for r in runners:
            r.step(x, y)
        print(f"  round {i + 1}/{len(batches)} done" + (" (warmup)" if i == 0 else ""), flush=True)

    tokens = args.batch * args.context
    rows = []
    for r in runners:
        t = sorted(r.times[1:])[len(r.times[1:]) // 2]  # median of the timed steps
        tps = tokens / t
        peak = peak16 if r.autocast else peak32
        rows.append((r.name, tps, r.flops_per_token * tps / peak, r.flops_per_token * tps / peak32, r.params))
        del r.model, r.opt
    gc.collect()
    best_peer = max((tps for name, tps, *_ in rows if not name.startswith("scratchlm")), default=None)
    print(f"\n{'model':34s} {'params':>8s} {'tokens/s':>9s} {'MFU':>7s} {'MFU vs fp32 peak':>17s} {'vs best peer':>13s}")
    for name, tps, mfu, mfu32, params in rows:
        ratio = f"{tps / best_peer:.2f}x" if best_peer else "-"
        print(f"{name:34s} {params / 1e6:7.1f}M {tps:9.1f} {mfu:7.1%} {mfu32:17.1%} {ratio:>13s}")
    # Same batches, same initial weights: the first-step losses agree across implementations.
    first = {r.name: r.losses[0] for r in runners}
    print("first-step loss:", ", ".join(f"{k}: {v:.4f}" for k, v in first.items()))


if __name__ == "__main__":
    main()
