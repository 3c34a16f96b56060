"""``load_tokenizer(dir)``: whichever tokenizer a directory holds (the dispatcher).

This module sits on top of the package: it imports every tokenizer and file format, and
nothing in the package imports it back. It reads, in this order:

- ``char_tokenizer.json`` (ours: ``CharTokenizer``);
- ``tokenizer.json`` (byte-level BPE: ours, GPT-2, Llama 3; ``hf_json.py``);
- ``tokenizer.model``: tiktoken ranks (Llama 3; ``tiktoken_files.py``) or SentencePiece
  (Llama 2; ``spm.py``);
- ``vocab.json`` + ``merges.txt`` (GPT-2's original files).

bos/eos names and the chat template come from ``tokenizer_config.json`` when present.
Given the ``vocab_size`` of the model it will feed, it refuses a tokenizer whose ids reach
beyond it (the embedding lookup would fail, or read garbage, later and far away).

>>> import tempfile
>>> from scratchlm.tokenizer import CharTokenizer
>>> d = tempfile.mkdtemp()
>>> CharTokenizer.train("abc").save(d)
>>> load_tokenizer(d).encode("cab")
[2, 0, 1]
>>> load_tokenizer(d, vocab_size=2)
Traceback (most recent call last):
...
scratchlm.tokenizer.base.TokenizerError: ...: the tokenizer has ids up to 2 but the model's vocabulary has 2 (ids 0..1)
"""

from __future__ import annotations

from pathlib import Path

from .base import Tokenizer, TokenizerError
from .bpe import BPETokenizer
from .char import FILENAME as CHAR_FILE
from .char import CharTokenizer
from .files import PathLike, read_json_object
from .hf_json import hf_bpe_fields, read_tokenizer_config
from .spm import SentencePieceTokenizer
from .tiktoken_files import is_tiktoken_file, load_tiktoken_model


def load_tokenizer(directory: PathLike, vocab_size: int | None = None) -> Tokenizer | None:
    """The tokenizer saved in ``directory``, or None if it holds no tokenizer files.

    With ``vocab_size`` (the model's), a TokenizerError if any id of the tokenizer is
    ``>= vocab_size``. (A model may have more rows than its tokenizer has ids: padding.)"""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: not a directory")
    if (directory / CHAR_FILE).exists():
        tok = CharTokenizer.load(directory)
    else:
        config = read_tokenizer_config(directory)
        tok = _load_files(directory, config)
        if tok is not None:
            tok.hf_config = config["raw"]  # kept, so that saving it again keeps its settings
    if tok is not None and vocab_size is not None:
        check_vocab_fits(tok, vocab_size, directory)
    return tok


def check_vocab_fits(tok: Tokenizer, vocab_size: int, where: PathLike = "tokenizer") -> None:
    """TokenizerError if ``tok`` has an id that a model of ``vocab_size`` rows cannot embed."""
    if tok.vocab_size > vocab_size:
        raise TokenizerError(f"{where}: the tokenizer has ids up to {tok.vocab_size - 1} but the model's "
                             f"vocabulary has {vocab_size} (ids 0..{vocab_size - 1})")


def load_hf_tokenizer_json(path: PathLike, config: dict | None = None) -> BPETokenizer:
    """A Hugging Face byte-level BPE ``tokenizer.json`` as a BPETokenizer (same ids)."""
    path = Path(path)
    return bpe_from_hf_dict(read_json_object(path), path, config)


def bpe_from_hf_dict(data: dict, path: Path, config: dict | None = None) -> BPETokenizer:
    """The parsed tokenizer.json ``data`` (read from ``path``, named in errors)."""
    return BPETokenizer(**hf_bpe_fields(data, path, config))


def load_vocab_merges(directory: Path, config: dict | None = None) -> BPETokenizer:
    """GPT-2's original ``vocab.json`` + ``merges.txt`` (ByteLevel with GPT-2's regex)."""
    vocab = read_json_object(directory / "vocab.json")
    try:
        lines = (directory / "merges.txt").read_text("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{directory / 'merges.txt'}: not UTF-8 text ({e})") from None
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    data = {"model": {"type": "BPE", "vocab": vocab, "merges": merges},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "added_tokens": []}
    config = dict(config or {})
    added = dict(config.get("added_tokens") or {})
    for name in (config.get("bos_token"), config.get("eos_token")):
        if name and name in vocab:
            added[name] = vocab[name]
    config["added_tokens"] = added
    data["added_tokens"] = [{"id": i, "content": s} for s, i in added.items()]
    return bpe_from_hf_dict(data, directory / "vocab.json", config)


def _load_files(directory: Path, config: dict) -> Tokenizer | None:
    tokenizer_json, model_file = directory / "tokenizer.json", directory / "tokenizer.model"
    if tokenizer_json.exists():
        try:
            return load_hf_tokenizer_json(tokenizer_json, config)
        except TokenizerError:
            if not model_file.exists():
                raise
            # e.g. Llama 2's tokenizer.json is not byte-level: read its tokenizer.model
    if model_file.exists():
        if is_tiktoken_file(model_file):
            return load_tiktoken_model(model_file, config)
        tok = SentencePieceTokenizer.load(model_file, config)
        if tokenizer_json.exists():  # HF's own version of it: saved back unchanged
            tok.hf_tokenizer_json = tokenizer_json.read_text("utf-8")
        return tok
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        return load_vocab_merges(directory, config)
    return None
