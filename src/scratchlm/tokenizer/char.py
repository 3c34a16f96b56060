"""The character tokenizer: one id per distinct character of the training text.

The simplest tokenizer there is, and the one to start with: the vocabulary is the
sorted set of characters seen in training, so ids are small and the model has few
rows to learn. Its weakness is the reason BPE exists: a character it has never seen
cannot be encoded at all, and sequences are as long as the text.

>>> tok = CharTokenizer.train("hello world")
>>> tok.vocab_size, tok.encode("hello")
(8, [3, 2, 4, 4, 5])
>>> tok.decode(tok.encode("low rod"))
'low rod'
>>> tok.encode("hi!")
Traceback (most recent call last):
...
scratchlm.tokenizer.base.TokenizerError: unknown character 'i' (U+0069) at position 1: not one of the 8 characters this tokenizer was trained on
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .base import Tokenizer, TokenizerError, check_special_names
from .files import remove_stale_files, require_directory

FILENAME = "char_tokenizer.json"


class CharTokenizer(Tokenizer):
    """Ids 0..n-1 are the training characters in sorted order; special tokens follow."""

    def __init__(self, chars: Iterable[str], special_tokens: Iterable[str] = ()):
        self.chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise TokenizerError("a character tokenizer's vocabulary must be single characters")
        if len(set(self.chars)) != len(self.chars):
            raise TokenizerError("a character tokenizer's vocabulary has duplicate characters")
        self.char_to_id = {c: i for i, c in enumerate(self.chars)}
        specials = list(dict.fromkeys(special_tokens))
        check_special_names(specials)
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(specials)}
        self._table = {i: c.encode("utf-8", errors="surrogatepass") for i, c in enumerate(self.chars)}
        self._table.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})

    @classmethod
    def train(cls, text: str | Iterable[str], special_tokens: Iterable[str] = ()) -> CharTokenizer:
        """Vocabulary = the sorted distinct characters of ``text`` (a str or an iterable of str)."""
        texts = [text] if isinstance(text, str) else list(text)
        chars = sorted(set().union(*map(set, texts))) if texts else []
        if not chars:
            raise TokenizerError("cannot train a character tokenizer on empty text")
        specials = list(special_tokens)
        return cls([c for c in chars], specials)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.char_to_id[c] for c in text]
        except KeyError:
            position = next(i for i, c in enumerate(text) if c not in self.char_to_id)
            c = text[position]
            raise TokenizerError(f"unknown character {c!r} (U+{ord(c):04X}) at position {position}: "
                                 f"not one of the {len(self.chars)} characters this tokenizer "
                                 f"was trained on") from None

    def _bytes_table(self) -> dict[int, bytes]:
        return self._table

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``char_tokenizer.json`` into an existing directory."""
        require_directory(directory)
        data = {"kind": "char", "chars": "".join(self.chars), "special_tokens": list(self.special_tokens)}
        (Path(directory) / FILENAME).write_text(json.dumps(data, ensure_ascii=True))
        remove_stale_files(directory, (FILENAME,))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CharTokenizer:
        path = Path(directory) / FILENAME
        try:
            data = json.loads(path.read_text())
            return cls(list(data["chars"]), data.get("special_tokens", []))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not a valid character tokenizer file ({e})") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
