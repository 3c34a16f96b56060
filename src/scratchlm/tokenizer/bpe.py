"""Byte-level BPE: encode text to ids by merge ranks; train; save as Hugging Face files.

A byte-level BPE tokenizer is three things:

- ``pattern``: the regex that cuts text into pre-tokens (see ``bpe_train.PATTERNS``);
- ``ranks``: {token bytes: id}; every single byte has a token, and a lower id means
  "learned earlier", i.e. merged first;
- ``special_tokens``: {string: id} for markers like "<|endoftext|>", which are never
  produced by merges and are matched in the text before anything else.

Encoding one pre-token (``bpe_encode_piece``): start from its bytes, one token each;
repeatedly merge the adjacent pair whose concatenation has the lowest rank; stop when
no adjacent pair is a token. This is what tiktoken does, so handing our ranks to
``tiktoken.Encoding`` gives the same ids, much faster: that is the default path
(``fast=True``); ``fast=False`` runs the pure-Python reference below.

>>> tok = BPETokenizer.train("low lower lowest " * 20, vocab_size=270, pattern="gpt2")
>>> ids = tok.encode(" lowest low<|endoftext|>")
>>> [tok.decode([i]) for i in ids]
[' lowest', ' low', '<|endoftext|>']
>>> len(tok.merges), tok.vocab_size, tok.eot_id  # the text ran out of pairs after 7 merges
(7, 264, 263)
>>> tok.encode(" lowest low", fast=False) == tok.encode(" lowest low")  # reference == tiktoken
True
"""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections.abc import Iterable

import regex

from .base import Tokenizer, TokenizerError, check_special_names
from .bpe_train import count_pretokens, resolve_pattern, train_merges_fast, train_merges_textbook
from .hf_json import save_hf_bpe


