"""Tokenizer files: tiktoken rank files, Hugging Face tokenizer.json, model directories.

- tiktoken rank file (cl100k_base, Llama 3's ``tokenizer.model``): one line per token,
  ``<base64 of the token bytes> <rank>``.
- Hugging Face ``tokenizer.json`` (byte-level BPE: GPT-2, Llama 3, our own): a vocab
  {string: id} and a merge list, where each byte is written as a printable character
  (``byte_to_unicode``), plus the pre-tokenizer regex and the added (special) tokens.
  ``tokenizer_config.json`` names the bos/eos tokens and may hold a chat template.

Our ``BPETokenizer.save`` writes exactly these two Hugging Face files, so one directory
serves scratchlm, ``transformers.AutoTokenizer`` and ``tokenizers.Tokenizer`` alike.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from .base import TokenizerError
from .bpe import BPETokenizer
from .bpe_train import PATTERNS

PathLike = Union[str, os.PathLike]

# The regex of Hugging Face's ByteLevel pre-tokenizer with use_regex=True (GPT-2's).
HF_BYTELEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Llama 3's pre-split regex (its tokenizer.model holds only the ranks).
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def llama3_special_tokens(n_ranks: int = 128000) -> dict[str, int]:
    """The 256 special tokens that follow Llama 3's ranks (names as in Llama 3.1+)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
    return {name: n_ranks + i for i, name in enumerate(names)}


# ---- byte <-> printable character (GPT-2's trick, used by every HF byte-level file) -------
@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, so a vocab of byte strings can live in JSON.

    Bytes that are already visible Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to
    themselves; the other 68 (control bytes, space, ...) map to U+0100 onwards, in order.
    So b" " is 'Ġ' (U+0120) and b"\\n" is 'Ċ' (U+010A).

    >>> byte_to_unicode()[ord(" ")], byte_to_unicode()[ord("a")]
    ('Ġ', 'a')
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in visible}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def bytes_to_hf(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def hf_to_bytes(token: str) -> bytes:
    table = unicode_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"vocab entry {token!r} is not byte-level (character {e.args[0]!r})") from None


# ---- tiktoken rank files --------------------------------------------------------------------
def read_tiktoken_ranks(path: PathLike) -> dict[bytes, int]:
    """Read ``<base64 token> <rank>`` lines into {bytes: rank}."""
    ranks = {}
    try:
        text = Path(path).read_text("ascii")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        where = f" line {number}" if "number" in locals() else ""
        raise TokenizerError(f"{path}:{where} not a tiktoken rank file ({e})") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tiktoken rank file")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: PathLike) -> None:
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    Path(path).write_text("".join(lines))


def is_tiktoken_file(path: PathLike) -> bool:
    """True if the file starts like a tiktoken rank file (SentencePiece models are binary)."""
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n")[0]
    parts = head.split(b" ")
    return len(parts) == 2 and parts[1].isdigit() and all(
        c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" for c in parts[0])


def bpe_from_tiktoken(encoding) -> BPETokenizer:
    """A ``tiktoken.Encoding`` (e.g. cl100k_base) as a BPETokenizer with the same ids."""
    return BPETokenizer(encoding._mergeable_ranks, encoding._pat_str, encoding._special_tokens,
                        name=encoding.name)


# ---- Hugging Face tokenizer.json --------------------------------------------------------------
def hf_pattern(pattern: str) -> str:
    """Our regex in a form Hugging Face's Oniguruma accepts (no possessive interval)."""
    return pattern.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def hf_tokenizer_json(tok: BPETokenizer) -> dict:
    """The tokenizer.json of a byte-level BPETokenizer, encoding exactly like ours.

    Hugging Face BPE merges a pair only if it is in the merge list, in list order;
    ours merges any adjacent pair whose concatenation is a token, by that token's
    rank. To make the two agree, the merge list holds every split of every token into
    two tokens, ordered by the rank of the result, and ``ignore_merges`` lets a whole
    pre-token that is in the vocabulary become that token directly (as tiktoken does)."""
    vocab = {bytes_to_hf(t): i for t, i in sorted(tok.ranks.items(), key=lambda x: x[1])}
    # Special tokens are listed in the vocab too: HF gives an added token that is not in
    # the vocab a new id at the end, which would move specials that sit elsewhere.
    for name, i in tok.special_tokens.items():
        if vocab.setdefault(name, i) != i:
            raise TokenizerError(f"special token {name!r} has the same text as token {vocab[name]}: "
                                 "tokenizer.json cannot hold both")
    merges = []
    for token, rank in sorted(tok.ranks.items(), key=lambda x: x[1]):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in tok.ranks and right in tok.ranks:
                # Order within one result: by the ranks of the parts (any order agrees).
                merges.append((rank, tok.ranks[left], tok.ranks[right], bytes_to_hf(left), bytes_to_hf(right)))
    merges.sort()
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for s, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": tok.normalizer} if tok.normalizer else None,
        "pre_tokenizer": _hf_pre_tokenizer(tok),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab,
                  "merges": [[left, right] for *_, left, right in merges]},
    }


