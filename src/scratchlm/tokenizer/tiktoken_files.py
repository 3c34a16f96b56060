"""tiktoken rank files (cl100k_base, Llama 3's ``tokenizer.model``) and tiktoken encodings.

A rank file has one line per token: ``<base64 of the token bytes> <rank>``; the regex and
the special tokens are not in it (Llama 3's are ``LLAMA3_PATTERN`` and
``llama3_special_tokens``).

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "ranks.tiktoken")
>>> write_tiktoken_ranks({b"a": 0, b"b": 1, b"ab": 2}, path)
>>> open(path).read().splitlines()
['YQ== 0', 'Yg== 1', 'YWI= 2']
>>> read_tiktoken_ranks(path) == {b"a": 0, b"b": 1, b"ab": 2}, is_tiktoken_file(path)
(True, True)
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from .base import TokenizerError
from .bpe import BPETokenizer
from .files import PathLike

# Llama 3's pre-split regex (its tokenizer.model holds only the ranks).
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def llama3_special_tokens(n_ranks: int = 128000) -> dict[str, int]:
    """The 256 special tokens that follow Llama 3's ranks (names as in Llama 3.1+)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
    return {name: n_ranks + i for i, name in enumerate(names)}


def read_tiktoken_ranks(path: PathLike) -> dict[bytes, int]:
    """Read ``<base64 token> <rank>`` lines into {bytes: rank}."""
    ranks = {}
    where = ""
    try:
        text = Path(path).read_text("ascii")
        for number, line in enumerate(text.splitlines(), 1):
            where = f" line {number}"
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}:{where} not a tiktoken rank file ({e})") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken rank file")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: PathLike) -> None:
    """Write {bytes: rank} as a rank file, in rank order."""
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    Path(path).write_text("".join(lines))


def is_tiktoken_file(path: PathLike) -> bool:
    """True if the file starts like a tiktoken rank file (SentencePiece models are binary)."""
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n")[0]
    parts = head.split(b" ")
    return len(parts) == 2 and parts[1].isdigit() and all(c in _BASE64 for c in parts[0])


def bpe_from_tiktoken(encoding) -> BPETokenizer:
    """A ``tiktoken.Encoding`` (e.g. cl100k_base) as a BPETokenizer with the same ids."""
    return BPETokenizer(encoding._mergeable_ranks, encoding._pat_str, encoding._special_tokens,
                        name=encoding.name)


def load_tiktoken_model(path: PathLike, config: dict | None = None) -> BPETokenizer:
    """Llama 3's ``tokenizer.model`` (tiktoken ranks + Llama 3 regex and specials)."""
    ranks = read_tiktoken_ranks(path)
    config = config or {}
    specials = config.get("added_tokens") or llama3_special_tokens(len(ranks))
    specials = {s: i for s, i in specials.items() if s.encode() not in ranks or ranks[s.encode()] != i}
    return BPETokenizer(ranks, LLAMA3_PATTERN, specials,
                        bos_token=config.get("bos_token") or "<|begin_of_text|>",
                        eos_token=config.get("eos_token") or "<|end_of_text|>",
                        chat_template=config.get("chat_template"), name="llama3")
