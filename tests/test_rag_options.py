"""rag: hostile options and files (issue 11), the sampling options of `rag ask`, inline citations."""

import os
import time

import pytest
import torch

from rag_testdata import CORPUS, write_corpus
from scratchlm import ModelConfig, Transformer
from scratchlm.cli import main
from scratchlm.generate import generate
from scratchlm.rag import ToyEmbedder, index_documents
from scratchlm.rag.chunking import chunk_document, find_headings
from scratchlm.rag.config import AskConfig
from scratchlm.rag.pipeline import answer, drop_invalid_citations, parse_citations
from scratchlm.sampling import NGramBlocker


def one_line_error(capsys, argv, message):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals (not a number, not a choice)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


# ---- files that are not regular files ---------------------------------------------------

def test_a_fifo_in_a_folder_is_skipped_with_a_warning(tmp_path, capsys):
    docs = write_corpus(tmp_path / "docs", {"a.txt": "Cats purr when they are content."})
    os.mkfifo(docs / "pipe.txt")  # opening it for reading would block forever
    (docs / "dangling.md").symlink_to(tmp_path / "nowhere")
    report = index_documents([docs], tmp_path / "index", embedder=ToyEmbedder())
    assert report.added == 1
    assert any("pipe.txt: not a regular file (a FIFO)" in s for s in report.skipped)
    assert any("dangling.md: not a regular file (a broken symlink)" in s for s in report.skipped)


def test_a_fifo_named_on_the_command_line_is_one_line(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.txt")
    one_line_error(capsys, ["rag", "index", str(tmp_path / "pipe.txt"), "--index", str(tmp_path / "i")],
                   "not a regular file or folder (a FIFO)")


def test_a_txt_link_to_a_file_without_suffix_is_indexed(tmp_path):
    (tmp_path / "blob").write_text("Linked notes about cats.")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").symlink_to(tmp_path / "blob")
    report = index_documents([docs / "notes.txt"], tmp_path / "index", embedder=ToyEmbedder())
    assert report.added == 1 and not report.skipped


# ---- linear time on a 1 MB line ---------------------------------------------------------

def _seconds(fn, *args):
    """The best of three runs: a shared machine's hiccups only ever add time."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("make", [
    lambda n: "word " * (n // 5),  # one line of words
    lambda n: "# a" + " " * n + "b",  # an ATX heading line with a long run of spaces
    lambda n: "Title" + " " * n + "x\n=====\n",  # a setext title with a long run of spaces
    lambda n: "=" * n + "\n" + "-" * n,  # underline characters only
], ids=["words", "atx-spaces", "setext-spaces", "underlines"])
def test_headings_and_chunking_are_linear_on_a_1mb_line(make):
    big, small = make(1_000_000), make(250_000)
    t_big = _seconds(find_headings, big)
    t_small = _seconds(find_headings, small)
    assert t_big < 2.0, f"find_headings took {t_big:.2f}s on 1 MB"
    assert t_big < 8 * t_small + 0.05  # linear: ~4x for 4x the text (quadratic would be 16x)


def test_chunking_a_1mb_single_line_document_is_fast():
    text = "word " * 200_000  # 1 MB, no newline
    start = time.perf_counter()
    chunks = chunk_document(text, source="big.txt", max_tokens=128, overlap=16)
    assert time.perf_counter() - start < 4.0  # linear (a loaded 2-core machine: ~1 s)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)


# ---- every numeric option refused up front ----------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("-k", "0", "k must be between 1 and 100"),
    ("-k", "-3", "k must be between 1 and 100"),
    ("-k", "1000000000", "k must be between 1 and 100"),
    ("-k", "nan", "invalid"),
    ("--max-new-tokens", "0", "max_new_tokens must be between 1"),
    ("--max-new-tokens", "-5", "max_new_tokens must be between 1"),
    ("--max-new-tokens", "1000000000000", "max_new_tokens must be between 1"),
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--temperature", "inf", "temperature must be a finite number"),
    ("--temperature", "-1", "temperature must be >= 0"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-p", "1.5", "top_p must be in (0, 1]"),
    ("--top-p", "nan", "top_p must be a finite number"),
    ("--top-k", "-2", "top_k must be a positive integer"),
    ("--min-p", "-0.5", "min_p must be in [0, 1]"),
    ("--repetition-penalty", "0", "repetition_penalty must be a finite number > 0"),
    ("--repetition-penalty", "inf", "repetition_penalty must be a finite number"),
    ("--no-repeat-ngram", "-1", "no_repeat_ngram must be >= 0"),
    ("--seed", "-1", "seed must be in [0, 2**63)"),
    ("--seed", str(2**70), "seed must be in [0, 2**63)"),
    ("--mode", "fuzzy", "mode must be one of 'dense', 'keyword', 'hybrid'"),
])
def test_rag_ask_refuses_bad_numbers_before_opening_anything(capsys, tmp_path, option, value, message):
    # The index and the model do not exist: the option must be refused before either is opened.
    one_line_error(capsys, ["rag", "ask", "q?", "--index", str(tmp_path / "none"), "--model", "no-such-model",
                            option, value], message)


@pytest.mark.parametrize("option, value, message", [
    ("--chunk-tokens", "0", "--chunk-tokens must be a whole number of at least 1"),
    ("--chunk-tokens", "-1", "--chunk-tokens must be a whole number of at least 1"),
    ("--chunk-tokens", "nan", "invalid int"),
    ("--chunk-tokens", "1000000000000", "--chunk-tokens must be at most"),
    ("--overlap", "-1", "--overlap must be a whole number of at least 0"),
    ("--overlap", "1000000000000", "--overlap must be less than half"),
])
def test_rag_index_refuses_bad_numbers_up_front(capsys, tmp_path, option, value, message):
    docs = write_corpus(tmp_path / "docs", {"a.txt": "text"})
    one_line_error(capsys, ["rag", "index", str(docs), "--index", str(tmp_path / "i"), option, value], message)
    assert not (tmp_path / "i").exists()


def test_config_file_and_options_agree(tmp_path):
    (tmp_path / "ask.yaml").write_text("top_p: 0.9\ntemperature: 0.5\nk: 2\n")
    cfg = AskConfig.from_file(tmp_path / "ask.yaml", k=3)
    assert (cfg.top_p, cfg.temperature, cfg.k) == (0.9, 0.5, 3)


# ---- no repeated n-grams: the same tokens as Hugging Face's processor -------------------

def test_no_repeat_ngram_matches_transformers_processor():
    """Greedy decoding with no_repeat_ngram=n equals a plain loop that applies transformers'
    NoRepeatNGramLogitsProcessor to the output so far (our guard covers the output only)."""
    from transformers import NoRepeatNGramLogitsProcessor

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=16, context_length=128, d_model=32, n_layers=2, n_heads=2,
                                    d_ff=64)).eval()
    prompt = [1, 2, 3, 1, 2]
    for n in (1, 2, 3):
        [ours] = generate(model, None, [prompt], max_new_tokens=30, no_repeat_ngram=n)
        processor, out = NoRepeatNGramLogitsProcessor(n), []
        with torch.no_grad():
            for _ in range(30 if n > 1 else 16):
                logits = model(torch.tensor([prompt + out]))[:, -1].float()
                if out:
                    logits = processor(torch.tensor([out]), logits)
                out.append(int(logits.argmax(-1)))
        assert ours.token_ids[:len(out)] == out
        kept = ours.token_ids if n > 1 else ours.token_ids[:16]  # n=1: 16 tokens use up the vocabulary
        grams = [tuple(kept[i:i + n]) for i in range(len(kept) - n + 1)]
        assert len(grams) == len(set(grams))  # no n-gram twice


def test_ngram_blocker_refuses_nonsense():
    for bad in (-1, 1.5, True):
        with pytest.raises(Exception, match="no_repeat_ngram"):
            NGramBlocker(bad, 1)


# ---- inline citations -------------------------------------------------------------------

def test_drop_invalid_citations_keeps_only_sources_that_exist():
    text = "A [1]. B [2, 7]; C [3][9] and [0].  D [4;2]."
    cleaned = drop_invalid_citations(text, 3)
    assert cleaned == "A [1]. B [2]; C [3] and.  D [2]."
    assert parse_citations(cleaned, 3) == (parse_citations(text, 3)[0], [])
    assert drop_invalid_citations("x" + " " * 100_000 + "[5]", 1) == "x"  # linear on a long run of spaces


def test_answer_defaults_and_sampling_options_reach_generate(monkeypatch):
    """answer() passes AskConfig's defaults (and any override) to the real decode loop."""
    import scratchlm.generate as generate_module
    from scratchlm.rag.index import Hit
    from scratchlm.tokenizer.bpe import BPETokenizer

    tokenizer = BPETokenizer.train(" ".join(CORPUS.values()), vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=1024, d_model=32,
                                    n_layers=1, n_heads=2, d_ff=64)).eval()
    hits = [Hit(1, "a.md", "A", "Cats purr.", 0, 10, None, None, 0.9)]
    real, seen = generate_module.generate, []

    def spy(*args, **kw):
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(generate_module, "generate", spy)
    result = answer("Why?", hits, model, tokenizer, max_new_tokens=20)
    assert seen[-1]["repetition_penalty"] == AskConfig().repetition_penalty
    assert seen[-1]["no_repeat_ngram"] == AskConfig().no_repeat_ngram
    grams = [tuple(result.token_ids[i:i + 6]) for i in range(len(result.token_ids) - 5)]
    assert len(grams) == len(set(grams))
    answer("Why?", hits, model, tokenizer, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=3, no_repeat_ngram=0)
    assert (seen[-1]["top_p"], seen[-1]["seed"], seen[-1]["no_repeat_ngram"]) == (0.9, 3, 0)
    assert result.finish_reason in ("stop", "length")