def _hf_pre_tokenizer(tok: BPETokenizer) -> dict:
    if tok.add_prefix_space:
        # HF's ByteLevel adds the space to every piece a Split before it produced, so the
        # prefix space only exports with ByteLevel's own (GPT-2) regex, as it was loaded.
        if tok.pattern != HF_BYTELEVEL_PATTERN:
            raise TokenizerError("add_prefix_space with a custom regex cannot be saved as tokenizer.json")
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": hf_pattern(tok.pattern)}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


def save_hf_bpe(tok: BPETokenizer, directory: PathLike) -> None:
    """Write tokenizer.json and tokenizer_config.json into an existing directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: not a directory (create it before saving a tokenizer)")
    (directory / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(tok), ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,  # decode must give back exactly the text
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
                                 for s, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])},
    }
    eos = tok.eos_token if tok.eos_token in tok.special_tokens else None
    if eos is None and tok.eot_id is not None:
        eos = next(s for s, i in tok.special_tokens.items() if i == tok.eot_id)
    if eos:
        config["eos_token"] = eos
    if tok.bos_token in tok.special_tokens:
        config["bos_token"] = tok.bos_token
    write_tokenizer_config(tok, directory, config)
    remove_stale_files(directory, ("tokenizer.json", "tokenizer_config.json"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_name(value) -> Optional[str]:
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory: Path) -> dict:
    """bos/eos names, added special tokens and the chat template of a HF directory."""
    path = directory / "tokenizer_config.json"
    config = _read_json(path) if path.exists() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = directory / "chat_template.jinja"  # transformers 5 writes it beside the config
    if template is None and jinja.exists():
        template = jinja.read_text("utf-8")
    added = {}
    for key, value in (config.get("added_tokens_decoder") or {}).items():
        name = _token_name(value)
        if name is not None and str(key).isdigit():
            added[name] = int(key)
    return {"bos_token": _token_name(config.get("bos_token")), "eos_token": _token_name(config.get("eos_token")),
            "chat_template": template if isinstance(template, str) else None, "added_tokens": added,
            "raw": config}


def _normalizer(spec: Optional[dict], path: Path) -> Optional[str]:
    """A Unicode normal form ("NFC", ...) or None; other normalizers are not supported."""
    if not spec:
        return None
    steps = spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    forms = [step.get("type") for step in steps]
    if len(forms) > 1 or any(f not in ("NFC", "NFD", "NFKC", "NFKD") for f in forms):
        raise TokenizerError(f"{path}: normalizer {forms} is not supported (only one of NFC, NFD, NFKC, NFKD)")
    return forms[0] if forms else None


def _pre_tokenizer_pattern(pre: Optional[dict], path: Path) -> tuple[str, bool]:
    """(regex, add_prefix_space) of a byte-level pre-tokenizer; error on anything else."""
    if not pre:
        raise TokenizerError(f"{path}: no pre-tokenizer: not a byte-level BPE tokenizer")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern, prefix, byte_level = None, False, False
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and pattern is None and not step.get("invert") \
                and step.get("behavior") == "Isolated" and "Regex" in (step.get("pattern") or {}):
            pattern = step["pattern"]["Regex"]
        elif kind == "ByteLevel" and not byte_level:
            byte_level = True
            prefix = bool(step.get("add_prefix_space", False))
            if step.get("use_regex", True):
                if pattern is not None:
                    raise TokenizerError(f"{path}: two pre-split regexes are not supported")
                pattern = HF_BYTELEVEL_PATTERN
        else:
            raise TokenizerError(f"{path}: unsupported pre-tokenizer step {kind!r}")
    if not byte_level or pattern is None:
        raise TokenizerError(f"{path}: not a byte-level BPE tokenizer (no ByteLevel pre-tokenizer)")
    return pattern, prefix


def load_hf_tokenizer_json(path: PathLike, config: Optional[dict] = None) -> BPETokenizer:
    """A Hugging Face byte-level BPE ``tokenizer.json`` as a BPETokenizer (same ids)."""
    path = Path(path)
    return bpe_from_hf_dict(_read_json(path), path, config)


def bpe_from_hf_dict(data: dict, path: Path, config: Optional[dict] = None) -> BPETokenizer:
    """The parsed tokenizer.json ``data`` (read from ``path``, named in errors)."""
    try:
        return _bpe_from_hf_dict(data, path, config or {})
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None


def _bpe_from_hf_dict(data: dict, path: Path, config: dict) -> BPETokenizer:
    model = data.get("model") or {}
    if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
        raise TokenizerError(f"{path}: model type {model.get('type')!r} is not supported "
                             "(byte-level BPE only)")
    normalizer = _normalizer(data.get("normalizer"), path)
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path}: not a byte-level BPE model (byte_fallback / subword affixes)")
    pattern, add_prefix_space = _pre_tokenizer_pattern(data.get("pre_tokenizer"), path)
    specials = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    ranks = {}
    for token, i in model["vocab"].items():
        if token in specials and specials[token] == i:
            continue  # an added token that is also listed in the vocab
        ranks[hf_to_bytes(token)] = int(i)
    # Our encoder merges by the rank (id) of the result, HF's by merge order: the two
    # agree when each new token comes from a later merge than the tokens before it, as
    # in every tokenizer trained by BPE. (A later merge may rebuild an existing token by
    # another route, "a" + "bc" after "ab" + "c": we apply it at that token's rank.)
    last, made = -1, set()
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        result = ranks.get(hf_to_bytes(left + right))
        if result is None:
            raise TokenizerError(f"{path}: merge {left!r} + {right!r} gives a token not in the vocab")
        if result < last and result not in made:
            raise TokenizerError(f"{path}: merges are not in vocabulary-id order; not supported")
        last = max(last, result)
        made.add(result)
    specials.update({k: v for k, v in config.get("added_tokens", {}).items() if k not in specials})
    return BPETokenizer(ranks, pattern, specials, add_prefix_space=add_prefix_space, normalizer=normalizer,
                        bos_token=config.get("bos_token"), eos_token=config.get("eos_token"),
                        chat_template=config.get("chat_template"), name=path.parent.name or "hf")


def load_tiktoken_model(path: PathLike, config: Optional[dict] = None) -> BPETokenizer:
    """Llama 3's ``tokenizer.model`` (tiktoken ranks + Llama 3 regex and specials)."""
    ranks = read_tiktoken_ranks(path)
    config = config or {}
    specials = config.get("added_tokens") or llama3_special_tokens(len(ranks))
    specials = {s: i for s, i in specials.items() if s.encode() not in ranks or ranks[s.encode()] != i}
    return BPETokenizer(ranks, LLAMA3_PATTERN, specials,
                        bos_token=config.get("bos_token") or "<|begin_of_text|>",
                        eos_token=config.get("eos_token") or "<|end_of_text|>",
                        chat_template=config.get("chat_template"), name="llama3")


