"""Loading other libraries' tokenizers and exporting ours: HF tokenizers, transformers,
SentencePiece, tiktoken rank files. Each reference is trained here, offline, on a small text."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.tokenizer import BPETokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer
from scratchlm.tokenizer.tiktoken_files import LLAMA3_PATTERN, read_tiktoken_ranks, write_tiktoken_ranks
from test_tokenizer import SPECIAL_TEXT, TEXTS, corpus

tokenizers = pytest.importorskip("tokenizers")
HF_SPECIAL_TEXT = "<|endoftext|>first doc<|endoftext|>second <s>x</s>"


def train_hf_bytelevel(tmp_path, *, split_regex=None, add_prefix_space=False, nfc=False, name="hf"):
    """A byte-level BPE tokenizer.json trained by HF `tokenizers` (GPT-2 or Llama 3 style)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:  # as Qwen2 does
        tok.normalizer = normalizers.NFC()
    if split_regex:  # Llama 3 style: a Split regex, then bytes without GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    directory = tmp_path / name
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    return tok, directory


@pytest.fixture(scope="module")
def hf_gpt2_style(tmp_path_factory):
    return train_hf_bytelevel(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def hf_llama3_style(tmp_path_factory):
    return train_hf_bytelevel(tmp_path_factory.mktemp("hf3"), split_regex=LLAMA3_PATTERN)


# ---- HF tokenizers tokenizer.json -----------------------------------------------------------
@pytest.mark.parametrize("style", ["hf_gpt2_style", "hf_llama3_style"])
def test_hf_tokenizer_json_encodes_like_tokenizers(style, request):
    hf, directory = request.getfixturevalue(style)
    ours = load_tokenizer(directory)
    assert isinstance(ours, BPETokenizer)
    assert ours.vocab_size == hf.get_vocab_size()
    for text in TEXTS + [HF_SPECIAL_TEXT]:
        expected = hf.encode(text).ids
        assert ours.encode(text) == expected, text
        assert ours.encode(text, fast=False) == expected
        assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60) | st.lists(st.sampled_from(["<s>", "</s>", "a", " ", "\n", "é"])).map("".join))
def test_hf_tokenizer_json_any_text(hf_llama3_style, text):
    hf, directory = hf_llama3_style
    ours = load_tokenizer(directory)
    assert ours.encode(text) == hf.encode(text).ids


@pytest.mark.parametrize("option", ["add_prefix_space", "nfc"])
def test_hf_text_transforms(tmp_path, option):
    hf, directory = train_hf_bytelevel(tmp_path, **{option: True})
    ours = load_tokenizer(directory)
    for text in ["Hello world", " already spaced", "a<|endoftext|>b", "e\u0301te\u0301 \u212b \ufb01"]:
        expected = hf.encode(text).ids
        assert ours.encode(text) == expected and ours.encode(text, fast=False) == expected
    ours.save(tmp_path)  # and our export keeps the transform
    again = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert again.encode("e\u0301 x<|endoftext|>").ids == hf.encode("e\u0301 x<|endoftext|>").ids


def test_gpt2_vocab_and_merges_files(tmp_path):
    hf, directory = train_hf_bytelevel(tmp_path)
    hf.model.save(str(directory))  # vocab.json + merges.txt, GPT-2's original layout
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    ours = load_tokenizer(directory)
    assert ours.eot_id == hf.token_to_id("<|endoftext|>")
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text).ids


def test_tokenizer_config_specials_and_chat_template(hf_gpt2_style, tmp_path):
    hf, directory = hf_gpt2_style
    (tmp_path / "tokenizer.json").write_text((directory / "tokenizer.json").read_text())
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": template}))
    ours = load_tokenizer(tmp_path)
    assert ours.bos_id == hf.token_to_id("<s>") and ours.eot_id == hf.token_to_id("</s>")  # declared eos
    assert load_tokenizer(directory).eot_id == hf.token_to_id("<|endoftext|>")  # no config
    assert ours.chat_template == template
    assert load_tokenizer(directory).chat_template is None


