"""`scratchlm tokenizer train|encode|decode`: train a tokenizer on files, use one.

    scratchlm tokenizer train corpus.txt --vocab-size 4096 --out tok/
    scratchlm tokenizer encode tok/ "Hello world"      # prints: 9906 1917 ...
    scratchlm tokenizer decode tok/ 9906 1917
"""

from __future__ import annotations

import argparse
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


def _read_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file")
        try:
            texts.append(f.read_text("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not any(t.strip() for t in texts):
        raise ValueError("the training files hold no text")
    return texts


def run_train(args: argparse.Namespace) -> int:
    from . import BPETokenizer, CharTokenizer

    texts = _read_texts(args.files)
    specials = ["<|endoftext|>"] if args.special is None else args.special
    start = time.perf_counter()
    if args.kind == "char":
        tok = CharTokenizer.train(texts, special_tokens=specials)
    else:
        tok = BPETokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=specials,
                                 fast=not args.textbook)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"trained {tok!r} on {sum(map(len, texts)):,} characters in "
          f"{time.perf_counter() - start:.1f}s -> {args.out}")
    return 0


def _load(directory: Path):
    from . import load_tokenizer

    tok = load_tokenizer(directory)
    if tok is None:
        raise FileNotFoundError(f"{directory}: no tokenizer files in this directory")
    return tok


def run_encode(args: argparse.Namespace) -> int:
    if not args.text:
        raise ValueError("nothing to encode: the text is empty")
    tok = _load(args.dir)
    ids = tok.encode(args.text, allowed_special="none" if args.no_special else "all")
    print(" ".join(map(str, ids)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    tok = _load(args.dir)
    print(tok.decode(args.ids))
    return 0
