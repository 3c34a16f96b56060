"""Evaluation speed: scratchlm against lm-evaluation-harness's `hf` backend, same model, same data.

Two workloads, each run by both in one process, interleaved round by round (so a busy
machine slows them alike), 2 threads:

    multiple choice   N items with 4 choices (default 1,000): a context of ~40 words from a
                      docstring of Python's standard library, its next ~8 words and three
                      endings of other docstrings. lm-eval: a local YAML task over the JSONL,
                      run by simple_evaluate; scratchlm: evaluate_choices on the same file.
    bits per byte     rolling log-likelihood over MB of the same docstrings (default 1 MB):
                      lm-eval's loglikelihood_rolling task, scratchlm's bits_per_byte.

The model is a random GPT-2 from transformers (4 layers, d_model 256, context 512) with
a BPE of 8,192 tokens trained here on the docstrings (no download); its weights are
scaled up so that the log-likelihoods are far from uniform. Both read the same saved
directory; the scores are checked equal (log-likelihoods within 1e-4, accuracy exactly).

    python benchmarks/eval.py                   # 1,000 items, 1 MB, 2 rounds
    python benchmarks/eval.py --items 200 --mb 0.2 --rounds 1   # quicker

Needs the eval extra (pip install -e '.[eval]').
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch


def build_model(directory: Path, docs: list[str], vocab_size: int = 8192) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                  bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(hf_tok), n_positions=512, n_embd=256, n_layer=4, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(directory)
    hf_tok.save_pretrained(directory)


def build_data(directory: Path, docs: list[str], items: int, mb: float) -> None:
    rng = random.Random(0)
    long = [d.split() for d in docs if len(d.split()) >= 50]
    rows = []
    for i in range(items):
        words = long[i % len(long)]
        others = rng.sample([w for j, w in enumerate(long) if j != i % len(long)][:500], 3)
        ending = " ".join(words[40:48])
        choices = [ending] + [" ".join(o[40:48]) for o in others]
        rng.shuffle(choices)
        rows.append({"context": " ".join(words[:40]), "choices": choices, "label": choices.index(ending)})
    (directory / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts, size = [], 0
    for d in docs:
        if size >= mb * 1e6:
            break
        texts.append(d)
        size += len(d.encode())
    (directory / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tasks = directory / "tasks"
    tasks.mkdir(exist_ok=True)
    mc = ('output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
          'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    rolling = 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: bits_per_byte\n'
    for name, body in (("bench_mc", mc), ("bench_text", rolling)):
        data = "mc" if name == "bench_mc" else "text"
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  cache_dir: {directory / 'cache'}\n"
            f"  data_files:\n    test: {directory / data}.jsonl\ntest_split: test\n" + body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="both tools' batch size (default 32)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from scratchlm.corpus import python_docs
    from scratchlm.eval import load_model
    from scratchlm.eval.bpb import bits_per_byte
    from scratchlm.eval.multiple_choice import evaluate_choices
    from scratchlm.eval.tasks import load_task_file

    work = Path(tempfile.mkdtemp(prefix="scratchlm-bench-eval-"))
    docs = python_docs()
    build_model(work / "model", docs[:3000])
    build_data(work, docs, args.items, args.mb)
    texts = [json.loads(line)["text"] for line in (work / "text.jsonl").read_text().splitlines()]
    task = load_task_file(work / "mc.jsonl")
    manager = TaskManager(include_path=str(work / "tasks"), include_defaults=False)
    hf = HFLM(pretrained=str(work / "model"), batch_size=args.batch_size, device="cpu")
    model, tokenizer = load_model(work / "model")
    print(f"{args.items} items x 4 choices, {sum(len(t.encode()) for t in texts) / 1e6:.2f} MB of text, "
          f"batch size {args.batch_size}, {args.threads} threads", file=sys.stderr)

    def lm_eval_run(name):
        out = lm_eval.simple_evaluate(model=hf, tasks=[name], task_manager=manager, log_samples=True,
                                      verbosity="ERROR")
        return out

    times = {k: [] for k in ("mc_hf", "mc_ours", "bpb_hf", "bpb_ours")}
    for _ in range(args.rounds):
        t = time.perf_counter(); ref_mc = lm_eval_run("bench_mc"); times["mc_hf"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours_mc = evaluate_choices(model, tokenizer, task, batch_size=args.batch_size)
        times["mc_ours"].append(time.perf_counter() - t)
        t = time.perf_counter(); ref_bpb = lm_eval_run("bench_text"); times["bpb_hf"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours_bpb = bits_per_byte(model, tokenizer, texts, batch_size=args.batch_size)
        times["bpb_ours"].append(time.perf_counter() - t)

    ref_lls = [[float(r[0][0]) for r in s["resps"]] for s in sorted(ref_mc["samples"]["bench_mc"],
                                                                         key=lambda s: s["doc_id"])]
    worst = max(abs(a - b) for ra, rb in zip(ref_lls, (d["loglikelihoods"] for d in ours_mc.details))
                for a, b in zip(ra, rb))
    ref_acc = ref_mc["results"]["bench_mc"]["acc,none"]
    ref_norm = ref_mc["results"]["bench_mc"]["acc_norm,none"]
    ref_b = ref_bpb["results"]["bench_text"]["bits_per_byte,none"]
    mc_hf, mc_ours = statistics.median(times["mc_hf"]), statistics.median(times["mc_ours"])
    b_hf, b_ours = statistics.median(times["bpb_hf"]), statistics.median(times["bpb_ours"])
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"multiple choice: lm-eval hf {args.items / mc_hf:7.1f} items/s  scratchlm {args.items / mc_ours:7.1f} "
          f"items/s  ratio {mc_hf / mc_ours:.2f}x   acc {ref_acc:.4f} vs {ours_mc.metrics['acc']:.4f}, "
          f"acc_norm {ref_norm:.4f} vs {ours_mc.metrics['acc_norm']:.4f}, max |dll| {worst:.1e}")
    print(f"bits per byte:   lm-eval hf {mb / b_hf:7.3f} MB/s     scratchlm {mb / b_ours:7.3f} MB/s     "
          f"ratio {b_hf / b_ours:.2f}x   bpb {ref_b:.6f} vs {ours_bpb.bits_per_byte:.6f}")
    print(f"(median of {args.rounds} interleaved rounds; model load and task building not timed)")


if __name__ == "__main__":
    main()
