"""What ``rag ask`` reads: retrieval and decoding options, one typed config (train/config.py's
mechanism), so that a bad value from the command line or a ``--config`` file is the same
one-line error, and ``--temperature``, ``--top-p``... mean what they mean in ``generate``.

The decoding defaults are not ``generate``'s. A small instruct model answering from four
passages falls into a loop: greedy decoding finds a sentence it likes, writes it again, and
then every repetition makes the next more likely, until ``max_new_tokens`` runs out
(benchmarks/rag_answers.py counts it for SmolLM2-135M-Instruct on 20 questions about
the Python reference). Two defaults stop it:

- ``no_repeat_ngram``: a token that would complete an n-gram already written in the
  answer is forbidden (only in the answer: copying a phrase from a source is fine).
- ``repetition_penalty``, mild, which lowers the logits of tokens already in the prompt
  or the answer (CTRL's penalty, as ``generate`` applies it).

>>> cfg = AskConfig.from_dict({"top_p": 0.9, "temperature": 0.7})
>>> sorted(cfg.generate_options())[:4]
['max_new_tokens', 'min_p', 'no_repeat_ngram', 'repetition_penalty']
>>> AskConfig.from_dict({"temperature": float("nan")})
Traceback (most recent call last):
...
scratchlm.errors.ConfigError: config: temperature must be a finite number, got nan
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..train.config import Config, need, option

MAX_K = 100  # passages per prompt: more never fit a context, and fitting them is quadratic
MAX_NEW_TOKENS = 1 << 20


@dataclass
class AskConfig(Config):
    """Retrieval and generation options of ``rag ask`` (and ``pipeline.answer``)."""

    command = "scratchlm rag ask"

    k: int = option(4, "how many chunks to retrieve")
    mode: Literal["dense", "keyword", "hybrid"] = option(
        "dense", "dense embeddings, keyword BM25, or hybrid (both fused by RRF)")
    max_new_tokens: int = option(256, "longest answer in tokens")
    temperature: float = option(0.0, "0: greedy; >0: sample")
    top_k: int | None = option(None, "sample among the k most likely tokens")
    top_p: float | None = option(None, "sample in the smallest set with this mass, in (0, 1]")
    min_p: float | None = option(None, "drop tokens below min_p x the top probability")
    repetition_penalty: float = option(1.1, ">1 discourages tokens already in the prompt or answer (1: off)")
    no_repeat_ngram: int = option(6, "never write the same n tokens twice in an answer (0: off)")
    seed: int | None = option(None, "seed for sampling (repeatable output)")
    template: str | None = option(None, "chat template: llama3, chatml, plain... (default: the model's)")

    def validate(self) -> None:
        from ..sampling import SamplingOptions

        need(1 <= self.k <= MAX_K, f"k must be between 1 and {MAX_K}, got {self.k}")
        need(1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
             f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        need(self.no_repeat_ngram >= 0, f"no_repeat_ngram must be >= 0 (0: off), got {self.no_repeat_ngram}")
        need(self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}")
        SamplingOptions(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)

    def generate_options(self) -> dict:
        """The keyword arguments of ``generate.generate`` these options stand for."""
        return dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                    no_repeat_ngram=self.no_repeat_ngram, seed=self.seed)


__all__ = ["AskConfig", "MAX_K"]
