"""Finding the chunks that answer a question: dense, keyword (BM25), or both fused.

- **Dense**: embed the question with the index's model and take the chunks with the
  largest inner product (cosine). Finds paraphrases ("loop over items" ~ "for statement")
  but can miss a rare exact term (an error name, a function).
- **Keyword** (BM25, via bm25s): scores chunks by the question's words, weighting rare
  words more and saturating repeats. Exact terms, no paraphrase.
- **Hybrid**: both rankings fused by *reciprocal rank fusion*: a chunk scores
  ``sum over rankings of 1 / (c + rank)`` (rank from 1, c = 60). Only ranks matter, so the
  two incomparable score scales (cosine vs BM25) need no calibration, and a chunk near the
  top of both lists beats one at the top of only one.

>>> reciprocal_rank_fusion([[7, 3, 5], [3, 9]], c=60)   # 3: 1/62 + 1/61 beats 7: 1/61
[(3, 0.032522), (7, 0.016393), (9, 0.016129), (5, 0.015873)]
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from .errors import RagError
from .index import Hit, RagIndex

MODES = ("dense", "keyword", "hybrid")


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], c: int = 60,
                           digits: int | None = 6) -> list[tuple[int, float]]:
    """Fuse ranked lists of ids: (id, sum of 1/(c + rank)) best first; ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (c + rank)
    fused = sorted(scores.items(), key=lambda kv: -kv[1])  # sorted() is stable: ties keep order
    return [(i, round(s, digits) if digits is not None else s) for i, s in fused]


class Retriever:
    """An index with the embedding model that built it, ready to answer queries.

    Loads the index and the model once (the model is cached per process, see
    ``embed.load_embedder``) and checks that they belong together.

    >>> from scratchlm.rag.ingest import ToyEmbedder
    >>> from scratchlm.rag.index import RagIndex
    >>> from scratchlm.rag.loaders import Document
    >>> from scratchlm.rag.chunking import chunk_document
    >>> e = ToyEmbedder(); index = RagIndex.create(e.name, e.dim)
    >>> for name, text in [("cats.txt", "Cats purr and nap."), ("tax.txt", "Taxes are due in April.")]:
    ...     chunks = chunk_document(text, source=name)
    ...     index.add(Document(name, text, sha256=name), chunks, e.encode([c.text for c in chunks]))
    >>> [h.source for h in Retriever(index, e).search("when are taxes due?", k=2)]
    ['tax.txt', 'cats.txt']
    """

    def __init__(self, index: RagIndex | str | os.PathLike, embedder=None,
                 query_threads: int | None = 1):
        self.index = index if isinstance(index, RagIndex) else RagIndex.load(index)
        if embedder is None:
            from .embed import load_embedder

            embedder = load_embedder(self.index.meta["embedder"])
        self.index.check_embedder(embedder)
        self.embedder = embedder
        # One question is too small a job to split over threads: every step of the encoder
        # and the search would wait for all threads to meet, and on a busy machine that
        # wait dominates (measured: 2 threads 5-10x slower than 1 on a loaded 2-core CPU,
        # see benchmarks/rag.py). None leaves torch's and FAISS's settings alone.
        self.query_threads = query_threads
        self._lock = threading.Lock()  # FAISS / SQLite / torch calls from server threads, one at a time

    def search(self, question: str, k: int = 4, mode: str = "dense") -> list[Hit]:
        """The ``k`` best chunks for ``question``, best first (scores: cosine, BM25 or fused)."""
        if mode not in MODES:
            raise RagError(f"unknown retrieval mode {mode!r}; choose from {', '.join(MODES)}")
        if not question.strip():
            raise RagError("the question is empty")
        if k < 1:
            raise RagError(f"k must be at least 1, got {k}")
        with self._lock, _threads(self.query_threads):
            if mode == "keyword":
                found = self.index.keyword_search(question, k)
                return self.index.hits([i for i, _ in found], [s for _, s in found])
            query = self.embedder.encode_query(question)
            if mode == "dense":
                return self.index.search(query, k)
            # Hybrid: fuse deeper lists than k, so a chunk ranked 6th by one method and
            # 2nd by the other can still make the top k.
            depth = max(4 * k, 20)
            dense_ids, _ = self.index.search_ids(query, depth)
            keyword_ids = [i for i, _ in self.index.keyword_search(question, depth)]
            fused = reciprocal_rank_fusion([list(map(int, dense_ids)), keyword_ids], digits=None)[:k]
            return self.index.hits([i for i, _ in fused], [s for _, s in fused])


@contextlib.contextmanager
def _threads(n: int | None):
    """Run torch and FAISS on ``n`` threads inside the block (None: unchanged)."""
    if n is None:
        yield
        return
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def open_retriever(index_dir: str | os.PathLike | None = None, embedder=None,
                   build_default: bool = True) -> Retriever:
    """A Retriever over ``index_dir``; with None, the built-in Python-reference index,
    built on first use (about a minute on a laptop CPU) when ``build_default``."""
    from .ingest import default_index_dir, index_documents

    if index_dir is None:
        index_dir = default_index_dir()
        if build_default and not (Path(index_dir) / "chunks.sqlite").exists():
            import sys

            print(f"scratchlm: building the Python reference index in {index_dir} (once)...",
                  file=sys.stderr, flush=True)
            index_documents(None, index_dir, embedder=embedder)
    return Retriever(index_dir, embedder)


__all__ = ["Retriever", "reciprocal_rank_fusion", "open_retriever", "MODES"]
