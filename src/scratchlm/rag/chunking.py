"""Split a document into overlapping chunks of at most N tokens, cut where the text breaks.

An embedding model reads a bounded number of tokens (all-MiniLM-L6-v2: 256 word pieces)
and a long passage blurs into one averaged vector, so documents are cut into chunks.
Three rules decide where:

1. **Size by tokens, not characters.** A chunk holds at most ``max_tokens`` tokens of the
   tokenizer that will embed it, so nothing is silently truncated by the embedder.
2. **Cut where the text breaks.** Among the token positions where a chunk may end (after
   at least half of ``max_tokens``, so chunks are not tiny), take the strongest break: a
   blank line (paragraph) beats a line break, which beats the end of a sentence, which
   beats any gap between two words; among equals, the latest (longest chunk) wins.
3. **Overlap exactly ``overlap`` tokens.** The next chunk starts ``overlap`` tokens before
   the previous one ended, so a sentence cut in two is still whole in one of them.

Chunks are character spans ``[start, end)`` of the document's text: ``text[start:end]``
*is* the chunk, the spans cover every character (the first starts at 0, each starts
before the previous ends, the last ends at ``len(text)``), and whitespace between two
tokens stays with the chunk before it. Hard breaks (the pages of a PDF) are never
crossed: each page is chunked on its own, so every chunk has exactly one page.

>>> text = "One two three. Four five six.\\n\\nSeven eight nine ten."
>>> [c.text for c in chunk_text(text, max_tokens=8, overlap=2)]
['One two three. Four five six.\\n\\n', 'six.\\n\\nSeven eight nine ten.']
>>> [(c.start, c.end) for c in chunk_text(text, max_tokens=8, overlap=2)]
[(0, 31), (25, 52)]
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import RagError

# A tokenizer for sizing chunks: text -> the (start, end) character span of each token.
TokenSpans = Callable[[str], Sequence[tuple[int, int]]]

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def word_spans(text: str) -> list[tuple[int, int]]:
    """Words and punctuation marks, each one token: the BERT-style split before word pieces.

    The default for sizing chunks when no embedder tokenizer is given (it undercounts word
    pieces by ~25%, so pass the embedder's own spans when the limit matters, as
    ``index.py`` does).

    >>> text = "Hello, world!"
    >>> [text[a:b] for a, b in word_spans(text)]
    ['Hello', ',', 'world', '!']
    """
    return [m.span() for m in _WORD_OR_MARK.finditer(text)]


# Strength of a break in the gap before a token: which cut points the chunker prefers.
NEVER, WORD, SENTENCE, LINE, PARAGRAPH = -1, 0, 1, 2, 3  # NEVER: only if no other place
_SENTENCE_END = frozenset(".!?:;")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_UNDERLINE = re.compile(r"([=\-*~^])\1{2,}[ \t]*$", re.M)


def break_strength(text: str, prev_token: tuple[int, int], token: tuple[int, int]) -> int:
    """How strong a place to cut the gap between two neighbouring tokens is.

    >>> t = "A b.\\n\\nC d. E"
    >>> s = word_spans(t)   # A, b, ., C, d, ., E
    >>> [break_strength(t, s[i - 1], s[i]) for i in range(1, len(s))]
    [0, 0, 3, 0, 0, 1]
    """
    gap = text[prev_token[1]:token[0]]
    if "\n" in gap:
        if _UNDERLINE.match(text, token[0]):  # a title and its ==== underline stay together
            return NEVER
        return PARAGRAPH if _BLANK_LINE.search(gap) else LINE
    if gap and text[prev_token[1] - 1] in _SENTENCE_END:
        return SENTENCE
    return WORD


@dataclass(frozen=True)
class Chunk:
    """A span of a document: ``document_text[start:end] == text``.

    ``page`` is 1-based for paged documents (PDF) and None otherwise; ``heading`` is the
    title of the section the chunk starts in (None before the first heading).
    """

    source: str
    text: str
    start: int
    end: int
    page: int | None = None
    heading: str | None = None
    position: int = 0  # index of the chunk within its document


def chunk_text(text: str, max_tokens: int = 128, overlap: int = 16, *, source: str = "",
               token_spans: TokenSpans = word_spans, page: int | None = None,
               offset: int = 0) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``max_tokens`` tokens overlapping by ``overlap``.

    ``offset`` is added to every start/end (used when ``text`` is one page of a longer
    document). Text with no token (empty or only whitespace) gives no chunk.
    """
    if max_tokens < 1:
        raise RagError(f"max_tokens must be at least 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens / 2:
        raise RagError(f"overlap must be >= 0 and less than half of max_tokens ({max_tokens}), got {overlap}")
    spans = list(token_spans(text))
    n = len(spans)
    if n == 0:
        return []
    # Shortest chunk allowed when a strong break invites an early cut: half the maximum,
    # and always more than the overlap, so every chunk moves the window forward.
    min_tokens = max(overlap + 1, max_tokens // 2)
    strengths = [WORD] + [break_strength(text, spans[i - 1], spans[i]) for i in range(1, n)]

    chunks: list[Chunk] = []
    first = 0  # index of the chunk's first token
    while True:
        if n - first <= max_tokens:  # the rest fits: the last chunk runs to the end
            end_token, end_char = n, len(text)
        else:
            # Cut before token j, j in [first + min_tokens, first + max_tokens]: strongest
            # break first, then the latest one (max over (strength, j)).
            candidates = range(first + min_tokens, first + max_tokens + 1)
            end_token = max(candidates, key=lambda j: (strengths[j], j))
            end_char = spans[end_token][0]
        start_char = 0 if first == 0 else spans[first][0]
        chunks.append(Chunk(source=source, text=text[start_char:end_char], start=start_char + offset,
                            end=end_char + offset, page=page, position=len(chunks)))
        if end_token == n:
            return chunks
        first = end_token - overlap


# Headings: Markdown "# Title" lines, and reStructuredText/setext titles underlined with a
# row of = - * ~ ^ (the Python reference topics use these).
# The title runs to the end of the line and its closing " ##" is stripped in Python: a lazy
# "(.+?)[ \t#]*$" retries the tail at every character, quadratic on a line that ends in a
# long run of spaces or hashes followed by anything else (issue 11: 1 MB lines).
_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(\S[^\n]*)$", re.M)
# The title ends at its last non-space character: "[^\n]*\S[^\n]*" would let the two
# runs trade characters, which is quadratic in the length of a line with no underline.
_UNDERLINED_HEADING = re.compile(r"^([^\n]*\S)[^\S\n]*\n([=\-*~^])\2{2,}[ \t]*$", re.M)


def find_headings(text: str) -> list[tuple[int, str]]:
    """(character position, title) of every heading in ``text``, in order.

    >>> find_headings("# Intro\\nhi\\n\\nUsage\\n=====\\nrun it")
    [(0, 'Intro'), (12, 'Usage')]
    """
    found = [(m.start(), title) for m in _ATX_HEADING.finditer(text)
             if (title := m.group(1).rstrip(" \t#").strip())]
    found += [(m.start(), m.group(1).strip()) for m in _UNDERLINED_HEADING.finditer(text)
              if not set(m.group(1).strip()) <= set("=-*~^ ")]
    return sorted(found)


def chunk_document(text: str, *, source: str = "", max_tokens: int = 128, overlap: int = 16,
                   token_spans: TokenSpans = word_spans,
                   page_starts: Sequence[int] = ()) -> list[Chunk]:
    """Chunk a whole document: pages chunked apart, each chunk tagged with page and heading.

    ``page_starts`` are the character positions where pages 1, 2, ... begin (empty for an
    unpaged document). Offsets are into ``text``; ``position`` counts chunks across pages.

    >>> doc = "Intro\\n=====\\nSome words here.\\n"
    >>> [(c.heading, c.page) for c in chunk_document(doc, source="a.md")]
    [('Intro', None)]
    """
    starts = list(page_starts) or [0]
    bounds = list(zip(starts, starts[1:] + [len(text)]))
    chunks: list[Chunk] = []
    for number, (a, b) in enumerate(bounds, start=1):
        page = number if page_starts else None
        chunks += chunk_text(text[a:b], max_tokens, overlap, source=source,
                             token_spans=token_spans, page=page, offset=a)
    headings = find_headings(text)
    heading_pos = [pos for pos, _ in headings]
    tagged = []
    for position, c in enumerate(chunks):
        # The section a chunk belongs to: the last heading at or before its first
        # non-blank character (so a chunk that opens with a heading gets that heading).
        first_char = c.start + (len(c.text) - len(c.text.lstrip()))
        i = bisect.bisect_right(heading_pos, first_char) - 1
        heading = headings[i][1] if i >= 0 else None
        tagged.append(Chunk(source=c.source, text=c.text, start=c.start, end=c.end, page=c.page,
                            heading=heading, position=position))
    return tagged


__all__ = ["Chunk", "chunk_text", "chunk_document", "find_headings", "word_spans", "break_strength",
           "TokenSpans"]
