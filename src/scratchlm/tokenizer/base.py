"""What every tokenizer shares: the error type, special tokens, decode and the id checks.

A tokenizer turns text into a list of integer ids and back. Every tokenizer in this
package (characters, byte-level BPE, SentencePiece) has the same surface:

    encode(text) -> list[int]        special tokens written in the text become their ids
    encode_batch(texts)              several texts at once
    decode(ids) -> str               invalid UTF-8 becomes U+FFFD (errors="replace")
    decode_bytes(ids) -> bytes       the raw bytes, for streaming partial UTF-8
    vocab_size, special_tokens, eot_id, bos_id, chat_template, save(dir)

Subclasses supply ``encode_ordinary`` (text with no special tokens) and ``_token_bytes``
(id -> bytes); this class splits the text around special tokens and checks ids.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable

import regex

from ..errors import ScratchLMError

# "all": every special token written in the text is recognised; "none" (or an empty
# collection): special-token strings are encoded as ordinary text; a collection of
# names: only those.
AllowedSpecial = str | Collection[str]

# Names that mean "end of text" in the tokenizers we load, most specific first.
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")


class TokenizerError(ScratchLMError):
    """Bad input to a tokenizer: an unknown character or id, a bad size, a corrupt file."""


class Tokenizer:
    """Base class: special-token handling, decoding and id checks (see the module doc)."""

    special_tokens: dict[str, int]
    chat_template: str | None = None
    bos_token: str | None = None  # set by loaders from tokenizer_config.json / the model
    eos_token: str | None = None
    hf_config: dict | None = None  # the tokenizer_config.json it was loaded with, if any

    # ---- what subclasses provide -------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text in which special-token strings are plain text."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Text -> ids. Special tokens written in ``text`` become their ids unless
        ``allowed_special`` is "none" (or names only some of them)."""
        return self._encode_split(text, allowed_special, self.encode_ordinary)

    def encode_batch(self, texts: Iterable[str], allowed_special: AllowedSpecial = "all") -> list[list[int]]:
        """``encode`` for each text (BPE runs them on tiktoken's threads)."""
        return [self.encode(t, allowed_special) for t in texts]

    def _encode_split(self, text: str, allowed_special: AllowedSpecial, encode_ordinary) -> list[int]:
        """Cut ``text`` around the allowed special tokens; ``encode_ordinary`` the rest."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        splitter = self._special_splitter(allowed_special)
        if splitter is None:
            return encode_ordinary(text)
        ids: list[int] = []
        # regex.split with one capturing group: [text, special, text, special, ..., text]
        for i, part in enumerate(splitter.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(encode_ordinary(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the raw bytes they stand for (a streamed token may end mid-character)."""
        ids = as_id_list(ids)
        table = self._bytes_table()
        try:
            return b"".join(map(table.__getitem__, ids))
        except (KeyError, TypeError):
            self.check_ids(ids)
            raise

    def check_ids(self, ids: Iterable[int]) -> None:
        """Raise TokenizerError naming the first id that is not in the vocabulary."""
        table = self._bytes_table()
        for position, i in enumerate(ids):
            if not isinstance(i, int) or i not in table:
                raise TokenizerError(f"token id {i!r} at position {position} is outside the "
                                     f"vocabulary (ids 0..{self.vocab_size - 1})")

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-text token, or None: the eos token the tokenizer declares (in
        tokenizer_config.json or the model), else "<|endoftext|>", "<|end_of_text|>", "</s>"."""
        names = (self.eos_token,) + EOT_NAMES
        return next((self.special_tokens[n] for n in names if n in self.special_tokens), None)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-text token, or None when the tokenizer has none."""
        names = (self.bos_token,) + BOS_NAMES
        return next((self.special_tokens[n] for n in names if n in self.special_tokens), None)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- helpers ---------------------------------------------------------------------
    def _bytes_table(self) -> dict[int, bytes]:
        """id -> bytes for every id (special tokens included); built once by subclasses."""
        raise NotImplementedError

    def _special_splitter(self, allowed_special: AllowedSpecial):
        """A compiled regex that splits text around the allowed special tokens, or None."""
        if allowed_special == "all":
            names = tuple(self.special_tokens)
        elif allowed_special == "none":
            names = ()
        elif isinstance(allowed_special, str):
            raise TokenizerError(f"allowed_special must be 'all', 'none' or a collection of "
                                 f"special-token names, got {allowed_special!r}")
        else:
            names = tuple(allowed_special)
            unknown = [n for n in names if n not in self.special_tokens]
            if unknown:
                raise TokenizerError(f"not a special token of this tokenizer: {unknown[0]!r}")
        if not names:
            return None
        cache = self.__dict__.setdefault("_splitters", {})
        key = frozenset(names)
        if key not in cache:
            # Longest first, so "<|a|>b" wins over "<|a|>" when both are special.
            alternatives = "|".join(regex.escape(n) for n in sorted(names, key=len, reverse=True))
            cache[key] = regex.compile(f"({alternatives})")
        return cache[key]


def check_special_names(names: Iterable) -> None:
    """Special tokens must be non-empty strings: an empty one matches between every two
    characters, and splitting text around it never ends."""
    for name in names:
        if not isinstance(name, str) or not name:
            raise TokenizerError(f"a special token must be a non-empty string, got {name!r}")


def as_id_list(ids) -> list:
    """Accept a list, tuple, numpy array or torch tensor of ids; return a list."""
    if hasattr(ids, "tolist"):  # numpy / torch
        ids = ids.tolist()
        return ids if isinstance(ids, list) else [ids]
    return ids if isinstance(ids, list) else list(ids)
