"""Each model family against transformers: batch-1 decode tokens/s and training tokens/s.

One row of ``MODELS`` per family: (name, scratchlm preset, the transformers class that
runs the same weights). The transformers model is built from the config scratchlm exports
(hf.hf_config_dict) and given the same random weights (hf.to_hf_state_dict), so both sides
compute the same function. They run interleaved, round by round, in one process, so that
a busy machine slows them alike; each figure is the median over the rounds.

    decode   greedy, batch 1: a 32-token prompt, then --new tokens; tokens/s of the new ones,
             for the model as trained and for its fp32 decode layout (what `generate` runs)
             (scratchlm.generate with its KV cache vs transformers .generate(use_cache=True))
    train    forward + loss + backward + fused AdamW step on (--batch, --seq) random tokens;
             tokens/s (each side's own training loss: see train_step)

    python benchmarks/families.py                    # the smallest preset of each family, 2 threads
    python benchmarks/families.py --quick            # the tiny CPU presets, few tokens: a smoke run
    python benchmarks/families.py --models qwen3-0.6b --rounds 5
    python benchmarks/families.py --models moe-small   # the mixture of experts only

A new family is one more row of MODELS. The mixture of experts has no small published
model (the smallest, Qwen3-30B-A3B, does not fit a CPU benchmark): its row is Qwen3-MoE's
architecture at the size of benchmarks/moe.py's, 8 layers of d_model 512 with 8 experts of
hidden size 1024, 2 per token (114M parameters, 39M active), against Qwen3MoeForCausalLM.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.decode_weights import prepare_for_decode
from scratchlm.generate import generate
from scratchlm.hf import hf_config_dict, to_hf_state_dict

# (name, scratchlm preset, transformers class): the smallest published model of each family,
# then the tiny CPU presets for --quick.
MODELS: list[tuple[str, str, str]] = [
    ("qwen3-0.6b", "qwen3-0.6b", "Qwen3ForCausalLM"),
    ("gemma3-270m", "gemma3-270m", "Gemma3ForCausalLM"),
    ("olmo2-1b", "olmo2-1b", "Olmo2ForCausalLM"),
    ("moe-small", "qwen3-moe-tiny", "Qwen3MoeForCausalLM"),  # resized by SHAPES
    ("qwen3-tiny", "qwen3-tiny", "Qwen3ForCausalLM"),
    ("gemma3-tiny", "gemma3-tiny", "Gemma3ForCausalLM"),
    ("olmo2-tiny", "olmo2-tiny", "Olmo2ForCausalLM"),
    ("qwen3-moe-tiny", "qwen3-moe-tiny", "Qwen3MoeForCausalLM"),
]
# Rows that change their preset's sizes: a small mixture of experts, benchmarks/moe.py's size.
SHAPES: dict[str, dict] = {
    "moe-small": dict(vocab_size=8192, context_length=512, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                      n_experts=8, experts_per_token=2, d_ff_expert=1024),
}
QUICK = ["qwen3-tiny", "gemma3-tiny", "olmo2-tiny", "qwen3-moe-tiny"]
DEFAULT = ["qwen3-0.6b", "gemma3-270m", "moe-small"]


def build_pair(preset: str, hf_class: str, context: int, shape: dict | None = None):
    """(scratchlm model, transformers model) in fp32 with the same random weights."""
    import transformers

    config = ModelConfig.preset(preset, dtype="float32").replace(**(shape or {}))
    # A short context keeps the rope tables small; never shorter than the sliding window.
    config = config.replace(context_length=min(config.context_length, max(context, config.sliding_window or 0)))
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    if config.n_experts:  # transformers >= 5 stacks the hub's per-expert tensors as it reads a directory
        import tempfile

        from scratchlm.hf import save_hf

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(tmp, ours)
            return ours, getattr(transformers, hf_class).from_pretrained(tmp, dtype=torch.float32).eval()
    hf_config = transformers.AutoConfig.for_model(**hf_config_dict(config))
    theirs = getattr(transformers, hf_class)(hf_config).eval()
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(state, config), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    theirs.tie_weights()
    return ours, theirs


def decode_ours(model, prompt, new):
    generate(model, None, [prompt], max_new_tokens=new, ignore_eos=True)


def decode_hf(model, prompt, new):
    ids = torch.tensor([prompt])
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                   min_new_tokens=new, eos_token_id=None, pad_token_id=0)


def train_step(model, optimizer, ids, hf: bool, plain_loss: bool = False):
    # Each side's own training loss, the mean next-token cross-entropy over the B * (T - 1)
    # positions that have a next token: transformers' labels= (ForCausalLMLoss: the logits,
    # shifted), scratchlm's targets= (the head and the loss in one step, loss.py).
    if hf:
        loss = model(ids, labels=ids).loss
    elif plain_loss:  # --plain-loss: the loss of scratchlm's full logits, to see what loss.py buys
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        loss = model(ids, targets=torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name, preset, hf_class, args) -> dict:
    ours, theirs = build_pair(preset, hf_class, context=args.prompt + args.new + args.seq + 8, shape=SHAPES.get(name))
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    # What `scratchlm generate` runs on an fp32 model: the transposed fp32 decode layout (a
    # copy, since it replaces the Linears in place and the training rounds below need them).
    ours_decode = prepare_for_decode(copy.deepcopy(ours), "fp32")
    times = {"decode ours": [], "decode layout": [], "decode hf": [], "train ours": [], "train hf": []}
    if args.only != "train":
        with torch.inference_mode():  # warm-up
            decode_ours(ours, prompt, 2)
            decode_ours(ours_decode, prompt, 2)
            decode_hf(theirs, prompt, 2)
    for _ in range(args.rounds if args.only != "train" else 0):  # interleaved
        with torch.inference_mode():
            times["decode ours"].append(timed(lambda: decode_ours(ours, prompt, args.new)))
            times["decode layout"].append(timed(lambda: decode_ours(ours_decode, prompt, args.new)))
            times["decode hf"].append(timed(lambda: decode_hf(theirs, prompt, args.new)))
    opts = {}
    for side, model in (("ours", ours), ("hf", theirs)):
        model.train()
        # fused AdamW on both sides: what scratchlm's loop (train/optim.py) and transformers'
        # Trainer (optim="adamw_torch_fused", its default on torch >= 2.8) both run.
        opts[side] = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        train_step(model, opts[side], batch, side == "hf", args.plain_loss)  # warm-up (and the optimizer's state)
    for _ in range(args.rounds if args.only != "decode" else 0):
        times["train ours"].append(timed(lambda: train_step(ours, opts["ours"], batch, False, args.plain_loss)))
        times["train hf"].append(timed(lambda: train_step(theirs, opts["hf"], batch, True)))
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    return {"model": name, "params": ours.num_parameters(),
            "decode ours": args.new / med["decode ours"], "decode layout": args.new / med["decode layout"],
            "decode hf": args.new / med["decode hf"],
            "train ours": batch.numel() / med["train ours"], "train hf": batch.numel() / med["train hf"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"rows of MODELS (default {DEFAULT})")
    parser.add_argument("--quick", action="store_true", help="the tiny presets, few tokens and rounds")
    parser.add_argument("--only", choices=["decode", "train"], help="run only the decode or the training rounds")
    parser.add_argument("--plain-loss", action="store_true",
                        help="train: scratchlm takes F.cross_entropy of its full logits instead of targets=")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    if args.quick:
        args.models = args.models or QUICK
        args.new, args.seq, args.rounds = 32, 64, 3
    torch.set_num_threads(args.threads)
    rows = {name: (preset, cls) for name, preset, cls in MODELS}
    print(f"{args.threads} threads, {args.rounds} rounds (median), fp32, random weights")
    print("decode: ours = the model as trained (nn.Linear); layout = prepare_for_decode(model, 'fp32'),")
    print("        what `scratchlm generate` runs on an fp32 model; ratios are against transformers")
    print(f"{'model':14s} {'params':>13s} | {'decode tok/s ours':>17s} {'layout':>7s} {'hf':>8s} {'ratio':>6s} "
          f"{'layout':>6s} | "
          f"{'train tok/s ours':>16s} {'hf':>8s} {'ratio':>6s}")
    for name in args.models or DEFAULT:
        r = bench(name, *rows[name], args)
        print(f"{name:14s} {r['params']:>13,} | {r['decode ours']:>17.1f} {r['decode layout']:>7.1f} "
              f"{r['decode hf']:>8.1f} {r['decode ours'] / r['decode hf']:>5.2f}x "
              f"{r['decode layout'] / r['decode hf']:>5.2f}x | {r['train ours']:>16.1f} {r['train hf']:>8.1f} "
              f"{r['train ours'] / r['train hf']:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