# ---- export: transformers loads what we save -----------------------------------------------
def test_save_hf_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = BPETokenizer.train(corpus(), 800, special_tokens=["<|endoftext|>", "<|im_start|>"])
    ours.chat_template = "{{ messages[0]['content'] }}<|endoftext|>"
    ours.save_hf(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert auto.eos_token == "<|endoftext|>" and auto.eos_token_id == ours.eot_id
    assert auto.chat_template == ours.chat_template
    for text in TEXTS + [SPECIAL_TEXT.replace("<|fim_prefix|>", "<|im_start|>")]:
        expected = ours.encode(text)
        assert auto(text)["input_ids"] == expected, text
        assert fast.encode(text) == expected
        assert raw.encode(text).ids == expected
        assert auto.decode(expected) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_save_hf_any_text(tmp_path_factory, text):
    ours, raw = _exported()
    assert raw.encode(text).ids == ours.encode(text)


_EXPORTED = {}


def _exported():
    if not _EXPORTED:
        import tempfile

        ours = BPETokenizer.train(corpus(), 700)
        directory = tempfile.mkdtemp()
        ours.save_hf(directory)
        _EXPORTED["pair"] = (ours, tokenizers.Tokenizer.from_file(f"{directory}/tokenizer.json"))
    return _EXPORTED["pair"]


def test_save_into_missing_directory_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="not a directory"):
        BPETokenizer.train("abc", 260).save(tmp_path / "nope")


# ---- tiktoken rank files (Llama 3's tokenizer.model) -----------------------------------------
def test_llama3_style_tiktoken_model(tmp_path):
    import tiktoken

    trained = BPETokenizer.train(corpus(), 600, pattern=LLAMA3_PATTERN, special_tokens=[])
    write_tiktoken_ranks(trained.ranks, tmp_path / "tokenizer.model")
    assert read_tiktoken_ranks(tmp_path / "tokenizer.model") == trained.ranks
    ours = load_tokenizer(tmp_path)
    n = len(trained.ranks)
    assert ours.bos_id == n and ours.eot_id == n + 1  # <|begin_of_text|>, <|end_of_text|>
    assert ours.special_tokens["<|eot_id|>"] == n + 9 and ours.vocab_size == n + 256
    reference = tiktoken.Encoding("llama3-like", pat_str=LLAMA3_PATTERN, mergeable_ranks=trained.ranks,
                                  special_tokens=ours.special_tokens)
    text = "<|begin_of_text|>" + " ".join(TEXTS) + "<|eot_id|>"
    assert ours.encode(text) == reference.encode(text, allowed_special="all")
    assert ours.encode(text, fast=False) == reference.encode(text, allowed_special="all")


# ---- SentencePiece (Llama 2's tokenizer.model) ------------------------------------------------
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    directory = tmp_path_factory.mktemp("sp")
    (directory / "corpus.txt").write_text("\n".join(t for t in corpus() if t))
    # Llama 2's settings: BPE, byte fallback, no normalisation, digits split, spaces kept.
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), vocab_size=700,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9995, user_defined_symbols=["<tool>"], minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")), directory


def test_sentencepiece_model_reads_like_the_library(sp_model):
    sp, directory = sp_model
    ours = load_tokenizer(directory)
    assert isinstance(ours, SentencePieceTokenizer)
    assert ours.vocab_size == sp.get_piece_size()
    assert [p["piece"] for p in ours.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert ours.bos_id == sp.bos_id() and ours.eot_id == sp.eos_id()
    for i in range(sp.get_piece_size()):
        assert ours.pieces[i]["score"] == pytest.approx(sp.get_score(i))


@pytest.mark.parametrize("text", TEXTS + ["use <tool> now", "  two  spaces", "ÿþ ĀāĂ 𝔘𝔫𝔦"])
def test_sentencepiece_reference_encoder_matches_library(sp_model, text):
    sp, directory = sp_model
    ours = load_tokenizer(directory)
    expected = sp.encode(text)
    assert ours.encode_reference(text) == expected
    assert ours.encode(text, allowed_special="none") == expected
    assert ours.decode(expected) == sp.decode(expected)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=50))
def test_sentencepiece_any_text(sp_model, text):
    sp, directory = sp_model
    ours = SentencePieceTokenizer.load(directory / "tokenizer.model")
    assert ours.encode_reference(text) == sp.encode(text)


def test_sentencepiece_special_tokens_in_text(sp_model):
    sp, directory = sp_model
    ours = load_tokenizer(directory)
    ids = ours.encode("<s>hi</s>")
    assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id() and ids[1:-1] == sp.encode("hi")
    assert ours.encode("<s>hi", fast=False) == ids[:-1]


def test_sentencepiece_save_roundtrip(sp_model, tmp_path):
    sp, directory = sp_model
    load_tokenizer(directory).save(tmp_path)
    assert load_tokenizer(tmp_path).encode("Hello world") == sp.encode("Hello world")


def test_sentencepiece_nfkc_model_uses_the_library(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(t for t in corpus() if t))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=500, model_type="bpe", minloglevel=2)  # default: nmt_nfkc
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = load_tokenizer(tmp_path)
    text = "ﬁne  full-width ＡＢＣ  spaces"
    assert ours.encode(text) == sp.encode(text)
    assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    with pytest.raises(TokenizerError, match="nmt_nfkc"):
        ours.encode(text, fast=False)


