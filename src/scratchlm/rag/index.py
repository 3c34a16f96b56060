"""The index: chunks, their vectors and a FAISS index over them, saved as one directory.

::

    INDEX_DIR/
      chunks.sqlite   what the vectors mean: every chunk's source, page, heading, offsets
                      and text, plus its embedding (the source of truth), the files with
                      their content hashes, and the settings the index was built with
      index.faiss     the FAISS search structure over the embeddings (ids = chunk ids)
      bm25/           a bm25s keyword index over the same chunks, for hybrid retrieval

**Why keep the vectors in SQLite too?** FAISS structures differ in what they can
update: a flat index can drop ids, an HNSW graph cannot. Keeping every embedding beside
its chunk makes any change simple and always consistent: edit the rows, then rebuild
the FAISS structure from them (milliseconds for flat, seconds for HNSW at 100k chunks).
``index.faiss`` is saved only so that loading for a query is instant.

**Kinds of FAISS index** (``kind=``), all by inner product, which for unit vectors is
the cosine similarity:

- ``flat`` (default): exact, compares the query with every vector. ~100k vectors of
  dimension 384 is 150 MB read per query: a few ms to ~15 ms on a CPU.
- ``hnsw``: a navigable small-world graph; visits a few hundred vectors per query, so
  well under a millisecond at 100k, at the price of a slower build and a recall a hair
  below 1.
- ``ivf``: vectors bucketed around k-means centroids; searches the ``nprobe`` nearest
  buckets. Needs training, so it suits large, rarely changed collections.

**Saving is atomic**: everything is written to a temporary sibling directory, which is
then renamed over the old one, so an interrupted save or a failed re-index leaves the
previous index whole. A directory that exists but is not an index is never replaced.

>>> import numpy as np, tempfile
>>> from scratchlm.rag.loaders import Document
>>> from scratchlm.rag.chunking import Chunk
>>> index = RagIndex.create(embedder="toy", dim=2)
>>> doc = Document("a.txt", "left. right.", sha256="x")
>>> chunks = [Chunk("a.txt", "left.", 0, 5), Chunk("a.txt", " right.", 5, 12, position=1)]
>>> index.add(doc, chunks, np.array([[1, 0], [0, 1]], np.float32))
>>> d = index.save(tempfile.mkdtemp() + "/idx")
>>> [(h.text, round(h.score, 2)) for h in RagIndex.load(d).search(np.array([0.6, 0.8]), k=2)]
[(' right.', 0.8), ('left.', 0.6)]
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NotFound
from .chunking import Chunk
from .errors import RagError
from .loaders import Document

FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "hnsw", "ivf")
DB_FILE, FAISS_FILE, BM25_DIR = "chunks.sqlite", "index.faiss", "bm25"
# A fixed sentence whose vector the index stores, to recognise the model that built it.
PROBE_TEXT = "A probe sentence: the quick brown fox jumps over the lazy dog."

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (source TEXT PRIMARY KEY, sha256 TEXT NOT NULL, title TEXT NOT NULL);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL REFERENCES files(source),
    position INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    page INTEGER,
    heading TEXT,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX chunks_by_source ON chunks(source);
"""


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk: where it comes from, its text and how well it matched."""

    id: int
    source: str
    title: str
    text: str
    start: int
    end: int
    page: int | None
    heading: str | None
    score: float

    def label(self) -> str:
        """How a citation names it: ``source, p. 3 (Heading)``."""
        where = self.source + (f", p. {self.page}" if self.page else "")
        section = self.heading or self.title
        return f"{where} ({section})" if section else where

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "title": self.title, "page": self.page,
                "heading": self.heading, "start": self.start, "end": self.end,
                "score": round(float(self.score), 6), "text": self.text}


class RagIndex:
    """Chunks + embeddings (SQLite) + a FAISS index over them. See the module docstring."""

    def __init__(self, db: sqlite3.Connection, meta: dict, faiss_index=None,
                 path: Path | None = None):
        self._db = db
        self.meta = meta
        self._faiss = faiss_index  # None: stale, rebuilt from the embeddings when needed
        self._bm25 = None
        self.path = path  # where it was loaded from (None: built in memory)
        self._writable = path is None  # a loaded index is read-only until the first change

    # ---- creating, loading, saving ------------------------------------------------------

    @classmethod
    def create(cls, embedder: str, dim: int, kind: str = "flat", max_tokens: int = 128,
               overlap: int = 16, probe: Sequence[float] | None = None) -> RagIndex:
        """An empty index for vectors of ``dim`` from embedding model ``embedder``.

        ``probe``: the model's vector for ``PROBE_TEXT``; ``check_embedder`` compares it
        later to catch a different model that goes by the same name or dimension.
        """
        if kind not in INDEX_KINDS:
            raise RagError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.executescript(_SCHEMA)
        meta = {"format": FORMAT_VERSION, "embedder": embedder, "dim": int(dim), "kind": kind,
                "metric": "inner_product", "max_tokens": max_tokens, "overlap": overlap,
                "probe": None if probe is None else [round(float(x), 6) for x in probe]}
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        return cls(db, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RagIndex:
        """Open a saved index (read-only until changed). Clear errors for anything amiss."""
        path = find_index_dir(path)
        try:
            db = sqlite3.connect(f"file:{path / DB_FILE}?mode=ro", uri=True, check_same_thread=False)
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            raise RagError(f"{path / DB_FILE} is corrupt ({e}); rebuild the index with --rebuild") from None
        if meta.get("format") != FORMAT_VERSION:
            raise RagError(f"{path} is index format {meta.get('format')}, this scratchlm reads "
                           f"{FORMAT_VERSION}; rebuild it with --rebuild")
        import faiss

        try:
            faiss_index = faiss.read_index(str(path / FAISS_FILE))
        except RuntimeError as e:
            raise RagError(f"{path / FAISS_FILE} is missing or corrupt; rebuild the index with "
                           f"--rebuild ({str(e).splitlines()[0][:80]})") from None
        index = cls(db, meta, faiss_index, path)
        n_chunks = len(index)
        if faiss_index.d != meta["dim"] or faiss_index.ntotal != n_chunks:
            raise RagError(f"{path} is inconsistent: {faiss_index.ntotal} vectors of dimension "
                           f"{faiss_index.d} for {n_chunks} chunks of dimension {meta['dim']}; "
                           "rebuild it with --rebuild")
        return index

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole index to directory ``path`` atomically; returns the path."""
        import faiss

        path = Path(path)
        if path.exists() and not (path / DB_FILE).exists() and (not path.is_dir() or any(path.iterdir())):
            raise RagError(f"{path} exists and is not a scratchlm index; choose another --index directory")
        from ..atomic import atomic_directory  # the same atomic swap as model directories

        with atomic_directory(path, marker=[DB_FILE]) as tmp:
            out = sqlite3.connect(tmp / DB_FILE)
            with out:
                self._db.backup(out)
            out.close()
            faiss.write_index(self.faiss_index(), str(tmp / FAISS_FILE))
            if len(self):
                bm25, ids = self.bm25()
                bm25.save(str(tmp / BM25_DIR))
                np.save(tmp / BM25_DIR / "ids.npy", ids)
        self.path = path
        return path

    def check_embedder(self, embedder) -> None:
        """Raise RagError unless ``embedder`` makes vectors comparable with the indexed ones."""
        where = self.path or "the index"
        if embedder.dim != self.meta["dim"]:
            raise RagError(f"{where} was built with {self.meta['embedder']} (dimension {self.meta['dim']}); "
                           f"the embedding model {embedder.name} gives dimension {embedder.dim}; "
                           "use the same model, or rebuild the index with --rebuild")
        probe = self.meta.get("probe")
        if probe is not None:
            similarity = float(np.dot(embedder.encode([PROBE_TEXT])[0], np.asarray(probe, np.float32)))
            if similarity < 0.98:
                raise RagError(f"{where} was built with a different embedding model "
                               f"({self.meta['embedder']}) than {embedder.name} (probe cosine "
                               f"{similarity:.2f}); use the same model, or rebuild with --rebuild")

    # ---- contents ---------------------------------------------------------------------

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def sources(self) -> dict[str, str]:
        """{source: sha256 of its content} of every indexed document."""
        return dict(self._db.execute("SELECT source, sha256 FROM files"))

    def add(self, doc: Document, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        """Add (or replace) one document's chunks with their unit vectors."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.meta["dim"]):
            raise RagError(f"expected {len(chunks)} vectors of dimension {self.meta['dim']} "
                           f"(embedder {self.meta['embedder']}), got shape {vectors.shape}")
        self._make_writable()
        with self._db:  # one transaction: a document is in whole or not at all
            self._delete(doc.source)
            self._db.execute("INSERT INTO files VALUES (?, ?, ?)", (doc.source, doc.sha256, doc.title))
            self._db.executemany(
                "INSERT INTO chunks (source, position, start, end, page, heading, text, embedding) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(doc.source, c.position, c.start, c.end, c.page, c.heading, c.text, v.tobytes())
                 for c, v in zip(chunks, vectors)])
        self._changed()

    def remove(self, source: str) -> None:
        """Drop a document and its chunks."""
        self._make_writable()
        with self._db:
            self._delete(source)
        self._changed()

    def _delete(self, source: str) -> None:
        self._db.execute("DELETE FROM chunks WHERE source = ?", (source,))
        self._db.execute("DELETE FROM files WHERE source = ?", (source,))

    def hits(self, ids: Sequence[int], scores: Sequence[float]) -> list[Hit]:
        """Hits for chunk ``ids`` (in that order) with their scores."""
        if len(ids) == 0:
            return []
        marks = ",".join("?" * len(ids))
        rows = {row[0]: row for row in self._db.execute(
            f"SELECT c.id, c.source, f.title, c.text, c.start, c.end, c.page, c.heading "
            f"FROM chunks c JOIN files f ON f.source = c.source WHERE c.id IN ({marks})",
            [int(i) for i in ids])}
        return [Hit(*rows[int(i)], score=float(s)) for i, s in zip(ids, scores) if int(i) in rows]

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every chunk, ordered by id."""
        ids, blobs = [], []
        for i, blob in self._db.execute("SELECT id, embedding FROM chunks ORDER BY id"):
            ids.append(i)
            blobs.append(blob)
        dim = self.meta["dim"]
        vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
        return np.asarray(ids, dtype=np.int64), vectors

    # ---- search -----------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int = 4) -> list[Hit]:
        """The ``k`` chunks whose vectors have the largest inner product with ``query``."""
        return self.hits(*self.search_ids(query, k))

    def search_ids(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, scores) of the ``k`` nearest vectors, best first, without the texts."""
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.meta["dim"]:
            raise RagError(f"query vector has dimension {query.shape[1]}, the index holds dimension "
                           f"{self.meta['dim']} (embedder {self.meta['embedder']})")
        index = self.faiss_index()
        if index.ntotal == 0 or k < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores, ids = index.search(query, min(k, index.ntotal))
        keep = ids[0] >= 0  # FAISS pads with -1 when fewer than k are found (HNSW, IVF)
        return ids[0][keep], scores[0][keep]

    def keyword_search(self, query: str, k: int = 4) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the best keyword matches; chunks sharing no word are left out."""
        import bm25s

        if not len(self) or k < 1:
            return []
        bm25, ids = self.bm25()
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        found, scores = bm25.retrieve(tokens, k=min(k, len(ids)), show_progress=False)
        return [(int(ids[d]), float(s)) for d, s in zip(found[0], scores[0]) if s > 0]

    # ---- the derived structures: FAISS and BM25 ---------------------------------------

    def faiss_index(self):
        if self._faiss is None:
            self._faiss = build_faiss(*self.embeddings(), kind=self.meta["kind"], dim=self.meta["dim"])
        return self._faiss

    def bm25(self):
        """(bm25s.BM25 over every chunk, the chunk id of each of its documents)."""
        import bm25s

        if self._bm25 is None:
            saved = self.path / BM25_DIR if self.path and not self._writable else None
            if saved is not None and (saved / "ids.npy").exists():
                self._bm25 = (bm25s.BM25.load(str(saved)), np.load(saved / "ids.npy"))
            else:
                rows = self._db.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
                bm25 = bm25s.BM25()
                bm25.index(bm25s.tokenize([t for _, t in rows], stopwords="en", show_progress=False),
                           show_progress=False)
                self._bm25 = (bm25, np.asarray([i for i, _ in rows], dtype=np.int64))
        return self._bm25

    def _changed(self) -> None:
        self._faiss = None
        self._bm25 = None

    def _make_writable(self) -> None:
        """Copy a loaded (read-only, on-disk) database into memory before the first change."""
        if self._writable:
            return
        memory = sqlite3.connect(":memory:", check_same_thread=False)
        self._db.backup(memory)
        self._db.close()
        self._db = memory
        self._writable = True


def build_faiss(ids: np.ndarray, vectors: np.ndarray, kind: str = "flat", dim: int | None = None):
    """A FAISS inner-product index of ``kind`` over ``vectors``, labelled with ``ids``."""
    import faiss

    dim = dim if dim is not None else vectors.shape[1]
    n = len(vectors)
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        # 32 links per node; a wider search when building (80) and querying (64) than
        # the defaults (40, 16) buys recall close to exact at a fraction of a millisecond.
        base = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = 80
        base.hnsw.efSearch = 64
    elif kind == "ivf":
        # ~4 sqrt(n) buckets, but at least ~40 training points each (what k-means needs).
        nlist = max(1, min(int(4 * np.sqrt(max(n, 1))), n // 40))
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if n:
            base.train(vectors)
        base.nprobe = max(1, min(nlist, 16))
    else:
        raise RagError(f"unknown index kind {kind!r}; choose from {', '.join(INDEX_KINDS)}")
    index = faiss.IndexIDMap2(base)
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
    return index


def find_index_dir(path: str | os.PathLike) -> Path:
    """``path`` if it holds an index (or ``path.old`` left by a save interrupted mid-swap)."""
    from ..atomic import saved_dir

    path = Path(path)
    found = saved_dir(path, DB_FILE)
    if found is None:
        if path.exists():
            raise RagError(f"{path} is not a scratchlm index (no {DB_FILE}); build one with "
                           f"`scratchlm rag index PATH... --index {path}`")
        raise NotFound(f"no index at {path}; build one with "
                                f"`scratchlm rag index PATH... --index {path}`")
    return found


__all__ = ["RagIndex", "Hit", "build_faiss", "find_index_dir", "INDEX_KINDS", "FORMAT_VERSION"]
