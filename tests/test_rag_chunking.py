"""rag: chunking (coverage, overlap, breaks, headings, offsets) and document loaders (pages, errors)."""

import doctest
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_testdata import encrypt_pdf, make_pdf
from scratchlm.rag import RagError, chunking, loaders
from scratchlm.rag.chunking import chunk_document, chunk_text, find_headings, word_spans
from scratchlm.rag.loaders import find_documents, load_document


@pytest.mark.parametrize("module", [chunking, loaders])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def check_chunks(text, chunks, max_tokens, overlap, spans=word_spans):
    """Every invariant the chunker promises, on one text."""
    if not spans(text):
        assert chunks == []
        return
    assert chunks[0].start == 0 and chunks[-1].end == len(text)  # every character covered...
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start <= a.end  # ...with no gap, and always moving forward
        shared = text[b.start:a.end]
        assert len(spans(shared)) == overlap  # exactly the configured overlap, in tokens
        assert shared.strip() or overlap == 0
    for i, c in enumerate(chunks):
        assert text[c.start:c.end] == c.text  # offsets map back to the source text
        assert 1 <= len(spans(c.text)) <= max_tokens  # never empty, never over the limit
        assert c.position == i


words = st.sampled_from(["the", "cat", "sat", "on", "mat", "Python", "x1", "über", "a", "ßeta"])
seps = st.sampled_from([" ", " ", " ", ", ", ". ", "! ", "\n", "\n\n", "  \n \n", "\t", "; "])


@st.composite
def texts(draw):
    parts = draw(st.lists(st.tuples(words, seps), max_size=120))
    lead = draw(st.sampled_from(["", " ", "\n\n"]))
    return lead + "".join(w + s for w, s in parts)