def load_tokenizer(directory: PathLike):
    """The tokenizer saved in ``directory``, or None if it holds no tokenizer files.

    Reads, in this order: ``char_tokenizer.json`` (ours); ``tokenizer.json`` (byte-level
    BPE: ours, GPT-2, Llama 3); ``tokenizer.model`` (SentencePiece for Llama 2, or
    tiktoken ranks for Llama 3); ``vocab.json`` + ``merges.txt`` (GPT-2's original files).
    bos/eos/chat template come from ``tokenizer_config.json`` when present."""
    from .char import FILENAME as CHAR_FILE
    from .char import CharTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: not a directory")
    if (directory / CHAR_FILE).exists():
        return CharTokenizer.load(directory)
    config = read_tokenizer_config(directory)
    tok = _load_files(directory, config)
    if tok is not None:
        tok.hf_config = config["raw"]  # kept, so that saving it again keeps its settings
    return tok


def _load_files(directory: Path, config: dict):
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
        from .spm import SentencePieceTokenizer

        tok = SentencePieceTokenizer.load(model_file, config)
        if tokenizer_json.exists():  # HF's own version of it: saved back unchanged
            tok.hf_tokenizer_json = tokenizer_json.read_text("utf-8")
        return tok
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        return load_vocab_merges(directory, config)
    return None


# Every file name a tokenizer of ours may read; a save removes the ones it does not write,
# so a directory never holds a stale tokenizer that load_tokenizer would pick instead.
TOKENIZER_FILES = ("char_tokenizer.json", "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def remove_stale_files(directory: PathLike, written: tuple[str, ...]) -> None:
    directory = Path(directory)
    for name in TOKENIZER_FILES:
        if name not in written and (directory / name).is_file():
            (directory / name).unlink()


def write_tokenizer_config(tok, directory: Path, config: dict) -> None:
    """tokenizer_config.json: the loaded one's settings (if any), then ours on top."""
    merged = dict(tok.hf_config or {})
    merged.update(config)
    merged.pop("chat_template", None)
    if tok.chat_template:
        merged["chat_template"] = tok.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(merged, indent=2, ensure_ascii=False))


def load_vocab_merges(directory: Path, config: Optional[dict] = None) -> BPETokenizer:
    """GPT-2's original ``vocab.json`` + ``merges.txt`` (ByteLevel with GPT-2's regex)."""
    vocab = _read_json(directory / "vocab.json")
    lines = (directory / "merges.txt").read_text("utf-8").splitlines()
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


__all__ = ["PATTERNS", "byte_to_unicode", "read_tiktoken_ranks", "write_tiktoken_ranks", "bpe_from_tiktoken",
           "hf_tokenizer_json", "save_hf_bpe", "load_hf_tokenizer_json", "load_tokenizer"]
