"""Building and refreshing an index from files: read, chunk, embed only what changed, save.

``index_documents`` is what ``scratchlm rag index`` runs:

1. find the files under the given paths (or take the built-in Python reference);
2. compare each file's content hash with the one stored in the index: unchanged files
   are skipped, new and changed ones are read, chunked and embedded, and files that were
   indexed from under those paths but are gone now are removed (files indexed from
   *other* paths are kept, so several folders can share one index);
3. save the index atomically: if anything fails before that (an unreadable PDF, a
   different embedding model), the index on disk is exactly as it was.

An index remembers the embedding model and chunk size it was built with; asking to
update it with different ones is an error (``rebuild=True`` starts it afresh instead),
because vectors from two models are not comparable.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "a.md").write_text("# Cats\\nCats purr.")
>>> report = index_documents([folder], folder / "index", embedder=ToyEmbedder())
>>> report.added, report.n_chunks
(1, 1)
>>> index_documents([folder], folder / "index", embedder=ToyEmbedder()).unchanged
1
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chunking import chunk_document
from .errors import RagError
from .index import PROBE_TEXT, RagIndex, find_index_dir
from .loaders import find_documents, load_document, python_reference_documents

DEFAULT_CHUNK_TOKENS, DEFAULT_OVERLAP = 128, 16
MAX_CHUNK_TOKENS = 1 << 16


def default_index_dir() -> Path:
    """Where the built-in Python-reference index lives: $SCRATCHLM_RAG_INDEX, else the user cache."""
    if os.environ.get("SCRATCHLM_RAG_INDEX"):
        return Path(os.environ["SCRATCHLM_RAG_INDEX"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "scratchlm" / "rag" / "python-reference"


@dataclass
class IndexReport:
    """What an update did."""

    path: Path
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    n_chunks: int = 0  # chunks in the index after the update
    embedded: int = 0  # chunks embedded by this update
    skipped: list[str] = field(default_factory=list)  # "file: reason" for files left out

    def summary(self) -> str:
        text = (f"{self.path}: {self.n_chunks} chunks; files: {self.added} added, {self.changed} changed, "
                f"{self.removed} removed, {self.unchanged} unchanged ({self.embedded} chunks embedded)")
        return text + (f"; {len(self.skipped)} skipped" if self.skipped else "")


def index_documents(paths: Iterable[str | os.PathLike] | None, index_dir: str | os.PathLike | None = None,
                    *, embedder=None, embedder_name: str | None = None, kind: str | None = None,
                    max_tokens: int | None = None, overlap: int | None = None,
                    rebuild: bool = False, skip_errors: bool = False,
                    progress: bool = False) -> IndexReport:
    """Create or refresh the index at ``index_dir`` from the files under ``paths``.

    ``paths=None`` (or empty) indexes the Python language reference topics, and
    ``index_dir=None`` means ``default_index_dir()``. ``embedder``: an object with
    ``name``, ``dim``, ``encode(texts)`` and ``token_spans(text)`` (default: the cached
    sentence-transformers model named by ``embedder_name`` or recorded in the index).
    ``skip_errors``: leave out unreadable files (listed in the report) instead of failing.
    """
    _check_chunk_sizes(max_tokens, overlap)
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
    index = None
    fresh_folder = index_dir.is_dir() and not any(index_dir.iterdir())  # e.g. made with mkdir first
    if not rebuild and not fresh_folder:
        try:
            index = RagIndex.load(find_index_dir(index_dir))
        except FileNotFoundError:
            index = None
    name = embedder.name if embedder is not None else embedder_name
    if name is not None:
        from .embed import canonical_name

        name = canonical_name(name)
    if index is not None:
        _check_same_settings(index, index_dir, name, kind, max_tokens, overlap)
        name = index.meta["embedder"]
        kind, max_tokens, overlap = index.meta["kind"], index.meta["max_tokens"], index.meta["overlap"]
    else:
        max_tokens = max_tokens or DEFAULT_CHUNK_TOKENS
        overlap = DEFAULT_OVERLAP if overlap is None else overlap
    _check_chunk_sizes(max_tokens, overlap, defaults=index is None)  # the sizes in force, still before any model
    if embedder is None:
        from .embed import DEFAULT_EMBEDDER, load_embedder

        embedder = load_embedder(name or DEFAULT_EMBEDDER)
    if index is None:
        index = RagIndex.create(embedder.name, embedder.dim, kind=kind or "flat",
                                max_tokens=max_tokens, overlap=overlap,
                                probe=embedder.encode([PROBE_TEXT])[0])
    else:
        index.check_embedder(embedder)

    readable = getattr(embedder, "max_tokens", None)  # the model's limit, special tokens included
    if readable is not None and index.meta["max_tokens"] + 2 > readable:
        raise RagError(f"chunks of {index.meta['max_tokens']} tokens are longer than the {readable} "
                       f"tokens {embedder.name} reads; use --chunk-tokens {readable - 2} or less")
    report = IndexReport(index_dir)
    documents, roots = _documents_to_index(paths, report, skip_errors)
    known = index.sources()
    max_tokens, overlap = index.meta["max_tokens"], index.meta["overlap"]
    for n, doc in enumerate(documents, start=1):
        if known.get(doc.source) == doc.sha256:
            report.unchanged += 1
            continue
        chunks = chunk_document(doc.text, source=doc.source, max_tokens=max_tokens, overlap=overlap,
                                token_spans=embedder.token_spans, page_starts=doc.page_starts)
        vectors = embedder.encode([c.text for c in chunks])
        index.add(doc, chunks, vectors)
        report.embedded += len(chunks)
        if doc.source in known:
            report.changed += 1
        else:
            report.added += 1
        if progress:
            print(f"\r  embedded {n}/{len(documents)} files ({report.embedded} chunks)", end="",
                  file=sys.stderr, flush=True)
    if progress and report.embedded:
        print(file=sys.stderr)
    present = {d.source for d in documents}
    for source in known:
        if source not in present and _under(source, roots):
            index.remove(source)
            report.removed += 1
    report.n_chunks = len(index)
    if report.n_chunks == 0:
        raise RagError("nothing to index: the documents hold no text")
    if report.added or report.changed or report.removed or not (index_dir / "chunks.sqlite").exists():
        index.save(index_dir)
    return report


def _check_chunk_sizes(max_tokens, overlap, defaults: bool = False) -> None:
    """Refuse chunk sizes that cannot work before any model is loaded (None: the default)."""
    for flag, value, low in (("--chunk-tokens", max_tokens, 1), ("--overlap", overlap, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise RagError(f"{flag} must be a whole number of at least {low}, got {value!r}")
    if max_tokens is not None and max_tokens > MAX_CHUNK_TOKENS:
        raise RagError(f"--chunk-tokens must be at most {MAX_CHUNK_TOKENS} (an embedder reads a few hundred), "
                       f"got {max_tokens}")
    if max_tokens is not None and overlap is not None and not overlap < max_tokens / 2:
        given = f"{max_tokens}, the default" if defaults and max_tokens == DEFAULT_CHUNK_TOKENS else max_tokens
        raise RagError(f"--overlap must be less than half of --chunk-tokens ({given}), got {overlap}")


def _check_same_settings(index: RagIndex, index_dir: Path, name, kind, max_tokens, overlap) -> None:
    meta = index.meta
    asked = {"embedder": name, "kind": kind, "max_tokens": max_tokens, "overlap": overlap}
    for key, value in asked.items():
        if value is not None and value != meta[key]:
            raise RagError(f"{index_dir} was built with {key} {meta[key]!r}, not {value!r}; "
                           "use --rebuild to rebuild it, or another --index directory")


def _documents_to_index(paths, report: IndexReport, skip_errors: bool):
    """(documents, roots): the documents to index and the paths whose deleted files to drop."""
    paths = [Path(p) for p in paths or []]
    if not paths:
        return python_reference_documents(), ["python-reference:"]
    documents = []
    for file in find_documents(paths, report.skipped):
        try:
            doc = load_document(file)
        except (RagError, OSError) as e:
            if not skip_errors:
                raise
            report.skipped.append(str(e).splitlines()[0])
            continue
        if not doc.text.strip():
            report.skipped.append(f"{file}: no text (a scanned PDF needs OCR first)")
            continue
        documents.append(doc)
    if not documents:
        raise RagError(f"no text to index in {', '.join(map(str, paths))}"
                       + (f" ({report.skipped[0]})" if report.skipped else ""))
    roots = [str(p.resolve()) for p in paths]
    return documents, roots


def _under(source: str, roots: list[str]) -> bool:
    """Whether ``source`` was found under one of ``roots`` (a file path or the built-in prefix)."""
    for root in roots:
        if root.endswith(":"):
            if source.startswith(root):
                return True
        elif source == root or source.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


class ToyEmbedder:
    """A tiny, dependency-free embedder for examples and tests: hashed bags of words.

    Each word adds 1 to one of ``dim`` buckets (chosen by a stable hash), then the vector
    is scaled to length 1. Texts sharing words get a high inner product: enough to show
    how retrieval works without loading a neural model.

    >>> e = ToyEmbedder()
    >>> v = e.encode(["cats purr", "cats purr loudly", "stock prices"])
    >>> bool(v[0] @ v[1] > v[0] @ v[2])
    True
    """

    def __init__(self, dim: int = 256, name: str = "toy-hashed-words"):
        self.dim, self.name = dim, name

    def token_spans(self, text: str):
        from .chunking import word_spans

        return word_spans(text)

    def encode(self, texts) -> np.ndarray:
        import re
        import zlib

        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[row, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode([text])[0]


__all__ = ["index_documents", "IndexReport", "default_index_dir", "ToyEmbedder"]
