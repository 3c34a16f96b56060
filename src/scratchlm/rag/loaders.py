"""Documents from files: .txt, .md, .html and .pdf become plain text with page starts.

Everything downstream (chunking, offsets, citations) works on a ``Document``'s ``text``;
a chunk's ``start``/``end`` are offsets into it. Formats differ only in how that text is
made:

- ``.txt`` / ``.md``: the file decoded as UTF-8, unchanged (Markdown headings are found
  later by ``chunking.find_headings``).
- ``.html``: the visible text, one block element per paragraph; ``<h1>``-``<h6>`` become
  Markdown ``#`` lines so the same heading finder sees them; scripts and styles dropped.
- ``.pdf`` (pypdf): the text of each page, pages joined by a blank line; ``page_starts``
  records where each page begins so a chunk knows its page. An encrypted PDF that opens
  with the empty password is read; any other is refused with a clear error.

>>> import pathlib, tempfile
>>> p = pathlib.Path(tempfile.mkdtemp()) / "note.html"
>>> _ = p.write_text("<html><title>T</title><h2>Usage</h2><p>Run   it.</p><script>x()</script></html>")
>>> doc = load_document(p)
>>> doc.title, doc.text
('T', '## Usage\\n\\nRun it.\\n')
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NotFound
from .errors import RagError

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")


@dataclass(frozen=True)
class Document:
    """The text of one source, ready to chunk.

    ``source`` names it in citations (a resolved file path, or e.g. ``python-reference:with``);
    ``sha256`` is the hash of the raw content, which re-indexing compares to skip unchanged
    files; ``page_starts[i]`` is where page i+1 begins in ``text`` (empty: not paged).
    """

    source: str
    text: str
    sha256: str
    title: str = ""
    page_starts: tuple[int, ...] = field(default=())


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_documents(paths: Iterable[str | os.PathLike], skipped: list[str] | None = None) -> list[Path]:
    """The supported files under ``paths`` (files or folders, searched recursively), sorted.

    Hidden files and folders (a name starting with ".") are skipped. A symlink is judged
    by its own name (``notes.txt`` -> ``notes``, no suffix, is a .txt) and read once
    however many links lead to one file. Under a folder, a supported name that is not a
    regular file (a FIFO, a socket, a device, a broken link) is passed over, never opened
    (reading a FIFO blocks forever), with a line in ``skipped`` saying so. Raises NotFound
    for a missing path, RagError for a named path that is not a regular file or folder,
    and RagError when nothing indexable is found.
    """
    found: dict[Path, Path] = {}  # the real file -> the path it was found by
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            kind = "a broken symlink" if path.is_symlink() else "no such file or folder"
            raise NotFound(f"{kind}: {path}")
        if not (path.is_file() or path.is_dir()):
            raise RagError(f"{path}: not a regular file or folder ({_file_kind(path)}); give files or folders")
        if path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise RagError(f"{path}: unsupported file type {path.suffix or '(none)'}; "
                               f"expected one of {', '.join(SUFFIXES)}")
            found.setdefault(path.resolve(), path.absolute())
            continue
        for file in path.rglob("*"):
            hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
            if hidden or file.suffix.lower() not in SUFFIXES:
                continue
            if file.is_file():
                found.setdefault(file.resolve(), file.absolute())
            elif not file.is_dir() and skipped is not None:
                skipped.append(f"{file}: not a regular file ({_file_kind(file)})")
    if not found:
        where = ", ".join(str(p) for p in paths)
        raise RagError(f"no {', '.join(SUFFIXES)} files found in {where}")
    return [found[real] for real in sorted(found)]


def _file_kind(path: Path) -> str:
    """What a path that is neither a regular file nor a folder is, in words."""
    if path.is_symlink() and not path.exists():
        return "a broken symlink"
    for test, kind in ((path.is_fifo, "a FIFO"), (path.is_socket, "a socket"),
                       (path.is_block_device, "a block device"), (path.is_char_device, "a character device")):
        if test():
            return kind
    return "a special file"


def load_document(path: str | os.PathLike) -> Document:
    """Read one file into a Document (see the module docstring for what each format gives)."""
    path = Path(path)
    data = path.read_bytes()
    suffix = path.suffix.lower()
    source = str(path.resolve())
    if suffix == ".pdf":
        return _pdf_document(path, data, source)
    text = _decode(path, data)
    if suffix in (".html", ".htm"):
        title, text = html_to_text(text)
        return Document(source, text, content_hash(data), title or path.stem)
    if suffix in SUFFIXES:
        return Document(source, text, content_hash(data), path.stem)
    raise RagError(f"{path}: unsupported file type {suffix or '(none)'}")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RagError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


# ---- HTML ----------------------------------------------------------------------------

_BLOCKS = {"p", "div", "section", "article", "header", "footer", "main", "nav", "aside", "li",
           "ul", "ol", "dl", "dt", "dd", "table", "tr", "blockquote", "figure", "figcaption",
           "form", "hr", "br", "pre", "td", "th"}
_SKIP = {"script", "style", "noscript", "template", "head", "svg"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


class _TextExtractor(html.parser.HTMLParser):
    """Collects visible text as a list of paragraphs (each a list of text pieces)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0
        self.heading_level = 0
        self.title = ""
        self.in_title = False

    def _flush(self):
        text = "".join(self.current)
        text = text.strip("\n") if self.pre_depth else " ".join(text.split())
        if text.strip():
            prefix = "#" * self.heading_level + " " if self.heading_level else ""
            self.paragraphs.append(prefix + text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in _SKIP:
            self.skip_depth += 1
        elif tag in _BLOCKS or tag in _HEADINGS:
            self._flush()
            if tag in _HEADINGS:
                self.heading_level = int(tag[1])
            if tag == "pre":
                self.pre_depth += 1

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCKS or tag in _HEADINGS:
            self._flush()
            if tag in _HEADINGS:
                self.heading_level = 0
            if tag == "pre":
                self.pre_depth = max(0, self.pre_depth - 1)

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        elif not self.skip_depth:
            self.current.append(data)


def html_to_text(markup: str) -> tuple[str, str]:
    """(title, text) of an HTML page: visible text, a blank line between blocks."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    parser._flush()
    text = "\n\n".join(parser.paragraphs)
    return " ".join(parser.title.split()), (text + "\n" if text else "")


# ---- PDF -----------------------------------------------------------------------------

def _pdf_document(path: Path, data: bytes, source: str) -> Document:
    import io

    from pypdf import PdfReader
    from pypdf.errors import DependencyError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password (only printing or
            # copying is restricted): those open; a real password is the user's to give.
            try:
                opened = reader.decrypt("")
            except DependencyError:
                opened = 0
            if not opened:
                raise RagError(f"{path}: the PDF is encrypted with a password; decrypt it first "
                               "(e.g. qpdf --decrypt --password=... in.pdf out.pdf)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except RagError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RagError(f"{path}: not a readable PDF ({first})") from None
    page_starts, parts, offset = [], [], 0
    for text in pages:
        text = text.rstrip() + "\n\n"  # a blank line between pages: a paragraph break
        page_starts.append(offset)
        parts.append(text)
        offset += len(text)
    title = (reader.metadata.title if reader.metadata and reader.metadata.title else "") or path.stem
    return Document(source, "".join(parts), content_hash(data), str(title), tuple(page_starts))


# ---- the built-in corpus -------------------------------------------------------------

def python_reference_documents() -> list[Document]:
    """The Python language reference topics (``pydoc_data.topics``), one Document each.

    Sources are named ``python-reference:<topic>`` (what ``help("<topic>")`` shows); the
    title is the topic's first line, e.g. ``The "with" statement``.

    >>> docs = python_reference_documents()
    >>> next(d.title for d in docs if d.source == "python-reference:with")
    'The "with" statement'
    """
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        text = topics[name]
        title = re.sub(r"\s+", " ", text.strip().split("\n", 1)[0])
        docs.append(Document(f"python-reference:{name}", text, content_hash(text.encode()), title))
    return docs


__all__ = ["Document", "SUFFIXES", "find_documents", "load_document", "html_to_text",
           "python_reference_documents", "content_hash"]
