"""Hugging Face ``tokenizer.json`` + ``tokenizer_config.json`` for byte-level BPE: write and parse.

A byte-level ``tokenizer.json`` (GPT-2, Llama 3, our own) holds a vocab {string: id} and a
merge list, where each byte is written as a printable character (``bytes_map``), plus the
pre-tokenizer regex and the added (special) tokens. ``tokenizer_config.json`` names the
bos/eos tokens and may hold a chat template.

Our ``BPETokenizer.save`` writes exactly these two files, so one directory serves
scratchlm, ``transformers.AutoTokenizer`` and ``tokenizers.Tokenizer`` alike. This module
knows the files, not the tokenizer classes: ``hf_bpe_fields`` parses a tokenizer.json into
the arguments of ``BPETokenizer`` (``load.py`` builds it), so nothing here imports ``bpe.py``.

>>> data = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]},
...         "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}
>>> fields = hf_bpe_fields(data, Path("tokenizer.json"))
>>> fields["ranks"], fields["pattern"] == HF_BYTELEVEL_PATTERN
({b'a': 0, b'b': 1, b'ab': 2}, True)
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import Tokenizer, TokenizerError
from .bytes_map import bytes_to_hf, hf_to_bytes
from .files import PathLike, read_json_object, remove_stale_files, require_directory

# The regex of Hugging Face's ByteLevel pre-tokenizer with use_regex=True (GPT-2's).
HF_BYTELEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ---- writing ----------------------------------------------------------------------------------
def hf_pattern(pattern: str) -> str:
    """Our regex in a form Hugging Face's Oniguruma accepts (no possessive interval)."""
    return pattern.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The tokenizer.json of a byte-level BPETokenizer (``ranks``, ``pattern``, ...),
    encoding exactly like ours.

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


def _hf_pre_tokenizer(tok: Tokenizer) -> dict:
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


def save_hf_bpe(tok: Tokenizer, directory: PathLike) -> None:
    """Write tokenizer.json and tokenizer_config.json into an existing directory."""
    directory = require_directory(directory)
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


def write_tokenizer_config(tok, directory: Path, config: dict) -> None:
    """tokenizer_config.json: the loaded one's settings (if any), then ours on top."""
    merged = dict(tok.hf_config or {})
    merged.update(config)
    merged.pop("chat_template", None)
    if tok.chat_template:
        merged["chat_template"] = tok.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(merged, indent=2, ensure_ascii=False))

# ---- reading ----------------------------------------------------------------------------------
def _token_name(value) -> str | None:
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory: Path) -> dict:
    """bos/eos names, added special tokens and the chat template of a HF directory."""
    path = directory / "tokenizer_config.json"
    config = read_json_object(path) if path.exists() else {}
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


def _normalizer(spec: dict | None, path: Path) -> str | None:
    """A Unicode normal form ("NFC", ...) or None; other normalizers are not supported."""
    if not spec:
        return None
    steps = spec.get("normalizers", []) if spec.get("type") == "Sequence" else [spec]
    forms = [step.get("type") for step in steps]
    if len(forms) > 1 or any(f not in ("NFC", "NFD", "NFKC", "NFKD") for f in forms):
        raise TokenizerError(f"{path}: normalizer {forms} is not supported (only one of NFC, NFD, NFKC, NFKD)")
    return forms[0] if forms else None


def _pre_tokenizer_pattern(pre: dict | None, path: Path) -> tuple[str, bool]:
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


def hf_bpe_fields(data: dict, path: Path, config: dict | None = None) -> dict:
    """The ``BPETokenizer`` arguments of a parsed tokenizer.json ``data`` (read from
    ``path``, named in errors); ``config`` is ``read_tokenizer_config``'s answer."""
    try:
        return _hf_bpe_fields(data, path, config or {})
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None


def _hf_bpe_fields(data: dict, path: Path, config: dict) -> dict:
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
    return dict(ranks=ranks, pattern=pattern, special_tokens=specials, add_prefix_space=add_prefix_space,
                normalizer=normalizer, bos_token=config.get("bos_token"), eos_token=config.get("eos_token"),
                chat_template=config.get("chat_template"), name=path.parent.name or "hf")
