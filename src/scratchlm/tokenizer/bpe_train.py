"""Training byte-level BPE: learn which adjacent tokens to merge, most frequent first.

Start from the 256 byte values (ids 0..255), so any text at all can be encoded. Then,
again and again, find the adjacent pair of tokens that occurs most often in the
training text and give it a new id. Each merge adds one token to the vocabulary;
stop when the vocabulary has the size asked for.

Before counting, the text is cut into "pre-tokens" by a regex (words, numbers,
punctuation runs, whitespace; see ``PATTERNS``), and merges never cross a pre-token
boundary: "dog." and "dog!" share the token "dog" instead of learning two.

Two trainers that give exactly the same merges:

- ``train_merges_textbook``: recount every pair after every merge. Easy to check by
  eye, O(merges x text); fine for a few hundred merges on a small text.
- ``train_merges_fast``: count each distinct pre-token once (with its frequency), keep
  the pair counts up to date by touching only the words that contain the merged pair,
  and pick the best pair from a heap whose stale entries are skipped when popped.

Tie rule (both trainers): the pair with the highest count wins; among equal counts,
the smallest pair of ids ``(left, right)`` wins (compared as a tuple).

A merge can produce bytes that are already a token (merging "a"+"bc" after "ab"+"c"
made "abc"): it then reuses that token's id and the vocabulary does not grow, so a
byte string always has exactly one id (which tiktoken requires).

>>> counts = count_pretokens(["low lower lowest"], PATTERNS["gpt2"])
>>> merges, vocab = train_merges_textbook(counts, vocab_size=259)
>>> [(vocab[a], vocab[b], vocab[new]) for a, b, new in merges]
[(b'l', b'o', b'lo'), (b'lo', b'w', b'low'), (b' ', b'low', b' low')]
>>> train_merges_fast(counts, vocab_size=259) == (merges, vocab)
True
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

import regex

from .base import TokenizerError

# The pre-split regexes. GPT-2's splits off English contractions, letters (with one
# optional leading space), digits, other symbols, and whitespace. GPT-4's (cl100k)
# matches contractions case-insensitively, lets a word take one leading non-letter
# (" word", "_word", "'word"), caps numbers at 3 digits and keeps newlines apart.
# Our "gpt4" is tiktoken's cl100k pattern with `\p{N}{1,3}+` written `\p{N}{1,3}`
# (the same matches; the possessive interval is not valid in the Oniguruma regex of
# Hugging Face `tokenizers`, so this spelling also exports).
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}"""
             r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
}

Merge = tuple[int, int, int]  # (left id, right id, new id)


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "gpt4") or a regex -> the regex."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if not isinstance(pattern, str) or regex.fullmatch(r"[A-Za-z0-9_.-]*", pattern):
        raise TokenizerError(f"unknown pre-split pattern {pattern!r}: use one of {', '.join(PATTERNS)} "
                             "or a regular expression")
    return pattern


def count_pretokens(texts: Iterable[str], pattern: str, special_tokens: Iterable[str] = ()) -> dict[bytes, int]:
    """How often each distinct pre-token occurs: {utf-8 bytes: count}.

    Special-token strings in the text are cut out first, so they are never learned."""
    try:
        splitter = regex.compile(resolve_pattern(pattern))
    except regex.error as e:
        raise TokenizerError(f"bad pre-split pattern {pattern!r}: {e}") from None
    specials = sorted(set(special_tokens), key=len, reverse=True)
    special_re = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    counts: Counter[str] = Counter()
    for text in texts:
        parts = special_re.split(text) if special_re else (text,)
        for part in parts:
            counts.update(splitter.findall(part))  # Counter.update on a list runs in C
    return {word.encode("utf-8", errors="surrogatepass"): n for word, n in counts.items()}


def _check_size(vocab_size: int) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise TokenizerError(f"vocab_size must be at least 256 (the byte tokens), got {vocab_size!r}")


def _add_token(vocab: list[bytes], index: dict[bytes, int], token: bytes) -> int:
    """Id of ``token``, adding it to the vocabulary if it is new."""
    if token not in index:
        index[token] = len(vocab)
        vocab.append(token)
    return index[token]


