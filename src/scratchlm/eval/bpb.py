"""Bits per byte on held-out text: a loss that does not depend on the tokenizer.

Cross-entropy per *token* cannot compare two models with different tokenizers: a
tokenizer with longer tokens has fewer, harder predictions. Per *byte* of UTF-8 text it
can: the total negative log-likelihood of a text is the same quantity for any
tokenizer, so divide it by the text's bytes (and by ln 2 for bits)::

    bits per byte = -sum(log p(token)) / (n_bytes * ln 2)
    byte perplexity = 2 ** bits_per_byte;  token perplexity = exp(-sum / n_tokens)

A document longer than the model's context is read in windows (lm-evaluation-harness's
``loglikelihood_rolling``): the first window starts with the prefix token (BOS or
end-of-text) and predicts every token it holds; each next window predicts the next
``stride`` tokens, seeing the ``max_length - stride + 1`` tokens before them (the model
reads ``max_length`` tokens per window: the context and all but the last predicted one).
Every token, so every byte, is counted exactly once. ``stride = max_length`` (the
default) is lm-eval's choice and the fastest; a smaller stride gives each prediction
more context (a lower, fairer number) for more compute::

    tokens   t0 t1 t2 t3 t4 t5 t6 t7 t8 t9      max_length 4, stride 2
    window 1 reads [p  t0 t1 t2]  predicts t0 t1 t2 t3
    window 2 reads    [t1 t2 t3 t4]  predicts t4 t5  (t1 t2 t3 are context)
    window 3 reads          [t3 t4 t5 t6]  predicts t6 t7 ...

>>> windows = rolling_windows(list(range(10)), prefix_id=99, max_length=4, stride=2)
>>> [(ctx, cont) for ctx, cont in windows][:3]
[([99], [0, 1, 2, 3]), ([1, 2, 3], [4, 5]), ([3, 4, 5], [6, 7])]
>>> sum(len(cont) for _, cont in windows)
10
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFound, ScratchLMError
from .loglik import prefix_token_id, score_continuations


@dataclass
class BitsPerByte:
    """The result over a set of documents: totals, and the three measures derived from them."""

    nll: float  # total negative log-likelihood, nats
    tokens: int
    bytes: int
    words: int
    documents: int

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2))

    @property
    def byte_perplexity(self) -> float:
        return 2 ** self.bits_per_byte

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_perplexity(self) -> float:  # lm-eval's wikitext "word_perplexity": words split on spaces
        return math.exp(self.nll / self.words)

    def as_dict(self) -> dict:
        return {"bits_per_byte": self.bits_per_byte, "byte_perplexity": self.byte_perplexity,
                "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
                "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes, "items": self.documents}


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token once (see the module doc).

    Equal to lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window`` with
    ``context_len = max_length - stride + 1``.
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ScratchLMError(f"stride must be between 1 and the window length {max_length}, got {stride}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([prefix_id], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        windows.append((tokens[max(0, end - max_length - 1):end - n], tokens[end - n:end]))
        done = end
    return windows


def rolling_loglikelihood(model, tokenizer, texts: Sequence[str], *, max_length: int | None = None,
                          stride: int | None = None, batch_size: int = 16,
                          progress: bool = False) -> list[float]:
    """The total log-likelihood of each text, read in rolling windows (lm-eval's
    ``loglikelihood_rolling``)."""
    max_length = max_length or model.config.context_length
    if max_length > model.config.context_length:
        raise ScratchLMError(f"window of {max_length} tokens is longer than the model's context "
                             f"({model.config.context_length})")
    prefix = prefix_token_id(tokenizer)
    requests, owner = [], []
    for i, text in enumerate(texts):
        for window in rolling_windows(tokenizer.encode(text), prefix, max_length, stride):
            requests.append(window)
            owner.append(i)
    totals = [0.0] * len(texts)
    # Windows of one text have different contexts: nothing to share, so no prefix caching.
    for i, (lp, _) in zip(owner, score_continuations(model, requests, batch_size=batch_size,
                                                     share_prefix=False, progress=progress)):
        totals[i] += lp
    return totals


def bits_per_byte(model, tokenizer, texts: Iterable[str], *, max_length: int | None = None,
                  stride: int | None = None, batch_size: int = 16, progress: bool = False) -> BitsPerByte:
    """Bits per byte (and perplexities) of ``texts``, each one document.

    >>> import torch
    >>> from scratchlm import ModelConfig, Transformer
    >>> from scratchlm.tokenizer import CharTokenizer
    >>> tok = CharTokenizer.train("abcd ", special_tokens=["<|endoftext|>"])
    >>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
    >>> result = bits_per_byte(model, tok, ["abcd " * 40])   # 200 chars: two windows of 128
    >>> result.tokens, result.bytes, 5 < result.bits_per_byte < 15   # random weights: ~log2(512)
    (200, 200, True)
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ScratchLMError("no text to measure")
    totals = rolling_loglikelihood(model, tokenizer, texts, max_length=max_length, stride=stride,
                                   batch_size=batch_size, progress=progress)
    return BitsPerByte(nll=-sum(totals), tokens=sum(len(tokenizer.encode(t)) for t in texts),
                       bytes=sum(len(t.encode("utf-8")) for t in texts),
                       words=sum(len(t.split(" ")) for t in texts), documents=len(texts))


