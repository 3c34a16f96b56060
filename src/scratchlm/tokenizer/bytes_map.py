"""Byte <-> printable character: GPT-2's trick, used by every Hugging Face byte-level file.

A byte-level vocabulary is a set of byte strings, but JSON holds text: so each byte is
written as one printable character, and a token as the string of its bytes' characters.

>>> bytes_to_hf(b" hello\\n")
'ĠhelloĊ'
>>> hf_to_bytes('ĠhelloĊ')
b' hello\\n'
"""

from __future__ import annotations

from functools import lru_cache

from .base import TokenizerError


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, so a vocab of byte strings can live in JSON.

    Bytes that are already visible Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
    themselves; the other 68 (control bytes, space, ...) map to U+0100 onwards, in order.
    So b" " is 'Ġ' (U+0120) and b"\\n" is 'Ċ' (U+010A).

    >>> byte_to_unicode()[ord(" ")], byte_to_unicode()[ord("a")]
    ('Ġ', 'a')
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """The inverse of ``byte_to_unicode``."""
    return {c: b for b, c in byte_to_unicode().items()}


def bytes_to_hf(token: bytes) -> str:
    """A token's bytes as the string a Hugging Face vocab holds."""
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def hf_to_bytes(token: str) -> bytes:
    """A Hugging Face vocab string back to its bytes; error if a character is not byte-level."""
    table = unicode_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"vocab entry {token!r} is not byte-level (character {e.args[0]!r})") from None
