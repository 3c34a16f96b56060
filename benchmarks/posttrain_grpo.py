"""GRPO samples/s, sampling and updating apart: scratchlm against TRL's GRPOTrainer.

    .venv/bin/python benchmarks/posttrain_grpo.py                 # 3 rounds x 4 steps each, 2 threads
    .venv/bin/python benchmarks/posttrain_grpo.py --rounds 2 --steps 2 --preset gpt-tiny

Both sides train the same model (a tiny Llama with random weights, scratchlm's preset
written as a Hugging Face directory for TRL) with the same character tokenizer (the same
ids for the same text), on the same arithmetic prompts, with the same reward function
(scratchlm's ``correct_reward`` has TRL's signature), G completions per prompt, the same
completion length and sampling temperature, one update per batch of samples, no KL.

- sampling: scratchlm's ``sample_time_s`` (generate, score, record); TRL's time inside
  ``_generate_and_score_completions`` (transformers' generate, score, advantages);
- updating: the rest of the step (forward, loss, backward, AdamW).

Rounds alternate (scratchlm, TRL, scratchlm, TRL, ...) in one process, so other load on
the machine hits both alike; the medians are reported, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?#+=-'\n()"


def build_models(root: Path, preset: str):
    """A scratchlm model dir and the same weights as a Hugging Face dir with a char tokenizer."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from scratchlm import ModelConfig, Transformer
    from scratchlm.checkpoint import save_model
    from scratchlm.hf import save_hf
    from scratchlm.tokenizer import CharTokenizer

    tok = CharTokenizer.train(LETTERS, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=tok.vocab_size, context_length=128))
    save_model(root / "scratch", model, tok)
    save_hf(root / "hf", model)
    vocab = {c: i for c, i in tok.char_to_id.items()} | tok.special_tokens
    hf_tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    hf_tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?s)."), behavior="isolated")  # one token per character
    hf_tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=hf_tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf_tok.padding_side = "left"
    sample = "Question: Ada has 3 pears.\nAnswer:"
    assert hf_tok(sample)["input_ids"] == tok.encode(sample), "the two tokenizers must agree"
    hf_tok.save_pretrained(root / "hf")
    return root / "scratch", root / "hf", hf_tok


def scratchlm_round(model_dir: Path, args, out: Path) -> tuple[float, float, int]:
    """(sampling seconds, update seconds, completions) of one run of args.steps steps."""
    from scratchlm.posttrain.grpo import GRPOConfig, grpo

    cfg = GRPOConfig(model=str(model_dir), task="arithmetic", template="raw", batch_size=args.prompts,
                     group_size=args.group, max_new_tokens=args.tokens, temperature=1.0, max_steps=args.steps,
                     lr=1e-5, loss_type="grpo", eval_every=10_000, eval_prompts=1, n_samples=0, progress=False,
                     plot=False, device="cpu", threads=args.threads, out_dir=str(out), format_weight=0.0)
    start = time.perf_counter()
    grpo(cfg, quiet=True)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]
    sampling = last["sample_time_s"]
    evals = [r for r in rows if r["kind"] == "eval"]
    del evals  # the one final evaluation (1 prompt) is part of neither
    return sampling, last["update_time_s"], args.steps * args.prompts * args.group, wall


def trl_round(hf_dir: Path, hf_tok, prompts: list[dict], args, out: Path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from scratchlm.posttrain.rewards import correct_reward

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    n = args.prompts * args.group
    config = TRLConfig(output_dir=str(out), per_device_train_batch_size=n, num_generations=args.group,
                       max_completion_length=args.tokens, temperature=1.0, top_p=1.0, learning_rate=1e-5,
                       beta=0.0, loss_type="grpo", max_steps=args.steps, logging_steps=1, save_strategy="no",
                       report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                       dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=correct_reward, args=config,
                          train_dataset=Dataset.from_list(prompts), processing_class=hf_tok)
    sampling = [0.0]
    inner = trainer._generate_and_score_completions

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            sampling[0] += time.perf_counter() - t

    trainer._generate_and_score_completions = timed
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return sampling[0], total - sampling[0], args.steps * n, total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--tokens", type=int, default=16, help="max completion tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="llama-tiny")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import random

    import torch

    from scratchlm.posttrain.grpo import RAW_PROMPT
    from scratchlm.posttrain.rewards import ArithmeticTask

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    scratch_dir, hf_dir, hf_tok = build_models(root, args.preset)
    problems = ArithmeticTask(max_operand=20, ops="+-", seed=0).train(args.prompts * args.steps * 4, random.Random(0))
    prompts = [{"prompt": RAW_PROMPT.format(question=p.question), "answer": p.answer} for p in problems]
    results = {"scratchlm": [], "trl": []}
    for r in range(args.rounds):
        results["scratchlm"].append(scratchlm_round(scratch_dir, args, root / f"s{r}"))
        results["trl"].append(trl_round(hf_dir, hf_tok, prompts, args, root / f"t{r}"))
        s, t = results["scratchlm"][-1], results["trl"][-1]
        print(f"round {r}: scratchlm sampling {s[0]:.2f}s update {s[1]:.2f}s | TRL sampling {t[0]:.2f}s "
              f"update {t[1]:.2f}s")

    def rates(rows):
        return (statistics.median(n / s for s, _, n, _ in rows), statistics.median(n / u for _, u, n, _ in rows))

    (s_gen, s_upd), (t_gen, t_upd) = rates(results["scratchlm"]), rates(results["trl"])
    print(f"\n{args.preset}, {args.prompts} prompts x {args.group} completions x <= {args.tokens} tokens, "
          f"{args.threads} threads, median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'':12}{'sampling samples/s':>20}{'update samples/s':>20}")
    print(f"{'scratchlm':12}{s_gen:20.1f}{s_upd:20.1f}")
    print(f"{'TRL':12}{t_gen:20.1f}{t_upd:20.1f}")
    print(f"{'ratio':12}{s_gen / t_gen:19.2f}x{s_upd / t_upd:19.2f}x")


if __name__ == "__main__":
    main()