@settings(max_examples=150, deadline=None)
@given(texts(), st.integers(2, 40), st.data())
def test_chunks_cover_everything_and_overlap_as_configured(text, max_tokens, data):
    overlap = data.draw(st.integers(0, (max_tokens - 1) // 2))
    chunks = chunk_text(text, max_tokens=max_tokens, overlap=overlap)
    check_chunks(text, chunks, max_tokens, overlap)


def test_cuts_at_paragraphs_then_sentences():
    para = "word " * 40
    text = f"{para.strip()}.\n\n{para.strip()}. {para.strip()}.\n\nend."
    chunks = chunk_text(text, max_tokens=70, overlap=0)
    # The first cut is at the blank line (after 41 tokens), not at the 70-token limit
    # (a break is taken only after half the limit: 35 tokens).
    assert chunks[0].text.endswith(".\n\n")
    assert len(word_spans(chunks[0].text)) == 41
    early = "word " * 20 + "end.\n\n" + "word " * 80  # a blank line after 21 tokens: too early
    assert len(word_spans(chunk_text(early, max_tokens=70, overlap=0)[0].text)) == 70
    # A run of sentences with no paragraph break is cut after a sentence's full stop.
    long = " ".join(f"Sentence number {i} is here." for i in range(40))
    for c in chunk_text(long, max_tokens=50, overlap=5)[:-1]:
        assert c.text.rstrip().endswith(".")


def test_overlap_repeats_the_end_of_the_previous_chunk():
    text = " ".join(f"w{i}" for i in range(100))
    chunks = chunk_text(text, max_tokens=20, overlap=5)
    check_chunks(text, chunks, 20, 5)
    assert chunks[1].text.split()[:5] == chunks[0].text.split()[-5:]


def test_bad_chunk_settings_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("some words here", max_tokens=10, overlap=5)
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_text("some words here", max_tokens=0, overlap=0)


def test_whitespace_only_text_gives_no_chunk():
    assert chunk_text("  \n\n\t ") == [] and chunk_text("") == []


def test_headings_markdown_and_underlined():
    text = "# Title\nintro\n\n## Part two\nbody\n\nThe with statement\n******************\n\nmore\n"
    assert [h for _, h in find_headings(text)] == ["Title", "Part two", "The with statement"]
    chunks = chunk_document(text, max_tokens=6, overlap=0)
    by_text = {c.heading for c in chunks if "more" in c.text}
    assert by_text == {"The with statement"}
    assert chunks[0].heading == "Title"
    check_chunks(text, chunks, 6, 0)


def test_a_title_is_never_cut_from_its_underline():
    text = "intro words here.\n\nThe with statement\n" + "=" * 18 + "\n\nbody text follows here.\n"
    underline = text.index("=")
    for max_tokens in range(4, 40):
        for overlap in (0,):  # (an overlap may still start a chunk there; the cut never is)
            starts = {c.start for c in chunk_text(text, max_tokens=max_tokens, overlap=overlap)}
            assert underline not in starts, (max_tokens, overlap)


def test_pdf_pages_are_right(tmp_path):
    pages = [["Page one talks about apples.", "Apples are red."],
             ["Page two talks about bananas.", "Bananas are yellow."],
             [],  # an empty page: no chunk, but the page numbers after it stay right
             ["Page four talks about cherries."]]
    path = tmp_path / "fruit.pdf"
    path.write_bytes(make_pdf(pages))
    doc = load_document(path)
    assert len(doc.page_starts) == 4
    chunks = chunk_document(doc.text, source=doc.source, max_tokens=6, overlap=1,
                            page_starts=doc.page_starts)
    fruit = {1: "apple", 2: "banana", 4: "cherr"}
    assert {c.page for c in chunks} == {1, 2, 4}
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text
        start = doc.page_starts[c.page - 1]
        end = doc.page_starts[c.page] if c.page < 4 else len(doc.text)
        assert start <= c.start < c.end <= end  # inside its page: pages are never crossed
    for page, word in fruit.items():
        assert any(word in c.text.lower() for c in chunks if c.page == page)
        assert not any(word in c.text.lower() for c in chunks if c.page != page)


def test_pdf_with_empty_user_password_opens(tmp_path):
    path = tmp_path / "restricted.pdf"
    path.write_bytes(encrypt_pdf(make_pdf([["Readable text."]]), user_password=""))
    assert "Readable text." in load_document(path).text


def test_encrypted_and_broken_pdfs_are_clear_errors(tmp_path):
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(encrypt_pdf(make_pdf([["Secret text."]]), user_password="secret"))
    with pytest.raises(RagError, match="encrypted"):
        load_document(locked)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    with pytest.raises(RagError, match="not a readable PDF"):
        load_document(broken)


def test_html_text_headings_and_no_scripts(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html><head><title>My page</title><style>p{}</style></head><body>"
                    "<h1>Top</h1><p>First   para.</p><script>var secret = 1;</script>"
                    "<h3>Deep</h3><ul><li>one</li><li>two &amp; three</li></ul><pre>a  b\n  c</pre></body></html>")
    doc = load_document(path)
    assert doc.title == "My page"
    assert doc.text == "# Top\n\nFirst para.\n\n### Deep\n\none\n\ntwo & three\n\na  b\n  c\n"
    assert [h for _, h in find_headings(doc.text)] == ["Top", "Deep"]


def test_text_files_keep_their_exact_text(tmp_path):
    path = tmp_path / "a.md"
    path.write_bytes("\ufeffCafé\r\nline two\n".encode("utf-8"))
    assert load_document(path).text == "Café\r\nline two\n"  # BOM dropped, nothing else changed
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(RagError, match="not UTF-8"):
        load_document(bad)


def test_finding_documents(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("a")
    (tmp_path / "b.TXT").write_text("b")
    (tmp_path / "c.py").write_text("c")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("d")
    assert [p.name for p in find_documents([tmp_path])] == ["b.TXT", "a.md"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RagError, match="no .txt"):
        find_documents([empty])
    with pytest.raises(FileNotFoundError):
        find_documents([tmp_path / "missing"])
    with pytest.raises(RagError, match="unsupported"):
        find_documents([tmp_path / "c.py"])


def test_python_reference_documents():
    docs = loaders.python_reference_documents()
    assert len(docs) >= 50
    with_doc = next(d for d in docs if d.source == "python-reference:with")
    chunks = chunk_document(with_doc.text, source=with_doc.source)
    assert chunks[0].heading == 'The "with" statement'
    check_chunks(with_doc.text, chunks, 128, 16)


def test_missing_paths_are_not_found_errors(tmp_path):
    from scratchlm.errors import NotFound

    with pytest.raises(NotFound, match="no such file or folder"):
        find_documents([tmp_path / "missing"])


def test_a_symlink_is_judged_by_its_own_name(tmp_path):
    """A .txt link to a file without a suffix used to abort the whole run."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "blob").write_text("Linked notes about cats.")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").symlink_to(tmp_path / "store" / "blob")
    (docs / "again.txt").symlink_to(tmp_path / "store" / "blob")  # one file, two links: read once
    os.mkfifo(docs / "pipe.txt")  # a FIFO is passed over, not read (it would block)
    found = find_documents([docs])
    assert len(found) == 1 and found[0].name in ("notes.txt", "again.txt")
    assert load_document(found[0]).text == "Linked notes about cats."


def test_heading_detection_is_linear_in_line_length():
    """One 300k-character line with no underline: the old regex took minutes (quadratic)."""
    import time

    line = "word " * 60_000
    start = time.perf_counter()
    assert find_headings(line) == []
    assert time.perf_counter() - start < 3.0  # linear: milliseconds, even on a loaded machine
    assert find_headings("Title  \t\n=====\nbody\n" + line) == [(0, "Title")]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "--chunk-tokens must be a whole number of at least 1, got 0"),
    ({"max_tokens": -5}, "--chunk-tokens must be"),
    ({"overlap": -1}, "--overlap must be a whole number of at least 0"),
    ({"max_tokens": 10, "overlap": 5}, "--overlap must be less than half of --chunk-tokens"),
])
def test_index_refuses_bad_chunk_sizes_up_front(tmp_path, kwargs, message):
    from scratchlm.rag import index_documents

    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(RagError, match=message):  # before any model is loaded (none is given)
        index_documents([tmp_path / "a.txt"], tmp_path / "index", **kwargs)
    assert not (tmp_path / "index").exists()