def test_generate_takes_no_repeat_ngram(capsys):
    assert main(["generate", "gpt-tiny", "Hello", "--max-new-tokens", "30", "--no-repeat-ngram", "2"]) == 0
    one_line_error(capsys, ["generate", "gpt-tiny", "Hello", "--no-repeat-ngram", "-1"], "no_repeat_ngram")


def test_answer_batch_equals_one_answer_at_a_time():
    """Batched answers (left-padded rows, one decode loop) are the answers answer() gives alone."""
    from scratchlm.rag.index import Hit
    from scratchlm.rag.pipeline import answer_batch
    from scratchlm.tokenizer.bpe import BPETokenizer

    tokenizer = BPETokenizer.train(" ".join(CORPUS.values()), vocab_size=300)
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context_length=1024, d_model=32,
                                    n_layers=2, n_heads=2, d_ff=64)).eval()
    hits = [Hit(i, f"{name}", name, text, 0, len(text), None, None, 1.0 - i / 10)
            for i, (name, text) in enumerate(CORPUS.items())]
    pairs = [("Why do cats purr?", hits[:1]), ("What is lava made of, and where does it go?", hits[1:3])]
    batched = answer_batch(pairs, model, tokenizer, max_new_tokens=24)
    for (question, chosen), got in zip(pairs, batched, strict=True):
        alone = answer(question, chosen, model, tokenizer, max_new_tokens=24)
        assert (got.token_ids, got.text, got.prompt) == (alone.token_ids, alone.text, alone.prompt)
