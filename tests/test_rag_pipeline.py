"""rag: the prompt with numbered sources, citations, answers with a (tiny, random) model, the CLI."""

import dataclasses
import doctest
import hashlib
import json
from pathlib import Path

import pytest
import torch

from rag_testdata import CORPUS, QUESTIONS, encrypt_pdf, make_pdf, write_corpus
from scratchlm import ModelConfig, Transformer
from scratchlm.chat import render_chat
from scratchlm.checkpoint import save_model
from scratchlm.cli import main
from scratchlm.rag import RagError, Retriever, ToyEmbedder, ask, index_documents, ingest, pipeline
from scratchlm.rag.pipeline import build_messages, fit_prompt, parse_citations, sources_block
from scratchlm.tokenizer.bpe import BPETokenizer


def test_docstring_examples():
    assert doctest.testmod(pipeline).failed == 0


@pytest.fixture(scope="module")
def toy_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    folder = write_corpus(root / "docs")
    index_documents([folder], root / "index", embedder=ToyEmbedder(), max_tokens=24, overlap=4)
    return Retriever(root / "index", ToyEmbedder())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 1-layer model with a byte-level BPE tokenizer: gibberish, but a real pipeline."""
    text = " ".join(CORPUS.values()) + " Answer the question using only the numbered sources."
    tokenizer = BPETokenizer.train(text, vocab_size=300)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=2048, d_model=32, n_layers=1,
                         n_heads=2, d_ff=64)
    model = Transformer(config).eval()
    directory = save_model(tmp_path_factory.mktemp("model") / "tiny", model, tokenizer)
    return model, tokenizer, directory


def test_prompt_holds_the_retrieved_chunks_numbered(toy_index):
    question = "How does the king move in chess?"
    hits = toy_index.search(question, k=3)
    prompt = build_messages(question, hits)[1]["content"]
    positions = []
    for n, hit in enumerate(hits, start=1):
        block = f"[{n}] {hit.label()}\n{hit.text.strip()}"
        assert block in prompt
        positions.append(prompt.index(block))
    assert positions == sorted(positions)  # numbered in retrieval order
    assert prompt.rstrip().endswith(f"Question: {question}")
    assert f"[{len(hits) + 1}]" not in prompt


def test_parse_citations():
    assert parse_citations("A [1]. B [2, 3]; C [3][1] and [2;4].", 4) == ([1, 2, 3, 4], [])
    assert parse_citations("Bad [0], [5] and [12]; good [2].", 4) == ([2], [0, 5, 12])
    assert parse_citations("No citations: [a], [1.5], (1), [ ].", 4) == ([], [])
    assert parse_citations("", 0) == ([], [])


def test_citations_point_at_real_sources(toy_index, tiny_model, monkeypatch):
    model, tokenizer, _ = tiny_model
    question = "What comes out of a volcano when it erupts?"
    hits = toy_index.search(question, k=3)
    import scratchlm.generate as generate_module

    real_generate = generate_module.generate
    seen = {}

    def scripted(model, tokenizer, prompt, **kw):  # the real decode loop, then a scripted answer
        seen["prompt"] = prompt
        completion = real_generate(model, tokenizer, prompt, **kw)[0]
        return [dataclasses.replace(completion, text="Lava and ash [1]; see also [3][1] and [7].")]

    monkeypatch.setattr(generate_module, "generate", scripted)
    result = ask(question, toy_index, model=model, tokenizer=tokenizer, k=3, max_new_tokens=5)
    assert [result.prompt] == seen["prompt"]  # answers are generated in one batched call
    assert [h.id for h in result.sources] == [h.id for h in hits]
    assert result.citations == [1, 3] and result.invalid_citations == [7]
    assert [h.id for h in result.cited()] == [hits[0].id, hits[2].id]
    assert Path(result.cited()[0].source).name == "volcanoes.md"
    text = result.format()
    assert text.startswith("Lava and ash [1]") and "*[1] " in text and "*[3] " in text and " [2] " in text
    assert "[7]" in text.splitlines()[-1]  # an invalid citation is named, not listed as a source
    as_json = result.to_dict()
    assert [s["n"] for s in as_json["sources"]] == [1, 2, 3] and as_json["citations"] == [1, 3]


def test_ask_with_a_tiny_model_end_to_end(toy_index, tiny_model):
    model, tokenizer, directory = tiny_model
    question = "How long should dough rise before baking?"
    result = ask(question, toy_index, model=str(directory), k=2, max_new_tokens=12)  # loaded by path
    assert isinstance(result.text, str) and len(result.sources) == 2
    for n, hit in enumerate(result.sources, start=1):
        assert f"[{n}] {hit.label()}" in result.prompt
    valid, invalid = parse_citations(result.text, 2)
    assert (result.citations, result.invalid_citations) == (valid, invalid)
    assert all(1 <= n <= 2 for n in result.citations)
    retrieval_only = ask(question, toy_index, k=2)
    assert retrieval_only.text is None and retrieval_only.sources[0].source.endswith("bread.txt")


def test_prompt_is_cut_to_fit_the_context(toy_index, tiny_model):
    _, tokenizer, _ = tiny_model
    hits = toy_index.search("volcano ash lava", k=4)
    def size(kept):
        return len(tokenizer.encode(render_chat(build_messages("q?", kept), "plain", tokenizer)))

    full, bare = size(hits), size([])
    for budget in (full, full - 40, bare + 150):
        prompt, kept = fit_prompt("q?", hits, tokenizer, budget, "plain")
        assert len(tokenizer.encode(prompt)) <= budget
        assert kept and [h.id for h in kept] == [h.id for h in hits[:len(kept)]]  # best ones kept
        assert sources_block(kept) in prompt
    assert fit_prompt("q?", hits, tokenizer, full, "plain")[1] == hits  # nothing cut when it fits
    with pytest.raises(RagError, match="context"):
        fit_prompt("q?", hits, tokenizer, bare + 2, "plain")  # not even one source's label fits


# ---- the command line ------------------------------------------------------------------

def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory):
    """The test corpus indexed by the CLI with the default model (all-MiniLM-L6-v2)."""
    root = tmp_path_factory.mktemp("cli")
    folder = write_corpus(root / "docs")
    assert main(["rag", "index", str(folder), "--index", str(root / "index")]) == 0
    return folder, root / "index"


def test_cli_ask_retrieve_only_json(cli_index, capsys):
    _, index_dir = cli_index
    capsys.readouterr()
    for question, expected in QUESTIONS.items():
        assert main(["rag", "ask", question, "--index", str(index_dir), "--retrieve-only", "--json", "-k", "2"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["answer"] is None and len(out["sources"]) == 2
        assert Path(out["sources"][0]["source"]).name == expected
        first = out["sources"][0]
        assert {"source", "score", "text", "page", "start", "end"} <= set(first)
        assert first["score"] >= out["sources"][1]["score"]


def test_cli_ask_without_and_with_a_model(cli_index, tiny_model, capsys):
    _, index_dir = cli_index
    capsys.readouterr()
    assert main(["rag", "ask", "How does the king move in chess?", "--index", str(index_dir), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] score ") and "chess.html" in out.splitlines()[0] and "--model" in out
    assert main(["rag", "ask", "How does the king move in chess?", "--index", str(index_dir), "-k", "2",
                 "--hybrid", "--model", str(tiny_model[2]), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    sources = out.split("Sources:\n")[1].splitlines()
    assert len(sources) >= 2 and sources[0].lstrip("* ").startswith("[1] ") and "chess.html" in sources[0]
    assert main(["rag", "ask", "How does the king move in chess?", "--index", str(index_dir), "--json",
                 "--model", str(tiny_model[2]), "--max-new-tokens", "4", "-k", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["answer"], str) and out["sources"][0]["n"] == 1


def test_cli_bad_input_is_one_clear_line(cli_index, tmp_path, capsys):
    folder, index_dir = cli_index
    before = snapshot(index_dir)

    def fails(argv, message):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("scratchlm: error: ") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1

    fails(["rag", "ask", "q", "--index", str(tmp_path / "missing")], "no index at")
    (tmp_path / "empty").mkdir()
    fails(["rag", "index", str(tmp_path / "empty"), "--index", str(index_dir)], "no .txt")
    locked = write_corpus(tmp_path / "locked", {"ok.txt": "fine text"})
    (locked / "secret.pdf").write_bytes(encrypt_pdf(make_pdf([["hidden"]]), user_password="pw"))
    fails(["rag", "index", str(locked), "--index", str(index_dir)], "encrypted")
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.7 nothing here")
    fails(["rag", "index", str(tmp_path / "bad.pdf"), "--index", str(index_dir)], "not a readable PDF")
    fails(["rag", "index", str(folder), "--index", str(index_dir), "--embedder", "someone/other-model"],
          "built with embedder")
    fails(["rag", "index", str(folder), "--index", str(folder)], "not a scratchlm index")
    fails(["rag", "index", str(folder), "--index", str(tmp_path / "new"), "--chunk-tokens", "400"], "--chunk-tokens")
    fails(["rag", "ask", "   ", "--index", str(index_dir)], "empty")
    fails(["rag", "ask", "q", "--index", str(index_dir), "-k", "0"], "k must be between 1 and 100")
    assert snapshot(index_dir) == before  # nothing already indexed was lost


def test_cli_default_index_is_the_python_reference(tmp_path, monkeypatch, capsys):
    topics = {"with", "for", "try", "if", "while"}  # a slice: the whole reference takes a minute
    docs = [d for d in ingest.python_reference_documents() if d.source.split(":")[1] in topics]
    monkeypatch.setattr(ingest, "python_reference_documents", lambda: docs)
    monkeypatch.setenv("SCRATCHLM_RAG_INDEX", str(tmp_path / "default"))
    assert main(["rag", "index"]) == 0
    assert "files: 5 added" in capsys.readouterr().out
    assert main(["rag", "ask", "How does the with statement work?", "--json", "-k", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"][0]["source"] == "python-reference:with"
    assert main(["rag", "index"]) == 0  # again: nothing to do
    assert "5 unchanged (0 chunks embedded)" in capsys.readouterr().out
