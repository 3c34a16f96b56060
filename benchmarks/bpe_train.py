"""Train a byte-level BPE vocabulary with our pure-Python fast trainer and with the Rust
trainers (Hugging Face `tokenizers`, and `rustbpe` when installed), side by side.

The text (``--corpus``), the same list of documents for every trainer, pre-split with
the same GPT-4 regex:

- ``source`` (default): the .py files under Python's stdlib directory (docstrings,
  comments and code; sorted paths, site-packages skipped), one document per file, the
  first ``--mb`` megabytes. Varied enough to learn a 32k vocabulary.
- ``docstrings``: the stdlib docstrings (``scratchlm.corpus.python_docs``, read with
  ``ast``, ~1.5 MB) repeated up to ``--mb``. Repetition adds no new words: with only
  ~19k distinct pre-tokens, training stops after ~25.5k merges, short of 32k.

    python benchmarks/bpe_train.py                       # 10 MB of stdlib source, 32k vocab
    python benchmarks/bpe_train.py --corpus docstrings   # the docstrings, repeated
    python benchmarks/bpe_train.py --mb 2 --vocab 4096   # a quick run

Prints each trainer's time and its ratio to ours, our time split into pre-token counting
and merging, and then encode throughput of our tiktoken fast path vs HF tokenizers (and
our pure-Python reference encoder on a slice).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def stdlib_sources() -> list[str]:
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    return [p.read_text("utf-8", errors="replace") for p in files]


def build_corpus(mb: float, kind: str) -> list[str]:
    if kind == "source":
        docs = stdlib_sources()
    else:
        from scratchlm.corpus import python_docs

        docs = python_docs()
    size = sum(len(d.encode()) for d in docs)
    target = int(mb * 1_000_000)
    out: list[str] = []
    total = 0
    while total < target:
        for d in docs:
            out.append(d)
            total += len(d.encode()) + 1
            if total >= target:
                break
    print(f"corpus: {len(out):,} documents ({kind}), {total / 1e6:.1f} MB "
          f"(of {size / 1e6:.1f} MB available: {total / size:.2f}x)")
    return out


def train_ours(docs: list[str], vocab: int, pattern: str) -> tuple[float, dict]:
    from scratchlm.tokenizer.bpe_train import count_pretokens, train_merges_fast

    t0 = time.perf_counter()
    counts = count_pretokens(docs, pattern, ["<|endoftext|>"])
    t1 = time.perf_counter()
    merges, vocab_bytes = train_merges_fast(counts, vocab - 1)
    t2 = time.perf_counter()
    return t2 - t0, {"count": t1 - t0, "merge": t2 - t1, "distinct": len(counts), "merges": merges,
                     "vocab": vocab_bytes}


def train_hf(docs: list[str], vocab: int, pattern: str) -> float:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from scratchlm.tokenizer.hf_json import hf_pattern

    t0 = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(hf_pattern(pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return time.perf_counter() - t0, tok


def train_rustbpe(docs: list[str], vocab: int, pattern: str):
    import rustbpe

    t0 = time.perf_counter()
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab - 1, pattern=pattern)
    return time.perf_counter() - t0, tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=("source", "docstrings"), default="source")
    parser.add_argument("--mb", type=float, default=10.0, help="megabytes of training text")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size (with 1 special token)")
    parser.add_argument("--encode-mb", type=float, default=2.0, help="megabytes for the encode benchmark")
    parser.add_argument("--textbook-merges", type=int, default=100, help="merges for the textbook comparison")
    parser.add_argument("--profile", action="store_true", help="cProfile our trainer and print the top")
    args = parser.parse_args()

    from scratchlm.tokenizer import PATTERNS, BPETokenizer

    pattern = PATTERNS["gpt4"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"(shared: timings are noisy, compare the ratios)")
    docs = build_corpus(args.mb, args.corpus)

    if args.profile:
        import cProfile
        import pstats

        cProfile.runctx("train_ours(docs, args.vocab, pattern)", globals(), locals(), "/tmp/bpe.prof")
        pstats.Stats("/tmp/bpe.prof").sort_stats("tottime").print_stats(12)
        return

    results = {}
    ours_time, info = train_ours(docs, args.vocab, pattern)
    results["scratchlm fast trainer (pure Python)"] = ours_time
    print(f"scratchlm: {ours_time:.2f}s = count pre-tokens {info['count']:.2f}s "
          f"({info['distinct']:,} distinct) + {len(info['merges']):,} merges {info['merge']:.2f}s")
    hf_time, hf_tok = train_hf(docs, args.vocab, pattern)
    results["HF tokenizers (Rust)"] = hf_time
    try:
        rb_time, rb_tok = train_rustbpe(docs, args.vocab, pattern)
        results["rustbpe (Rust)"] = rb_time
        rb_merges = sorted(rb_tok.get_mergeable_ranks(), key=lambda x: x[1])[256:]
        ours_tokens = info["vocab"][256:]
        same = sum(bytes(t) == o for (t, _), o in zip(rb_merges, ours_tokens))
        print(f"rustbpe learned the same token as ours at {same:,} of {len(ours_tokens):,} positions")
    except ImportError:
        print("rustbpe: not installed")

    print(f"\n{'trainer':40s} {'seconds':>8s} {'ours / it':>10s}")
    for name, t in results.items():
        print(f"{name:40s} {t:8.2f} {ours_time / t:9.2f}x")

    # The textbook trainer recounts every pair after every merge: a small run shows why
    # the fast one exists (same merges, checked here too).
    from scratchlm.tokenizer.bpe_train import count_pretokens, train_merges_fast, train_merges_textbook

    counts = count_pretokens(docs[: max(1, len(docs) // 50)], pattern)
    t0 = time.perf_counter()
    textbook = train_merges_textbook(counts, 256 + args.textbook_merges)
    t_textbook = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = train_merges_fast(counts, 256 + args.textbook_merges)
    t_fast = time.perf_counter() - t0
    assert fast == textbook
    print(f"{args.textbook_merges} merges on {len(counts):,} distinct pre-tokens: textbook {t_textbook:.2f}s, "
          f"fast {t_fast:.3f}s ({t_textbook / t_fast:.0f}x), same merges")

    # ---- encoding throughput ---------------------------------------------------------
    ranks = {t: i for i, t in enumerate(info["vocab"])}
    ours = BPETokenizer(ranks, pattern, {"<|endoftext|>": len(ranks)})
    budget, enc_docs = int(args.encode_mb * 1_000_000), []
    for d in docs:
        enc_docs.append(d)
        budget -= len(d.encode())
        if budget <= 0:
            break
    text = "\n".join(enc_docs)
    mb = len(text.encode()) / 1e6
    tiktoken_enc = ours.tiktoken_encoding()  # built once, outside the timing

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    t_ours, ids = timed(lambda: ours.encode(text))
    t_hf, hf_enc = timed(lambda: hf_tok.encode(text))
    t_ours_b, _ = timed(lambda: tiktoken_enc.encode_ordinary_batch(enc_docs))
    t_hf_b, _ = timed(lambda: hf_tok.encode_batch(enc_docs))
    small = text[:200_000]
    t_ref, ref_ids = timed(lambda: ours.encode(small, fast=False))
    assert ref_ids == ours.encode(small)
    print(f"\nencode {mb:.1f} MB ({len(enc_docs)} documents; {len(ids):,} tokens ours, "
          f"{len(hf_enc.ids):,} HF):")
    print(f"{'':44s} {'MB/s':>8s} {'ours / HF':>10s}")
    print(f"{'one string: scratchlm (tiktoken path)':44s} {mb / t_ours:8.2f} {t_hf / t_ours:9.2f}x")
    print(f"{'one string: HF tokenizers encode':44s} {mb / t_hf:8.2f}")
    print(f"{'batch of documents: scratchlm (tiktoken)':44s} {mb / t_ours_b:8.2f} {t_hf_b / t_ours_b:9.2f}x")
    print(f"{'batch of documents: HF encode_batch':44s} {mb / t_hf_b:8.2f}")
    print(f"{'scratchlm pure-Python reference (0.2 MB)':44s} {len(small.encode()) / 1e6 / t_ref:8.2f}")


if __name__ == "__main__":
    main()
