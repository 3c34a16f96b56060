"""One entry point for "a model": ``load_any(ref)`` -> (model, tokenizer or None).

``ref`` is whatever a user types to name a model. ``LOADERS`` tries, in order:

    a GGUF file                   *.gguf, or a file with the GGUF magic    gguf_io.load_gguf
    a named offline model         "smollm2-135m-instruct" (a package's GGUF) gguf_io.load_gguf
    a Hugging Face directory      config.json names a model_type          hf.load_hf
    a scratchlm model directory   any other local path (or its .old)      checkpoint.load_model
    a preset                      "gpt2", "llama-tiny", ... (random weights, seeded)
    a Hugging Face hub id         owner/name, fetched when online         hf.load_hf

A new kind of model is one more (test, loader) row, placed before the rows that would
claim it. A local path that exists goes to the directory loaders, which
explain what is wrong with it; a name no row claims is a NotFound saying what was tried.
Only a name that cannot be a local path reaches the hub (hub.is_hub_id): a missing
``run2/latest`` is "model directory not found", never a network request.

>>> model, tokenizer = load_any("gpt-tiny")
>>> model.config.n_layers, model.training, tokenizer.decode(tokenizer.encode("héllo"))
(2, False, 'héllo')
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from . import decode_weights
from .atomic import saved_dir
from .checkpoint import load_model
from .config import ModelConfig
from .errors import NotFound
from .gguf_io import NAMED_MODELS, is_gguf_file, load_gguf
from .hf import is_hf_dir, load_hf
from .hub import FILE_SUFFIXES, is_hub_id
from .model import Transformer


def load_any(model_ref: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             seed: int = 0, weights: str | None = None):
    """(model, tokenizer or None) from a scratchlm or Hugging Face directory, a preset name
    (random weights from ``seed``) or a Hugging Face hub id; see the module docstring.

    ``weights``: a decode layout (decode_weights.WEIGHTS) to return the model in. A GGUF
    file's "int8" / "int4" layers are built from its blocks, never as floats
    (gguf_io.load_gguf's ``layout``); any other model is loaded, then prepare_for_decode."""
    for claims, load in LOADERS:
        if claims(model_ref):
            if load is _load_gguf and weights in ("int8", "int4"):
                return load_gguf(model_ref, device=device, layout=weights)
            model, tokenizer = load(model_ref, device=device, dtype=dtype, seed=seed)
            if weights is not None:
                decode_weights.prepare_for_decode(model, weights)  # looked up here: tests wrap it
            return model, tokenizer
    text = str(model_ref)
    if "/" in text or os.sep in text or text.startswith((".", "~")) or text.lower().endswith(FILE_SUFFIXES):
        raise NotFound(f"model directory not found: {model_ref}")  # a path: never asked of the hub
    raise NotFound(f"{model_ref}: not a model directory, a preset ({', '.join(ModelConfig.presets())}) "
                   f"or a Hugging Face id (owner/name)")


# ---- the rows: (does this loader claim ref?, the loader) -------------------------------------------
def _is_local(ref) -> bool:
    return saved_dir(ref) is not None  # the path, or the .old a crash mid-save left


def _is_preset(ref) -> bool:
    return str(ref) in ModelConfig.presets()


def _is_gguf(ref) -> bool:
    return str(ref).endswith(".gguf") or (Path(ref).is_file() and is_gguf_file(ref))


def _load_gguf(ref, device, dtype, seed):
    return load_gguf(ref, device=device, dtype=dtype)


def _load_hf(ref, device, dtype, seed):
    return load_hf(ref, device=device, dtype=dtype)


def _load_scratchlm(ref, device, dtype, seed):
    return load_model(ref, device=device, dtype=dtype)


def _load_preset(ref, device, dtype, seed):
    config = ModelConfig.preset(str(ref))
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(config)
    if dtype is not None:
        model.to(dtype)
    return model.requires_grad_(False).eval(), preset_tokenizer(config)


LOADERS: list[tuple[Callable[[str | os.PathLike], bool], Callable]] = [
    (_is_gguf, _load_gguf),                                        # GGUF file (llama.cpp, Ollama)
    (lambda ref: str(ref) in NAMED_MODELS, _load_gguf),            # a named offline model
    (lambda ref: Path(ref).is_dir() and is_hf_dir(ref), _load_hf),  # Hugging Face directory
    (_is_local, _load_scratchlm),                                  # scratchlm directory (or a bad path)
    (_is_preset, _load_preset),                                    # preset, random weights
    (is_hub_id, _load_hf),                                         # hub id: downloaded when online
]


# ---- the tokenizer of a preset ------------------------------------------------------------------
def preset_tokenizer(config: ModelConfig):
    """A tokenizer for a preset with random weights: GPT-2's own BPE when tiktoken has its
    ranks offline, else a stand-in: ids 0-255 are the bytes, the last id is <|endoftext|>,
    and each id in between decodes as "<id>" (random weights produce any id)."""
    from .tokenizer.bpe import BPETokenizer

    if config.vocab_size == 50257:
        try:
            import tiktoken

            from .tokenizer import bpe_from_tiktoken

            if _tiktoken_cached("gpt2"):
                return bpe_from_tiktoken(tiktoken.get_encoding("gpt2"))
        except Exception:  # noqa: BLE001 - fall back to bytes
            pass
    if config.vocab_size < 257:
        return None
    ranks = {bytes([b]): b for b in range(256)} | {f"<{i}>".encode(): i for i in range(256, config.vocab_size - 1)}
    return BPETokenizer(ranks, "gpt2", special_tokens={"<|endoftext|>": config.vocab_size - 1})


def _tiktoken_cached(name: str) -> bool:
    """Whether tiktoken can build ``name`` without a download."""
    import hashlib
    import tempfile

    urls = {"gpt2": ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                     "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]}
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls[name])


__all__ = ["load_any", "LOADERS", "preset_tokenizer"]
