"""rag: the index directory (save, load, add, change, delete, kinds, errors) and retrieval."""

import doctest
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from rag_testdata import CORPUS, QUESTIONS, encrypt_pdf, make_pdf, write_corpus
from scratchlm.rag import RagError, RagIndex, Retriever, ToyEmbedder, index_documents, ingest, retrieve
from scratchlm.rag import index as index_module
from scratchlm.rag.loaders import load_document
from scratchlm.rag.retrieve import reciprocal_rank_fusion


class CountingEmbedder(ToyEmbedder):
    """The toy embedder, remembering every text it was asked to embed (the probe aside)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def encode(self, texts):
        self.seen += [t for t in texts if t != index_module.PROBE_TEXT]
        return super().encode(texts)


def snapshot(directory: Path) -> dict:
    """{relative path: sha256} of every file under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def check_consistent(index_dir: Path, folder: Path) -> RagIndex:
    """The index holds exactly the folder's files, and every chunk is its file's text at its offsets."""
    index = RagIndex.load(index_dir)
    on_disk = {str(p.resolve()) for p in folder.rglob("*") if p.is_file()}
    assert set(index.sources()) == on_disk
    ids, vectors = index.embeddings()
    assert index.faiss_index().ntotal == len(ids) == len(index) > 0
    for hit in index.hits(ids, np.zeros(len(ids))):
        assert load_document(hit.source).text[hit.start:hit.end] == hit.text
    # Each stored vector is found as its own nearest neighbour: FAISS ids match the rows.
    for _i, v in zip(ids[:20], vectors[:20]):
        found, scores = index.search_ids(v, 1)
        assert scores[0] == pytest.approx(1.0, abs=1e-5)
        assert np.allclose(index.embeddings()[1][list(ids).index(found[0])], v)
    return index


