"""`scratchlm prepare`: tokenize text into train/val shards for `scratchlm train`.

    scratchlm prepare docs/ notes/*.md --out data/mine --vocab-size 4096
    scratchlm prepare --corpus python-reference --tokenizer char --out data/ref
"""

from __future__ import annotations

import argparse
import sys


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="tokenize text into train/val shards for `scratchlm train`",
        description="Tokenize text files, folders or globs (.txt, .md, .jsonl, .parquet), or a built-in "
                    "corpus, into token shards with an end-of-text token before every document.")
    p.add_argument("inputs", nargs="*", help="files, folders or glob patterns (default: --corpus)")
    p.add_argument("--corpus", choices=["python-docs", "python-reference"], default=None,
                   help="built-in corpus to use when no input is given (default: python-docs)")
    p.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")
    p.add_argument("--tokenizer", default="bpe",
                   help="'bpe' or 'char' to train one on this text, or a tokenizer folder (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default: %(default)s)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=4.0,
                   help="train the BPE tokenizer on the first this many MB of text (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents held out for validation (default: %(default)s)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: %(default)s)")
    p.add_argument("--text-field", default="text", help="field of .jsonl/.parquet records (default: %(default)s)")
    p.add_argument("--encoding-errors", choices=["strict", "replace", "ignore"], default="strict",
                   help="bytes that are not UTF-8: stop with an error (strict), replace with U+FFFD, "
                        "or drop them (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: %(default)s)")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from ..data import prepare

    result = prepare(args.inputs, corpus=args.corpus, out_dir=args.out, tokenizer=args.tokenizer,
                     vocab_size=args.vocab_size, tokenizer_sample_mb=args.tokenizer_sample_mb,
                     val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, text_field=args.text_field,
                     encoding_errors=args.encoding_errors, seed=args.seed)
    meta = result.meta
    s = meta["splits"]
    print(f"wrote {result.out_dir}: {s['train']['tokens']:,} train tokens ({s['train']['documents']:,} documents), "
          f"{s['val']['tokens']:,} val tokens, vocab {meta['vocab_size']:,} ({meta['dtype']})")
    if meta.get("requested_vocab_size") and meta["vocab_size"] < meta["requested_vocab_size"]:
        print(f"note: the text ran out of pairs to merge: vocabulary {meta['vocab_size']:,}, not the "
              f"{meta['requested_vocab_size']:,} asked for (give more text or a smaller --vocab-size)",
              file=sys.stderr)
    return 0