def bpe_encode_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The reference encoder for one pre-token: merge the lowest-ranked pair until none.

    >>> ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    >>> bpe_encode_piece(b"abcab", ranks)   # ab (3) first, then abc (5); "ab" at the end
    [5, 3]
    """
    if piece in ranks:  # a whole pre-token that is one token (tiktoken takes it directly)
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i  # strict "<": the leftmost of equal ranks wins
        if best_rank is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    try:
        return [ranks[p] for p in parts]
    except KeyError as e:
        missing = e.args[0]
        raise TokenizerError(f"byte 0x{missing[0]:02X} ({missing!r} in {piece!r}) has no token in this "
                             "vocabulary") from None


NORMALIZERS = (None, "NFC", "NFD", "NFKC", "NFKD")


class BPETokenizer(Tokenizer):
    """Byte-level BPE over ``ranks`` (bytes -> id) with a pre-split ``pattern``."""

    def __init__(self, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int] | None = None,
                 *, merges: list[tuple[int, int, int]] | None = None, add_prefix_space: bool = False,
                 normalizer: str | None = None, bos_token: str | None = None, eos_token: str | None = None,
                 chat_template: str | None = None, name: str = "scratchlm"):
        self.ranks = dict(ranks)
        self.pattern = resolve_pattern(pattern)
        self.special_tokens = dict(special_tokens or {})
        check_special_names(self.special_tokens)
        self.merges = merges  # (left, right, new) in training order; None when loaded
        # Loaded Hugging Face files may ask for two text transforms before the regex:
        self.add_prefix_space = add_prefix_space  # ByteLevel(add_prefix_space=True): " " + text
        if normalizer not in NORMALIZERS:
            raise TokenizerError(f"unsupported normalizer {normalizer!r} (supported: NFC, NFD, NFKC, NFKD)")
        self.normalizer = normalizer  # a Unicode normal form applied to the text
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.name = name
        try:
            self._regex = regex.compile(self.pattern)
        except regex.error as e:
            raise TokenizerError(f"bad pre-split pattern {self.pattern!r}: {e}") from None
        self._table: dict[int, bytes] = {i: t for t, i in self.ranks.items()}
        if len(self._table) != len(self.ranks):
            raise TokenizerError("two tokens share one id in the BPE vocabulary")
        for s, i in self.special_tokens.items():
            if i in self._table:
                raise TokenizerError(f"special token {s!r} has id {i}, already used by a token")
            self._table[i] = s.encode("utf-8")
        self._vocab_size = max(self._table) + 1 if self._table else 0
        # tiktoken needs a token for every byte; a vocabulary without one (rare, e.g. HF
        # models trained on a limited alphabet) uses the reference path, which says which.
        self._has_all_bytes = all(bytes([b]) in self.ranks for b in range(256))
        self._tiktoken = None
        self._cache: dict[str, list[int]] = {}

    # ---- training ----------------------------------------------------------------------
    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int, pattern: str = "gpt4",
              special_tokens: Iterable[str] = ("<|endoftext|>",), fast: bool = True) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        ``text`` is one string or an iterable of documents (merges never cross documents).
        ``fast=False`` uses the textbook trainer (same merges, much slower)."""
        specials = list(dict.fromkeys(special_tokens))
        check_special_names(specials)  # before training: an empty one would never stop splitting
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise TokenizerError(f"vocab_size must be at least 256 + {len(specials)} special tokens "
                                 f"= {256 + len(specials)}, got {vocab_size!r}")
        if vocab_size > 2**32:  # ids are stored as uint32 at most (token shards, GGUF)
            raise TokenizerError(f"vocab_size must be at most 2**32 = {2**32:,}, got {vocab_size:,}")
        texts = [text] if isinstance(text, str) else text
        counts = count_pretokens(texts, pattern, specials)
        trainer = train_merges_fast if fast else train_merges_textbook
        merges, vocab = trainer(counts, vocab_size - len(specials))
        ranks = {t: i for i, t in enumerate(vocab)}
        special_ids = {s: len(vocab) + i for i, s in enumerate(specials)}
        eos = "<|endoftext|>" if "<|endoftext|>" in special_ids else None
        return cls(ranks, pattern, special_ids, merges=merges, eos_token=eos)

    # ---- encoding ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, allowed_special="all", fast: bool = True) -> list[int]:
        """Text -> ids. ``allowed_special``: "all" (default), "none" or a set of names.
        ``fast=False`` runs the pure-Python reference encoder (same ids)."""
        if not fast:
            return self._encode_split(text, allowed_special, self.encode_reference)
        if self.add_prefix_space or self.normalizer or not self._can_use_tiktoken():
            return self._encode_split(text, allowed_special, self.encode_ordinary)
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        enc = self.tiktoken_encoding()  # tiktoken splits around the specials itself
        if allowed_special == "none":
            return enc.encode_ordinary(text)
        if allowed_special != "all":
            self._special_splitter(allowed_special)  # validates the names
            allowed_special = set(allowed_special)
        return enc.encode(text, allowed_special=allowed_special, disallowed_special=())

    def encode_batch(self, texts: Iterable[str], allowed_special="all") -> list[list[int]]:
        """``encode`` for each text, on tiktoken's thread pool."""
        texts = list(texts)
        if self.add_prefix_space or self.normalizer or not self._can_use_tiktoken() or allowed_special == "none" \
                or any(not isinstance(t, str) for t in texts):
            return super().encode_batch(texts, allowed_special)
        if allowed_special != "all":
            self._special_splitter(allowed_special)
            allowed_special = set(allowed_special)
        return self.tiktoken_encoding().encode_batch(texts, allowed_special=allowed_special, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text in which special-token strings are plain text (fast path)."""
        if not self._can_use_tiktoken():
            return self.encode_reference(text)
        return self.tiktoken_encoding().encode_ordinary(self._transform(text))

    def encode_reference(self, text: str) -> list[int]:
        """The pure-Python path: pre-split with the regex, then BPE each piece (cached)."""
        text = self._transform(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: U+FFFD instead, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        cache = self._cache
        for piece in self._regex.findall(text):
            if piece not in cache:
                if len(cache) > 100_000:
                    cache.clear()
                cache[piece] = bpe_encode_piece(piece.encode("utf-8"), self.ranks)
            ids.extend(cache[piece])
        return ids

    def _transform(self, text: str) -> str:
        """What a loaded HF tokenizer does before its regex: normalise, add a space."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        return text

    def tiktoken_encoding(self):
        """Our ranks, pattern and special tokens as a ``tiktoken.Encoding`` (built once)."""
        if self._tiktoken is None:
            import tiktoken

            self._tiktoken = tiktoken.Encoding(name=self.name, pat_str=self.pattern,
                                               mergeable_ranks=self.ranks, special_tokens=self.special_tokens)
        return self._tiktoken

    def _can_use_tiktoken(self) -> bool:
        """tiktoken needs a token for every byte and a regex its Rust engine accepts."""
        if not self._has_all_bytes or self._tiktoken is False:
            return False
        try:
            self.tiktoken_encoding()
        except ValueError as e:  # e.g. regex syntax that only Python's `regex` knows
            warnings.warn(f"tiktoken cannot use this tokenizer ({e}); encoding in pure Python", stacklevel=3)
            self._tiktoken = False
            return False
        return True

    def __getstate__(self):  # picklable (e.g. for DataLoader workers): drop the caches
        state = self.__dict__.copy()
        state.update(_tiktoken=None, _cache={}, _splitters={})
        return state

    def _bytes_table(self) -> dict[int, bytes]:
        return self._table

    # ---- files -----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` (Hugging Face format, which
        is also our own: ``load_tokenizer`` reads them back) into an existing directory."""
        save_hf_bpe(self, directory)

    save_hf = save

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, "
                f"special_tokens={len(self.special_tokens)})")