@pytest.mark.parametrize("module", [index_module, ingest, retrieve])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def test_add_change_delete_keep_index_and_metadata_consistent(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    index_dir = tmp_path / "index"
    embedder = CountingEmbedder()
    report = index_documents([folder], index_dir, embedder=embedder, max_tokens=12, overlap=2)
    assert (report.added, report.changed, report.removed) == (5, 0, 0)
    check_consistent(index_dir, folder)
    first_embedded = len(embedder.seen)
    assert first_embedded == report.embedded == report.n_chunks

    # Nothing changed: nothing embedded, nothing rewritten.
    before = snapshot(index_dir)
    again = index_documents([folder], index_dir, embedder=embedder)
    assert again.unchanged == 5 and len(embedder.seen) == first_embedded
    assert snapshot(index_dir) == before

    # Add one file, change one, delete one: only the new and changed files are embedded.
    (folder / "new.txt").write_text("Penguins live in the southern hemisphere and cannot fly.")
    (folder / "bread.txt").write_text("Sourdough bread uses a starter instead of yeast.")
    (folder / "chess.html").unlink()
    embedder.seen.clear()
    report = index_documents([folder], index_dir, embedder=embedder)
    assert (report.added, report.changed, report.removed, report.unchanged) == (1, 1, 1, 3)
    assert all("Penguins" in t or "Sourdough" in t for t in embedder.seen) and embedder.seen
    index = check_consistent(index_dir, folder)
    assert not any("chess" in s for s in index.sources())
    top = Retriever(index, embedder).search("sourdough starter", k=1)[0]
    assert top.source.endswith("bread.txt") and "Sourdough" in top.text


def test_search_after_reload_is_identical(tmp_path):
    embedder = ToyEmbedder()
    for kind in ("flat", "hnsw", "ivf"):
        folder = write_corpus(tmp_path / kind / "docs")
        index_dir = tmp_path / kind / "index"
        index_documents([folder], index_dir, embedder=embedder, kind=kind, max_tokens=10, overlap=2)
        fresh = RagIndex.load(index_dir)
        assert fresh.meta["kind"] == kind
        rebuilt = RagIndex.load(index_dir)
        rebuilt._changed()  # forget the saved FAISS file: rebuilt from the stored embeddings
        for question in QUESTIONS:
            q = embedder.encode_query(question)
            a, b = fresh.search(q, k=3), rebuilt.search(q, k=3)
            assert [(h.id, h.text) for h in a] == [(h.id, h.text) for h in b]
            assert np.allclose([h.score for h in a], [h.score for h in b])
            assert [h.score for h in a] == sorted([h.score for h in a], reverse=True)


def test_several_folders_share_an_index(tmp_path):
    a = write_corpus(tmp_path / "a", {"one.txt": "alpha text"})
    b = write_corpus(tmp_path / "b", {"two.txt": "beta text"})
    index_dir = tmp_path / "index"
    index_documents([a], index_dir, embedder=ToyEmbedder())
    index_documents([b], index_dir, embedder=ToyEmbedder())  # a's files are not "deleted"
    assert sorted(Path(s).name for s in RagIndex.load(index_dir).sources()) == ["one.txt", "two.txt"]


def test_failed_reindex_loses_nothing(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    index_dir = tmp_path / "index"
    index_documents([folder], index_dir, embedder=ToyEmbedder())
    before = snapshot(index_dir)
    (folder / "locked.pdf").write_bytes(encrypt_pdf(make_pdf([["secret"]]), user_password="pw"))
    (folder / "tides.txt").write_text("changed text that must not be half-indexed")
    with pytest.raises(RagError, match="encrypted"):
        index_documents([folder], index_dir, embedder=ToyEmbedder())
    assert snapshot(index_dir) == before
    # --skip-errors indexes the rest and names what it left out.
    report = index_documents([folder], index_dir, embedder=ToyEmbedder(), skip_errors=True)
    assert report.changed == 1 and any("locked.pdf" in s for s in report.skipped)
    assert not any(s.endswith("locked.pdf") for s in RagIndex.load(index_dir).sources())


def test_bad_input_is_a_clear_error(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    index_dir = tmp_path / "index"
    with pytest.raises(FileNotFoundError, match="no index at"):
        RagIndex.load(index_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RagError, match="no .txt"):
        index_documents([empty], index_dir, embedder=ToyEmbedder())
    assert not index_dir.exists()

    index_documents([folder], index_dir, embedder=ToyEmbedder())
    before = snapshot(index_dir)
    with pytest.raises(RagError, match="embedder"):  # another model's name
        index_documents([folder], index_dir, embedder=ToyEmbedder(name="other-model"))
    with pytest.raises(RagError, match="dimension"):  # same name, another dimension
        index_documents([folder], index_dir, embedder=ToyEmbedder(dim=64))
    with pytest.raises(RagError, match="dimension"):
        Retriever(index_dir, ToyEmbedder(dim=64))

    class Salted(ToyEmbedder):  # same name and dimension, different vectors
        def encode(self, texts):
            return super().encode([f"salt {t} pepper" for t in texts])[:, ::-1].copy()

    with pytest.raises(RagError, match="different embedding model"):
        Retriever(index_dir, Salted())
    with pytest.raises(RagError, match="kind"):
        index_documents([folder], index_dir, embedder=ToyEmbedder(), kind="hnsw")
    assert snapshot(index_dir) == before  # none of that touched the index

    # --rebuild starts afresh with the new settings.
    index_documents([folder], index_dir, embedder=ToyEmbedder(dim=64), rebuild=True)
    assert RagIndex.load(index_dir).meta["dim"] == 64

    # A folder that is not an index is never replaced by one.
    with pytest.raises(RagError, match="not a scratchlm index"):
        index_documents([folder], folder, embedder=ToyEmbedder())
    assert (folder / "tides.txt").exists()
    with pytest.raises(RagError, match="not a scratchlm index"):
        RagIndex.load(folder)


def test_corrupt_or_mismatched_files_are_reported(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    index_dir = tmp_path / "index"
    index_documents([folder], index_dir, embedder=ToyEmbedder())
    (index_dir / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(RagError, match="index.faiss"):
        RagIndex.load(index_dir)
    (index_dir / "chunks.sqlite").write_bytes(b"not a database at all, certainly not" * 10)
    with pytest.raises(RagError, match="corrupt"):
        RagIndex.load(index_dir)


def test_interrupted_save_falls_back_to_the_previous_index(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    index_dir = tmp_path / "index"
    index_documents([folder], index_dir, embedder=ToyEmbedder())
    os.replace(index_dir, tmp_path / "index.old")  # a crash between the two renames of a save
    assert len(RagIndex.load(index_dir)) > 0


def test_reciprocal_rank_fusion_by_hand():
    dense = [10, 20, 30, 40]
    keyword = [30, 50, 10]
    # 10: 1/61 + 1/63 = 0.032266; 30: 1/63 + 1/61 = 0.032266 (tie: 10 was seen first);
    # 20: 1/62 = 0.016129; 50: 1/62 = 0.016129 (tie: 20 first); 40: 1/64 = 0.015625.
    assert reciprocal_rank_fusion([dense, keyword]) == [
        (10, 0.032266), (30, 0.032266), (20, 0.016129), (50, 0.016129), (40, 0.015625)]
    assert reciprocal_rank_fusion([[1, 2]], c=0) == [(1, 1.0), (2, 0.5)]
    assert reciprocal_rank_fusion([]) == []


def test_hybrid_retrieval_fuses_dense_and_keyword(tmp_path):
    folder = write_corpus(tmp_path / "docs")
    index_dir = tmp_path / "index"
    embedder = ToyEmbedder()
    index_documents([folder], index_dir, embedder=embedder)
    retriever = Retriever(index_dir, embedder)
    q = "castling king rook"
    dense = retriever.search(q, k=5, mode="dense")
    keyword = retriever.search(q, k=5, mode="keyword")
    hybrid = retriever.search(q, k=5, mode="hybrid")
    assert keyword and all(h.source.endswith("chess.html") for h in keyword)  # only chunks with the words
    expected = reciprocal_rank_fusion([[h.id for h in retriever.index.search(embedder.encode_query(q), 20)],
                                       [i for i, _ in retriever.index.keyword_search(q, 20)]], digits=None)[:5]
    assert [(h.id, pytest.approx(h.score)) for h in hybrid] == expected
    assert hybrid[0].source.endswith("chess.html") and dense[0].source.endswith("chess.html")
    with pytest.raises(RagError, match="mode"):
        retriever.search(q, mode="magic")
    with pytest.raises(RagError, match="empty"):
        retriever.search("   ")


# ---- with the real embedding model (loaded once per test session: load_embedder caches it) ----

@pytest.fixture(scope="session")
def minilm():
    from scratchlm.rag.embed import load_embedder

    return load_embedder()


def test_fast_encode_matches_sentence_transformers(minilm):
    texts = [CORPUS[name] for name in CORPUS] + ["short", "a " * 300]
    fast = minilm.encode(texts)
    reference = minilm.reference_encode(texts)
    assert fast.shape == reference.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    assert (fast * reference).sum(1).min() > 0.99
    # A query alone is not padded, so its bf16 rounding differs a little from the batch's.
    assert float(minilm.encode_query("short") @ fast[len(CORPUS)]) > 0.999
    # Token spans map back to the text and count what the model will read.
    text = "Tokenization: splits words into pieces."
    spans = minilm.token_spans(text)
    assert "".join(text[a:b] for a, b in spans).replace("#", "") == text.replace(" ", "")
    assert len(spans) == len(minilm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_retrieval_puts_the_right_document_first(minilm, tmp_path):
    folder = write_corpus(tmp_path / "docs")
    index_dir = tmp_path / "index"
    index_documents([folder], index_dir, embedder=minilm)
    retriever = Retriever(index_dir)  # loads the model the index names: the same cached one
    assert retriever.embedder is minilm
    for question, expected in QUESTIONS.items():
        for mode in ("dense", "hybrid"):
            top = retriever.search(question, k=3, mode=mode)
            assert Path(top[0].source).name == expected, (question, mode, [h.source for h in top])


def test_python_reference_with_statement(minilm, tmp_path, monkeypatch):
    # A slice of the built-in corpus (the whole one takes a minute to embed on 2 cores).
    topics = {"with", "for", "try", "if", "while", "lambda", "assert", "raise", "return", "global", "del"}
    docs = [d for d in ingest.python_reference_documents() if d.source.split(":")[1] in topics]
    monkeypatch.setattr(ingest, "python_reference_documents", lambda: docs)
    monkeypatch.setenv("SCRATCHLM_RAG_INDEX", str(tmp_path / "default"))
    report = index_documents(None, None, embedder=minilm)
    assert report.path == tmp_path / "default" and report.added == len(docs)
    hits = retrieve.open_retriever().search("How does the with statement work?", k=3)
    assert hits[0].source == "python-reference:with" and hits[0].heading == 'The "with" statement'
    hits = retrieve.open_retriever().search("How do I catch an exception?", k=3)
    assert hits[0].source == "python-reference:try"


def test_index_into_an_empty_folder_made_beforehand(tmp_path):
    """`mkdir idx && scratchlm rag index docs --index idx` works: an empty folder is a new index."""
    from rag_testdata import write_corpus
    from scratchlm.rag import Retriever, ToyEmbedder, index_documents

    target = tmp_path / "idx"
    target.mkdir()
    index_documents([write_corpus(tmp_path / "docs")], target, embedder=ToyEmbedder(), max_tokens=24, overlap=4)
    assert Retriever(target, ToyEmbedder()).search("How does the king move in chess?", k=1)[0].source.endswith("chess.html")
