"""Post-training throughput against TRL, on the same model and data, in the same run.

    .venv/bin/python benchmarks/posttrain.py                 # DPO: 8 pairs per step, 6 timed rounds
    .venv/bin/python benchmarks/posttrain.py --dpo-steps 10 --hidden 512
    .venv/bin/python benchmarks/posttrain.py --precompute   # both: reference log-probs once, up front
    .venv/bin/python benchmarks/posttrain.py --prompt-length 96  # prompts 3x the responses, as in HH-RLHF

DPO (``bench_dpo``): a transformers Llama with random weights is the policy; its weights
are imported into scratchlm (hf.from_hf_model) so both trainers start from the same
numbers, and the reference is a frozen copy on both sides (or, with --precompute, its
log-probs are computed once before training, on both sides). The same pairs, in the same
order, go to scratchlm's training core (DPOTask, one ``Trainer.train_step`` per step) and to
TRL's DPOTrainer (``training_step``, gradient clipping and the AdamW step, as its train loop
does them). Same settings: AdamW (no weight decay, constant learning rate), clip 1.0, fp32.

- Speed: the two alternate step by step (ours, TRL, ours, TRL, ...) so load from other
  work on the machine hits both alike; median seconds per step after one warm-up step.
- Losses: the first steps' losses side by side: equal losses mean the same computation.
- Threads: OpenMP as a user has it (libgomp's default wait policy: spin, then sleep). With
  OMP_WAIT_POLICY=PASSIVE every parallel region wakes its threads from sleep and both
  trainers are ~1.7x slower here, ours most (it runs more, smaller kernels).

Each trainer is a function ``bench_<trainer>(args) -> dict``; ``main`` runs those asked for.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz .,:;?"
SPECIALS = ["<|endoftext|>"]


def make_pairs(n: int, seed: int, length: int, prompt_length: int | None = None) -> list[dict]:
    """n pairs of random text: responses of length/2 .. length characters, prompts of
    prompt_length/2 .. prompt_length (default: as long as the responses)."""
    rng = random.Random(seed)
    prompt_length = prompt_length or length

    def text(k):
        return "".join(rng.choice(LETTERS) for _ in range(k))

    return [{"prompt": text(rng.randint(prompt_length // 2, prompt_length)),
             "chosen": text(rng.randint(length // 2, length)),
             "rejected": text(rng.randint(length // 2, length))} for _ in range(n)]


def hf_char_tokenizer(tok):
    """A transformers tokenizer with scratchlm CharTokenizer ``tok``'s ids: a BPE without merges."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIALS[0], pad_token=SPECIALS[0])
    assert hf.convert_tokens_to_ids(SPECIALS[0]) == tok.eot_id
    return hf


