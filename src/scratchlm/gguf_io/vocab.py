"""Tokenizers in GGUF metadata: ``tokenizer.ggml.*`` -> our tokenizers, and back.

A GGUF carries its tokenizer as arrays, not files:

    tokenizer.ggml.model        "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokenizer.ggml.tokens       every token's text, by id (byte-level: bytes as printable
                                characters, b" " is "Ġ"; SentencePiece: "▁" for a space)
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "Ġ t", "i n", ... (BPE: the pairs, first merged first)
    tokenizer.ggml.scores       SentencePiece: each piece's score (higher merges first)
    tokenizer.ggml.pre          the name of the pre-split regex ("llama-bpe", "smollm", ...)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, tokenizer.chat_template

The pre-tokenizer is only a name: llama.cpp keeps the regex of each name in its C++
source, so ``PRE_TOKENIZERS`` lists the names we know with their regexes, in both
directions. Some names apply two regexes in turn (first cut out every digit, then the
GPT-2 regex in each piece); here that is one regex with ``\\p{N}`` first, and a whitespace
run followed by a digit ends as it would at the end of a piece.

>>> pattern = PRE_TOKENIZERS["smollm"]
>>> import regex
>>> regex.findall(pattern, "a  12 b")
['a', '  ', '1', '2', ' b']
"""

from __future__ import annotations

import struct

from ..tokenizer import PATTERNS, BPETokenizer, SentencePieceTokenizer, TokenizerError
from ..tokenizer.bytes_map import byte_to_unicode, unicode_to_byte
from .container import GGUFError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's regex as Hugging Face's ByteLevel and llama.cpp write it (the same matches as ours).
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
          r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# "\p{N}" then GPT-2: digits one by one; whitespace before a digit ends its piece there.
_DIGITS_GPT2 = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

PRE_TOKENIZERS: dict[str, str] = {
    "gpt-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2, "jais": _GPT2,
    "llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "falcon3": _LLAMA3, "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3, "pixtral": _LLAMA3,
    "qwen2": _QWEN2, "stablelm2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2, "codeshell": _DIGITS_GPT2,
}

# Writing: our regex -> the llama.cpp name whose regex splits text the same way.
# (Our "gpt4" is cl100k's; llama.cpp reads cl100k vocabularies, e.g. DBRX's, with the
# Llama 3 regex, which differs only in where trailing whitespace after a newline is cut.)
PRE_TOKENIZER_NAMES: dict[str, str] = {
    _GPT2: "gpt-2", PATTERNS["gpt2"]: "gpt-2", _LLAMA3: "llama-bpe", PATTERNS["gpt4"]: "llama-bpe",
    _QWEN2: "qwen2", _DIGITS_GPT2: "smollm",
}




