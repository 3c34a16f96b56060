"""Retrieval-augmented answers: index your documents, retrieve passages, answer with citations.

The parts, in the order data flows through them:

    loaders.py   .txt .md .html .pdf (and the built-in Python reference) -> Document text
    chunking.py  Document -> overlapping chunks of at most N tokens, with page, heading, offsets
    embed.py     chunk text -> unit vectors (sentence-transformers; a fast bf16 path)
    index.py     vectors + chunk metadata -> one directory (FAISS + SQLite), saved atomically
    ingest.py    files -> index, embedding only new or changed files
    retrieve.py  question -> best chunks: dense, BM25 keyword, or both fused (RRF)
    pipeline.py  question + chunks -> numbered prompt -> answer -> citations

`scratchlm rag index` and `scratchlm rag ask` are parsed in scratchlm/cli/rag.py.

The Python API in three lines (guide: docs/rag.md)::

    from scratchlm.rag import index_documents, ask
    index_documents(["notes/"], "my-index")
    print(ask("What did we decide about X?", "my-index", model="path/to/model").format())

faiss, sentence-transformers, pypdf and bm25s are imported only when used, so this
package imports without them (``pip install scratchlm[rag]`` brings them).
"""

from .chunking import Chunk, chunk_document, chunk_text
from .errors import RagError
from .index import Hit, RagIndex
from .ingest import IndexReport, ToyEmbedder, default_index_dir, index_documents
from .loaders import Document, load_document, python_reference_documents
from .pipeline import Answer, answer, ask, parse_citations
from .retrieve import Retriever, open_retriever, reciprocal_rank_fusion


def load_embedder(name: str = "all-MiniLM-L6-v2", device: str = "cpu", fast: bool = True):
    """The cached sentence-transformers Embedder (see embed.py); imports torch on first use."""
    from .embed import load_embedder as load

    return load(name, device=device, fast=fast)


__all__ = ["Answer", "Chunk", "Document", "Hit", "IndexReport", "RagError", "RagIndex", "Retriever",
           "ToyEmbedder", "answer", "ask", "chunk_document", "chunk_text", "default_index_dir",
           "index_documents", "load_document", "load_embedder", "open_retriever", "parse_citations",
           "python_reference_documents", "reciprocal_rank_fusion"]
