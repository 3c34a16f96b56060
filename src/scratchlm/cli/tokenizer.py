"""`scratchlm tokenizer train|encode|decode`: train a tokenizer on files, use one.

    scratchlm tokenizer train corpus.txt --vocab-size 4096 --out tok/
    scratchlm tokenizer encode tok/ "Hello world"      # prints: 9906 1917 ...
    scratchlm tokenizer decode tok/ 9906 1917
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer, encode or decode text",
                                   description="Train a byte-level BPE (or character) tokenizer and use it.")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = sub.add_parser("train", help="train a tokenizer on text files and save it to a directory")
    train.add_argument("files", nargs="+", type=Path, help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, default=4096, help="total vocabulary, specials included")
    train.add_argument("--out", type=Path, required=True, help="directory to write the tokenizer into")
    train.add_argument("--kind", choices=("bpe", "char"), default="bpe")
    train.add_argument("--pattern", choices=("gpt4", "gpt2"), default="gpt4", help="BPE pre-split regex")
    train.add_argument("--special", action="append", default=None, metavar="TOKEN",
                       help="special token (repeatable; default <|endoftext|>)")
    train.add_argument("--textbook", action="store_true", help="use the slow textbook BPE trainer")
    train.set_defaults(func=run_train)

    encode = sub.add_parser("encode", help="print the ids of a text")
    encode.add_argument("dir", type=Path, help="a tokenizer or model directory")
    encode.add_argument("text")
    encode.add_argument("--no-special", action="store_true", help="treat special-token strings as text")
    encode.set_defaults(func=run_encode)

    decode = sub.add_parser("decode", help="print the text of ids")
    decode.add_argument("dir", type=Path)
    decode.add_argument("ids", nargs="+", type=int)
    decode.set_defaults(func=run_decode)


def run_train(args: argparse.Namespace) -> int:
    from ..corpus import read_text_files
    from ..tokenizer import BPETokenizer, CharTokenizer, TokenizerError

    if args.out.exists() and not args.out.is_dir():
        raise TokenizerError(f"--out {args.out} is a file, not a directory")
    texts = read_text_files(args.files)
    specials = ["<|endoftext|>"] if args.special is None else args.special
    start = time.perf_counter()
    if args.kind == "char":
        tok = CharTokenizer.train(texts, special_tokens=specials)
    else:
        tok = BPETokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=specials,
                                 fast=not args.textbook)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TokenizerError(f"--out {args.out}: cannot create the directory ({e.strerror or e})") from None
    tok.save(args.out)
    print(f"trained {tok!r} on {sum(map(len, texts)):,} characters in "
          f"{time.perf_counter() - start:.1f}s -> {args.out}")
    if args.kind == "bpe" and tok.vocab_size < args.vocab_size:
        print(f"note: the text ran out of pairs to merge: vocabulary {tok.vocab_size:,}, not the "
              f"{args.vocab_size:,} asked for", file=sys.stderr)
    return 0


def _load(directory: Path):
    from ..errors import NotFound
    from ..tokenizer import load_tokenizer

    if not directory.exists():
        raise NotFound(f"{directory}: no such directory")
    tok = load_tokenizer(directory)
    if tok is None:
        raise NotFound(f"{directory}: no tokenizer files in this directory")
    return tok


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import TokenizerError

    if not args.text:
        raise TokenizerError("nothing to encode: the text is empty")
    tok = _load(args.dir)
    ids = tok.encode(args.text, allowed_special="none" if args.no_special else "all")
    print(" ".join(map(str, ids)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    tok = _load(args.dir)
    print(tok.decode(args.ids))
    return 0