# ---- reading ------------------------------------------------------------------------------------
def tokenizer_from_metadata(metadata: dict, path):
    """Our tokenizer for a file's ``tokenizer.ggml.*`` keys, or None when it has none."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        return None
    if "tokenizer.ggml.tokens" not in metadata:
        raise GGUFError(f"{path}: GGUF metadata has no 'tokenizer.ggml.tokens'")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    if model == "gpt2":
        tok = _bpe(metadata, tokens, types, path)
    elif model == "llama":
        tok = _sentencepiece(metadata, tokens, types, path)
    else:
        raise GGUFError(f"{path}: tokenizer model {model!r} is not supported (gpt2 BPE and llama SentencePiece are)")
    tok.chat_template = metadata.get("tokenizer.chat_template")
    return tok


def _token_name(tokens: list[str], metadata: dict, which: str):
    i = metadata.get(f"tokenizer.ggml.{which}_token_id")
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def _bpe(metadata: dict, tokens: list[str], types: list[int], path) -> BPETokenizer:
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre == "default":
        pre = "gpt-2"
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not known to scratchlm "
                        f"(known: {', '.join(sorted(PRE_TOKENIZERS))})")
    spelling = unicode_to_byte()
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (NORMAL, BYTE):
            if all(c in spelling for c in token):
                ranks[bytes(spelling[c] for c in token)] = i
            else:  # a token written as plain text rather than byte-spelled
                ranks[token.encode("utf-8")] = i
        else:  # control, user-defined, unknown, unused: whole strings, never made by merges
            specials.setdefault(token, i)
    if len(ranks) != sum(1 for k in types if k in (NORMAL, BYTE)):
        raise GGUFError(f"{path}: two tokens of the vocabulary have the same bytes")
    _check_merge_order(metadata.get("tokenizer.ggml.merges") or [], ranks, spelling, path)
    bos, eos = _token_name(tokens, metadata, "bos"), _token_name(tokens, metadata, "eos")
    try:
        return BPETokenizer(ranks, PRE_TOKENIZERS[pre], specials,
                            bos_token=bos if bos in specials else None,
                            eos_token=eos if eos in specials else None, name=f"gguf-{pre}")
    except TokenizerError as e:
        raise GGUFError(f"{path}: bad tokenizer in the GGUF metadata ({e})") from None


def _check_merge_order(merges: list[str], ranks: dict[bytes, int], spelling: dict, path) -> None:
    """Our BPE merges by the id of the result, llama.cpp by the merge list's order; the two
    agree when each merge makes a token with a later id than the merges before it, as in
    every vocabulary trained by BPE (a later merge may rebuild an earlier token by another
    route, "a" + "bc" after "ab" + "c": it is applied at that token's rank)."""
    last, made = -1, set()
    for n, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        try:
            result = ranks.get(bytes(spelling[c] for c in left + right))
        except KeyError:
            result = ranks.get((left + right).encode("utf-8"))
        if result is None:
            raise GGUFError(f"{path}: merge {n} ({merge!r}) makes a token that is not in the vocabulary")
        if result < last and result not in made:
            raise GGUFError(f"{path}: the merges are not in vocabulary-id order; scratchlm's BPE cannot "
                            "reproduce this tokenizer")
        last = max(last, result)
        made.add(result)


def _sentencepiece(metadata: dict, tokens: list[str], types: list[int], path) -> SentencePieceTokenizer:
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise GGUFError(f"{path}: {len(tokens)} tokens but {len(scores)} scores")
    ids = {k: metadata.get(f"tokenizer.ggml.{k}_token_id", -1) for k in ("unknown", "bos", "eos")}
    proto = sentencepiece_proto(tokens, scores, types, unk_id=ids["unknown"], bos_id=ids["bos"],
                                eos_id=ids["eos"], add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
    try:
        tok = SentencePieceTokenizer(proto, source=str(path), config={
            "bos_token": _token_name(tokens, metadata, "bos"), "eos_token": _token_name(tokens, metadata, "eos")})
    except TokenizerError as e:
        raise GGUFError(f"{path}: bad tokenizer in the GGUF metadata ({e})") from None
    try:  # the library is the fast path; a model it refuses still encodes with our reference
        tok._library()
    except Exception:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError variants
        tok._processor = False
    return tok


# ---- a SentencePiece ModelProto, written by hand (field numbers of sentencepiece_model.proto) ----
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, bytes):  # length-delimited
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):  # fixed32
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))  # varint


def sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int], *, unk_id: int, bos_id: int,
                        eos_id: int, add_dummy_prefix: bool) -> bytes:
    """A SentencePiece BPE model with llama.cpp's settings: identity normalisation, spaces kept
    (not collapsed) and written "▁", byte fallback when the vocabulary has byte pieces."""
    pieces = b"".join(_field(1, _field(1, t.encode("utf-8")) + _field(2, float(s)) + _field(3, k))
                      for t, s, k in zip(tokens, scores, types))
    trainer = (_field(3, 2) + _field(35, int(BYTE in types)) + _field(40, unk_id) + _field(41, bos_id)
               + _field(42, eos_id) + _field(43, -1))
    normalizer = _field(1, b"identity") + _field(3, int(add_dummy_prefix)) + _field(4, 0) + _field(5, 1)
    return pieces + _field(2, trainer) + _field(3, normalizer)