def dpo_setup(args):
    """(our_step, trl_step(i), policy): the two trainers on the same model and pairs, each
    step function doing one optimizer step and returning its loss (bench_dpo times them)."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from scratchlm.checkpoint import save_model
    from scratchlm.hf import from_hf_model
    from scratchlm.posttrain import DPOConfig, DPOTask
    from scratchlm.posttrain.preference_data import pair_order, split_pairs
    from scratchlm.tokenizer import CharTokenizer
    from scratchlm.train.core import Trainer
    from scratchlm.train.metrics import Window

    tok = CharTokenizer.train(LETTERS, special_tokens=SPECIALS)
    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                            num_key_value_heads=args.hidden // 64,
                            max_position_embeddings=4 * max(args.length, args.prompt_length or 0),
                            tie_word_embeddings=False, attn_implementation="sdpa")
    policy = LlamaForCausalLM(hf_config).float()
    reference = LlamaForCausalLM(hf_config).float()
    reference.load_state_dict(policy.state_dict())
    n_steps = args.dpo_steps + 1
    rows = make_pairs(args.batch * n_steps, seed=1, length=args.length, prompt_length=args.prompt_length)

    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    base = work / "base"
    save_model(base, from_hf_model(policy), tok)
    data = work / "pairs.jsonl"
    import json

    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lr = 1e-4
    cfg = DPOConfig.from_dict(dict(model=str(base), data=str(data), out_dir=str(work / "ours"), template="raw",
                                   batch_size=args.batch, max_steps=n_steps, lr=lr, min_lr=lr, warmup_steps=0,
                                   weight_decay=0.0, val_fraction=0.0, beta=0.1, progress=False, plot=False,
                                   eval_every=10**6, save_every=10**6, threads=args.threads, device="cpu",
                                   precompute_ref=args.precompute))
    ours = Trainer(cfg, DPOTask(cfg, quiet=True), quiet=True)
    # TRL sees the pairs in the order our core draws them: the split's shuffle, then epoch 0's.
    train, _ = split_pairs(rows, 0.0, cfg.seed)
    trl_rows = [train[i] for i in pair_order(len(train), cfg.seed, 0)]
    trl_args = TRLConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch, learning_rate=lr,
                         lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                         max_length=None, gradient_checkpointing=False, report_to="none", use_cpu=True, bf16=False,
                         max_steps=n_steps, logging_steps=1, adam_beta2=0.999,
                         precompute_ref_log_probs=args.precompute)
    trl = DPOTrainer(model=policy, ref_model=reference, args=trl_args, train_dataset=Dataset.from_list(trl_rows),
                     processing_class=hf_char_tokenizer(tok))
    trl.create_optimizer_and_scheduler(num_training_steps=n_steps)
    trl.current_gradient_accumulation_steps = 1  # what its train loop sets before each step
    trl.model.train()
    torch.set_num_threads(args.threads)

    def our_step():
        window = Window(0)
        ours.train_step(window)
        return float(window.losses[-1])

    def trl_step(i):
        batch = trl.data_collator([trl.train_dataset[j] for j in range(i * args.batch, (i + 1) * args.batch)])
        loss = trl.training_step(trl.model, batch)
        torch.nn.utils.clip_grad_norm_(trl.model.parameters(), 1.0)
        trl.optimizer.step()
        trl.lr_scheduler.step()
        trl.model.zero_grad(set_to_none=True)
        return float(loss)

    return our_step, trl_step, policy


def bench_dpo(args) -> dict:
    our_step, trl_step, policy = dpo_setup(args)
    n_steps = args.dpo_steps + 1
    times = {"scratchlm": [], "trl": []}
    losses = {"scratchlm": [], "trl": []}
    for i in range(n_steps):
        for name in ("scratchlm", "trl"):
            start = time.perf_counter()
            loss = our_step() if name == "scratchlm" else trl_step(i)
            if i:  # the first step of each warms up
                times[name].append(time.perf_counter() - start)
            losses[name].append(loss)
    steps_per_s = {k: 1 / statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in policy.parameters())
    pl = args.prompt_length or args.length
    print(f"DPO: Llama {args.layers} x {args.hidden} ({params / 1e6:.1f}M parameters, random weights), "
          f"{args.batch} pairs per step (prompts {pl // 2}-{pl}, responses {args.length // 2}-{args.length} tokens), "
          f"CPU {args.threads} "
          f"threads, fp32, reference {'precomputed' if args.precompute else 'a frozen copy'}; median of "
          f"{args.dpo_steps} alternating steps")
    print(f"{'':10} {'steps/s':>8} {'s/step':>7}   first losses")
    for k in ("scratchlm", "trl"):
        print(f"{k:10} {steps_per_s[k]:>8.2f} {1 / steps_per_s[k]:>7.3f}   "
              + " ".join(f"{v:.6f}" for v in losses[k][:4]))
    diff = max(abs(a - b) for a, b in zip(losses["scratchlm"][:4], losses["trl"][:4]))
    print(f"scratchlm / TRL: x{steps_per_s['scratchlm'] / steps_per_s['trl']:.2f} steps/s; "
          f"largest loss difference over the first 4 steps {diff:.2e}")
    return {"steps_per_s": steps_per_s, "losses": losses, "loss_diff": diff}


BENCHES = {"dpo": bench_dpo}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only these (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="DPO: pairs per step")
    ap.add_argument("--length", type=int, default=32, help="DPO: response lengths (and by default prompt lengths), in characters")
    ap.add_argument("--prompt-length", type=int, default=None,
                    help="DPO: prompt lengths, in characters (default: --length). Preference sets with "
                    "multi-turn context (HH-RLHF) have prompts longer than their responses: 96 with --length 32")
    ap.add_argument("--dpo-steps", type=int, default=6, help="DPO: timed steps per trainer (after one warm-up)")
    ap.add_argument("--precompute", action="store_true", help="DPO: reference log-probs computed once, up front "
                    "(ours: --precompute-ref; TRL: precompute_ref_log_probs), not timed")
    args = ap.parse_args()
    for name in args.only or BENCHES:
        BENCHES[name](args)


if __name__ == "__main__":
    main()