def test_sentencepiece_unigram_encodes_through_the_library(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("\n".join(t for t in corpus() if t))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=500, model_type="unigram", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == sp.encode(text)
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    with pytest.raises(TokenizerError, match="unigram"):
        ours.encode("x", fast=False)


def test_save_keeps_loaded_settings_and_removes_stale_files(hf_gpt2_style, sp_model, tmp_path):
    hf, directory = hf_gpt2_style
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_text((directory / "tokenizer.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "model_max_length": 2048, "padding_side": "left", "chat_template": "{{ x }}"}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "char_tokenizer.json").write_text("{}")  # an old tokenizer that would win on load
    load_tokenizer(source).save(out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 2048 and config["padding_side"] == "left"
    assert config["eos_token"] == "</s>" and config["chat_template"] == "{{ x }}"
    again = load_tokenizer(out)
    assert again.eot_id == hf.token_to_id("</s>") and again.chat_template == "{{ x }}"

    sp, sp_dir = sp_model  # a SentencePiece tokenizer replaces it
    load_tokenizer(sp_dir).save(out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    assert isinstance(load_tokenizer(out), SentencePieceTokenizer)
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] == "<s>"


def test_vocab_without_every_byte(tmp_path):
    # Trained without the 256-byte alphabet: only the bytes seen have tokens. Text made of
    # them encodes as HF does (on the reference path); any other byte is a clear error.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["the cat sat on the mat"] * 10, trainers.BpeTrainer(vocab_size=40, show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    assert ours.encode("the mat sat") == hf.encode("the mat sat").ids
    with pytest.raises(TokenizerError, match="has no token"):
        ours.encode("the dog")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="abc ", min_size=1, max_size=12), min_size=1, max_size=30),
       st.integers(260, 300), st.text(alphabet="abc ", max_size=30))
def test_hf_trained_on_a_tiny_alphabet_encodes_alike(texts, vocab_size, probe):
    # Few symbols: many ties and many ways to build each token, where HF's merge-list
    # order and our merge-by-rank would part first if they could.
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    with tempfile.TemporaryDirectory() as directory:
        hf.save(f"{directory}/tokenizer.json")
        ours = load_tokenizer(directory)
    for text in texts + [probe]:
        assert ours.encode(text) == hf.encode(text).ids


def test_sentencepiece_exports_a_tokenizer_json(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    (tmp_path / "corpus.txt").write_text("\n".join(t for t in corpus() if t))
    spm.SentencePieceTrainer.train(  # Llama 2's settings, no user-defined symbols
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=600,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    out = tmp_path / "out"
    out.mkdir()
    SentencePieceTokenizer.load(tmp_path / "tokenizer.model").save(out)
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS + ["  two  spaces", "tab\there"]:
        expected = sp.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == expected, text
        assert auto(text, add_special_tokens=False)["input_ids"] == expected
        assert hf.encode(text).ids == [sp.bos_id()] + expected  # HF's Llama adds bos
        assert hf.decode(expected) == sp.decode(expected)
    again = load_tokenizer(out)  # tokenizer.json is not byte-level: tokenizer.model is read
    assert isinstance(again, SentencePieceTokenizer) and again.encode("Hello world") == sp.encode("Hello world")


def test_sentencepiece_streaming_keeps_spaces(sp_model):
    sp, directory = sp_model
    ours = load_tokenizer(directory)
    ids = sp.encode("Hello world, 中文")
    streamed = b"".join(ours.decode_bytes([i]) for i in ids).decode()
    assert streamed == " " + sp.decode(ids) and ours.decode(ids) == sp.decode(ids)


def test_llama3_style_tokenizer_json_from_transformers_converter(tmp_path):
    # Llama 3's tokenizer.json was made from its tiktoken file by transformers'
    # TikTokenConverter: convert our ranks the same way, load the result, compare.
    pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    trained = BPETokenizer.train(corpus(), 700, pattern=LLAMA3_PATTERN, special_tokens=[])
    write_tiktoken_ranks(trained.ranks, tmp_path / "ranks.tiktoken")
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    hf = TikTokenConverter(vocab_file=str(tmp_path / "ranks.tiktoken"), pattern=LLAMA3_PATTERN,
                           extra_special_tokens=specials).converted()
    hf.add_special_tokens(specials)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path)
    assert ours.special_tokens == {s: hf.token_to_id(s) for s in specials}
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text).ids == trained.encode(text)
    text = "<|begin_of_text|>hi<|end_of_text|>"
    assert ours.encode(text) == hf.encode(text).ids == [ours.bos_id, *trained.encode("hi"), ours.eot_id]