def _merge_word(word: tuple[int, ...], a: int, b: int, new: int) -> tuple[int, ...]:
    """Replace every (a, b) in ``word``, left to right, by ``new``."""
    out = []
    i, n = 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_merges_textbook(word_counts: dict[bytes, int], vocab_size: int) -> tuple[list[Merge], list[bytes]]:
    """The plain algorithm: recount all pairs, merge the best, repeat.

    Returns (merges, vocab) where vocab[id] is the bytes of token ``id``."""
    _check_size(vocab_size)
    vocab = [bytes([i]) for i in range(256)]
    index = {t: i for i, t in enumerate(vocab)}
    # Each distinct pre-token as a tuple of byte ids, with how often it occurs.
    words = {tuple(w): n for w, n in word_counts.items()}
    merges: list[Merge] = []
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[int, int]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break  # every pre-token is already a single token
        # Highest count; ties: the smallest (left, right).
        a, b = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        new = _add_token(vocab, index, vocab[a] + vocab[b])
        merges.append((a, b, new))
        merged: Counter[tuple[int, ...]] = Counter()
        for word, n in words.items():
            merged[_merge_word(word, a, b, new)] += n
        words = merged
    return merges, vocab


def train_merges_fast(word_counts: dict[bytes, int], vocab_size: int) -> tuple[list[Merge], list[bytes]]:
    """Same merges as ``train_merges_textbook``, with incremental counts and a heap.

    State: each distinct pre-token once, as a list of ids, with its frequency; the count
    of every adjacent pair over the whole text; for every pair, the words it occurs in
    (a superset: entries are not removed when a word loses the pair); and a max-heap of
    (count, pair) whose entries may be stale (checked against the counts when popped).
    A merge of (a, b) rewrites only the words listed for (a, b), and only the pairs
    next to each occurrence change: x a b y -> x new y takes n from (x, a) and (b, y)
    and gives n to (x, new) and (new, y), for a word that occurs n times.

    Profile (10 MB of stdlib source, 56k distinct pre-tokens, 32k merges: ~2 s of CPU):
    the first ~750 merges ("  ", "e ", "th"...) touch most words and take a third of the
    time; the rest touch a few words each. Pairs as tuples cost ~13% over packed ints,
    kept for clarity."""
    _check_size(vocab_size)
    vocab = [bytes([i]) for i in range(256)]
    index = {t: i for i, t in enumerate(vocab)}
    words: list[list[int]] = []
    freqs: list[int] = []
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> word indices
    for w, n in word_counts.items():
        if len(w) < 2:
            continue  # a one-byte pre-token has no pair to merge
        wi = len(words)
        words.append(list(w))
        freqs.append(n)
        for pair in zip(w, w[1:]):
            pair_counts[pair] += n
            where[pair].add(wi)
    # Max-heap by count via negation; ties pop the smallest (a, b), as in the textbook.
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[Merge] = []
    heappush, heappop = heapq.heappush, heapq.heappop
    while len(vocab) < vocab_size and heap:
        neg, pair = heappop(heap)
        current = pair_counts.get(pair, 0)
        if current != -neg:  # stale entry: the count changed since it was pushed
            if current > 0:
                heappush(heap, (-current, pair))
            continue
        a, b = pair
        new = _add_token(vocab, index, vocab[a] + vocab[b])
        merges.append((a, b, new))
        grown: set[tuple[int, int]] = set()  # pairs whose count rose: pushed below
        for wi in where.pop(pair):
            word = words[wi]
            n = freqs[wi]
            length = len(word)
            out: list[int] = []
            copied = 0  # word[copied:] is not in `out` yet
            last_end = -1  # where the previous merge in this word ended
            i = word.index(a) if a in word else -1
            while i >= 0:
                if i + 1 < length and word[i + 1] == b:
                    out += word[copied:i]
                    if out:
                        if i != last_end:  # (x, a) goes; after a merge it went as (b, a)
                            pair_counts[word[i - 1], a] -= n
                        p = (out[-1], new)  # (x, new), or (new, new) after a merge
                        pair_counts[p] += n
                        grown.add(p)
                        where[p].add(wi)
                    if i + 2 < length:
                        y = word[i + 2]
                        pair_counts[b, y] -= n
                        # (new, y), unless y starts another (a, b): that one adds (new, new)
                        if not (y == a and i + 3 < length and word[i + 3] == b):
                            p = (new, y)
                            pair_counts[p] += n
                            grown.add(p)
                            where[p].add(wi)
                    out.append(new)
                    copied = last_end = i + 2
                    step = i + 2
                else:
                    step = i + 1
                try:
                    i = word.index(a, step)  # the next `a`, found in C
                except ValueError:
                    break
            if copied:
                out += word[copied:]
                words[wi] = out
        del pair_counts[pair]
        # A pair whose count fell keeps its old heap entry, now too high: it is fixed when
        # popped (see the top of the loop). A pair whose count rose needs a new entry.
        for p in grown:
            heappush(heap, (-pair_counts[p], p))
    return merges, vocab
