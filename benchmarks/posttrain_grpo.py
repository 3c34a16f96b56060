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
- updating: the rest of the step (forward, loss, backward, AdamW); for TRL the time inside
  ``training_step`` less the sampling in it (so neither side counts its set-up).

Rounds alternate (scratchlm, TRL, scratchlm, TRL, ...) in one process, so other load on
the machine hits both alike; the medians are reported, and their ratios.
"""

from __future__ import annotations

import argparse
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
    hf_tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    hf_tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=hf_tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf_tok.padding_side = "left"
    sample = "Question: Ada has 3 pears.\nAnswer:"
    assert hf_tok(sample)["input_ids"] == tok.encode(sample), "the two tokenizers must agree"
    hf_tok.save_pretrained(root / "hf")
    return root / "scratch", root / "hf", hf_tok


def scratchlm_round(model_dir: Path, args, out: Path) -> tuple[float, float, int, float]:
    """(sampling seconds, update seconds, completions, wall seconds) of one run of args.steps steps."""
    from scratchlm.posttrain.grpo import GRPOConfig, GRPOTask
    from scratchlm.train.core import Trainer

    cfg = GRPOConfig(model=str(model_dir), task="arithmetic", template="raw", batch_size=args.prompts,
                     group_size=args.group, max_new_tokens=args.tokens, temperature=1.0, max_steps=args.steps,
                     lr=1e-5, loss_type="grpo", eval_every=10_000, eval_prompts=1, n_samples=0, progress=False,
                     plot=False, device="cpu", threads=args.threads, out_dir=str(out), format_weight=0.0)
    task = GRPOTask(cfg, quiet=True)
    start = time.perf_counter()
    Trainer(cfg, task, quiet=True).run()
    wall = time.perf_counter() - start
    # the task's running totals, complete once the run is over (the last update included)
    return task.times["sample_time_s"], task.times["update_time_s"], args.steps * args.prompts * args.group, wall


def dataset_of(rows: list[dict]):
    """A datasets.Dataset of ``rows``. Some datasets / pyarrow pairs cannot hash a table for
    its fingerprint (a PicklingError): then the fingerprint is a random one, as datasets
    itself does for what it cannot hash."""
    import pickle

    import datasets.arrow_dataset
    from datasets import Dataset
    from datasets.fingerprint import generate_random_fingerprint

    try:
        return Dataset.from_list(rows)
    except pickle.PicklingError:
        datasets.arrow_dataset.generate_fingerprint = lambda dataset: generate_random_fingerprint()
        return Dataset.from_list(rows)


def trl_round(hf_dir: Path, hf_tok, prompts: list[dict], args, out: Path):
    import torch
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
                          train_dataset=dataset_of(prompts), processing_class=hf_tok)
    timers = {"sampling": 0.0, "step": 0.0}

    def timed(name, inner):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                timers[name] += time.perf_counter() - t
        return run

    # A training step samples (inside _prepare_inputs, once per generation batch) and updates.
    trainer._generate_and_score_completions = timed("sampling", trainer._generate_and_score_completions)
    trainer.training_step = timed("step", trainer.training_step)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return timers["sampling"], timers["step"] - timers["sampling"], args.steps * n, total


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