# ---- writing -------------------------------------------------------------------------------------
def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """The ``tokenizer.*`` keys (short names, see save.py) for our tokenizer, padded to the
    model's ``vocab_size``. Raises GGUFError for a tokenizer llama.cpp cannot reproduce."""
    if isinstance(tok, BPETokenizer):
        out = _bpe_metadata(tok)
    elif isinstance(tok, SentencePieceTokenizer):
        out = _sentencepiece_metadata(tok)
    else:
        raise GGUFError(f"a {type(tok).__name__} cannot be written to GGUF (byte-level BPE and "
                        "SentencePiece tokenizers can)")
    n = len(out["tokens"])
    if n > vocab_size:
        raise GGUFError(f"the tokenizer has {n} tokens but the model only {vocab_size} embeddings")
    out["tokens"] += [f"[PAD{i}]" for i in range(n, vocab_size)]  # rows no token uses
    out["types"] += [UNUSED] * (vocab_size - n)
    if "scores" in out:
        out["scores"] += [-1e9] * (vocab_size - n)
    for name, which in (("bos_id", tok.bos_id), ("eos_id", tok.eot_id)):
        if which is not None:
            out[name] = which
    if tok.chat_template:
        out["chat_template"] = tok.chat_template
    return out


def _bpe_metadata(tok: BPETokenizer) -> dict:
    if tok.add_prefix_space or tok.normalizer:
        raise GGUFError("this BPE tokenizer adds a prefix space or normalises text; llama.cpp's "
                        "tokenizer does neither, so it cannot be written to GGUF")
    pre = PRE_TOKENIZER_NAMES.get(tok.pattern)
    if pre is None:
        raise GGUFError(f"the tokenizer's pre-split regex {tok.pattern!r} has no llama.cpp pre-tokenizer name "
                        f"(known: the regexes of {', '.join(sorted(set(PRE_TOKENIZER_NAMES.values())))})")
    spell = byte_to_unicode()
    n = tok.vocab_size
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for token, i in tok.ranks.items():
        tokens[i], types[i] = "".join(spell[b] for b in token), NORMAL
    for name, i in tok.special_tokens.items():
        tokens[i], types[i] = name, CONTROL
    # llama.cpp merges the listed pair that comes first; ours the pair whose result has the
    # lowest id. They agree when the list holds every split of every token into two tokens,
    # ordered by the id of the result.
    merges = []
    for token, rank in tok.ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in tok.ranks and right in tok.ranks:
                merges.append((rank, tok.ranks[left], tok.ranks[right]))
    merges.sort()
    merge_text = [f"{tokens[a]} {tokens[b]}" for _, a, b in merges]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merge_text}


def _sentencepiece_metadata(tok: SentencePieceTokenizer) -> dict:
    spec = tok.spec
    if spec["model_type"] != "bpe" or spec["normalizer_name"] != "identity" or spec["remove_extra_whitespaces"] \
            or not spec["escape_whitespaces"] or spec["treat_whitespace_as_suffix"]:
        raise GGUFError("only SentencePiece BPE models with Llama 2's settings (identity normaliser, spaces "
                        "kept) can be written to GGUF: llama.cpp's tokenizer knows no others")
    out = {"model": "llama", "tokens": [p["piece"] for p in tok.pieces], "scores": [p["score"] for p in tok.pieces],
           "types": [p["type"] for p in tok.pieces], "add_space_prefix": spec["add_dummy_prefix"]}
    if 0 <= tok.unk_id < len(tok.pieces):
        out["unk_id"] = tok.unk_id
    return out