# ----------------------------------------------------------------------------------------
# Where the text comes from
# ----------------------------------------------------------------------------------------
def read_texts(source: str) -> tuple[str, list[str]]:
    """(name, documents) of a text source:

    - a file (.txt, .md, ...; one document) or a folder of them (read as ``scratchlm prepare``
      reads them: .jsonl gives one document per line);
    - a prepared folder (``meta.json`` + shards): its validation split, decoded back to text
      with the tokenizer saved beside it, one document per end-of-text;
    - a built-in corpus (``python-docs``, ``python-reference``), optionally ``:train`` / ``:val``
      (default ``val``): the same documents ``scratchlm prepare --corpus`` puts in that split.
    """
    from ..corpus import CORPORA

    name, _, split = source.partition(":")
    if name in CORPORA and not Path(source).exists():
        return _corpus_split(name, split or "val")
    path = Path(source)
    if not path.exists():
        raise NotFound(f"{source}: no such file or folder, and not a built-in corpus "
                       f"({', '.join(CORPORA)})")
    if path.is_dir() and (path / "meta.json").exists():
        return path.name, _prepared_split(path, "val")
    from ..corpus import find_text_files, read_documents

    docs = [d for f in find_text_files([str(path)]) for d in read_documents(f)]
    if not docs:
        raise ScratchLMError(f"{source}: no text found")
    return path.stem or path.name, docs


def _corpus_split(name: str, split: str) -> tuple[str, list[str]]:
    from ..corpus import load_corpus
    from ..data import split_documents

    if split not in ("train", "val"):
        raise ScratchLMError(f"{name}:{split}: the split must be train or val")
    docs = split_documents(load_corpus(name), split)  # the documents `prepare` holds out (or trains on)
    return f"{name}-{split}", docs


def _prepared_split(path: Path, split: str) -> list[str]:
    import numpy as np

    from ..data import load_meta, load_split
    from ..tokenizer import load_tokenizer

    meta = load_meta(path)
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ScratchLMError) as e:
        raise ScratchLMError(f"{path}: the prepared folder has no tokenizer to decode its shards ({e})") from None
    eot = int(meta["eot_id"])
    docs = []
    for shard in load_split(path, split):
        tokens = np.asarray(shard)
        cuts = np.flatnonzero(tokens == eot).tolist()  # every document starts with end-of-text
        bounds = cuts + [len(tokens)]
        if not cuts or cuts[0] != 0:
            bounds = [-1] + bounds  # a split cut mid-document (a one-file corpus)
        for a, b in itertools.pairwise(bounds):
            if b - a > 1:
                docs.append(tokenizer.decode(tokens[a + 1:b].tolist()))
    return docs
