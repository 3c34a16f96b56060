"""Retrieval-augmented answers: retrieve chunks, number them in a prompt, generate, cite.

A language model only knows what was in its training data, and makes up the rest. To
answer from *your* documents, put the relevant passages in the prompt and ask the model
to answer from them, naming which passage each claim comes from:

    System: Answer the question using only the numbered sources below. ...
    User: Sources:

    [1] python-reference:with (The "with" statement)
    The "with" statement is used to wrap the execution of a block ...

    [2] python-reference:context-managers (With Statement Context Managers)
    ...

    Question: How does the with statement work?
    Assistant:

(rendered with the model's chat template; a base model gets the "plain" one above).
The numbers are the contract: an answer's ``[2]`` means source 2, so ``parse_citations``
maps citations back to files, pages and character offsets, and a number that names no
source is reported as invalid rather than shown as a reference.

The prompt must fit the model's context with room for the answer: passages are cut
(then the lowest-ranked dropped) until it does.

>>> from scratchlm.rag.index import Hit
>>> hits = [Hit(1, "a.md", "A", "Cats purr.", 0, 10, None, "Cats", 0.9),
...         Hit(2, "b.pdf", "B", "Dogs bark.", 0, 10, 3, None, 0.5)]
>>> print(sources_block(hits))
[1] a.md (Cats)
Cats purr.
<BLANKLINE>
[2] b.pdf, p. 3 (B)
Dogs bark.
>>> parse_citations("Cats purr [1]; dogs bark [2, 7].", n_sources=2)
([1, 2], [7])
>>> drop_invalid_citations("Cats purr [1]; dogs bark [2, 7]. Fish swim [9].", n_sources=2)
'Cats purr [1]; dogs bark [2]. Fish swim.'
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .config import AskConfig
from .errors import RagError
from .index import Hit

INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. After each statement, cite "
    "the source it comes from by its number in square brackets, like [1] or [2][3]. If the "
    "sources do not contain the answer, say that you do not know.")

_CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")
# A citation with the spaces before it (the lookbehind starts the match at the run's start:
# linear, however long a run of spaces).
_SPACED_CITATION = re.compile(r"(?<![ \t])([ \t]*)\[(\d+(?:\s*[,;]\s*\d+)*)\]")


def sources_block(hits: Sequence[Hit]) -> str:
    """The numbered passages, as they appear in the prompt."""
    return "\n\n".join(f"[{n}] {h.label()}\n{h.text.strip()}" for n, h in enumerate(hits, start=1))


def build_messages(question: str, hits: Sequence[Hit]) -> list[dict]:
    """The chat messages of a retrieval-augmented question: instructions, sources, question."""
    return [{"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": f"Sources:\n\n{sources_block(hits)}\n\nQuestion: {question.strip()}"}]


def parse_citations(answer: str, n_sources: int) -> tuple[list[int], list[int]]:
    """(valid, invalid) source numbers cited in ``answer``, each once, in order of first use.

    Citations are ``[n]`` or ``[n, m]``; valid numbers are 1..n_sources.
    """
    valid, invalid = [], []
    for group in _CITATION.findall(answer):
        for number in map(int, re.split(r"[,;]", group)):
            bucket = valid if 1 <= number <= n_sources else invalid
            if number not in bucket:
                bucket.append(number)
    return valid, invalid


def drop_invalid_citations(answer: str, n_sources: int) -> str:
    """``answer`` with every cited number that names no source removed: ``[2, 7]`` -> ``[2]``
    and a lone ``[9]`` (with the space before it) -> nothing, when there are 2 sources."""

    def keep(match: re.Match) -> str:
        numbers = [n for n in re.split(r"\s*[,;]\s*", match.group(2)) if 1 <= int(n) <= n_sources]
        return f"{match.group(1)}[{', '.join(numbers)}]" if numbers else ""

    return _SPACED_CITATION.sub(keep, answer)


@dataclass
class Answer:
    """A question, the passages retrieved for it and, when a model was given, its answer."""

    question: str
    sources: list[Hit]  # in prompt order: source n is sources[n - 1]
    text: str | None = None  # None: retrieval only, no model
    citations: list[int] = field(default_factory=list)  # valid source numbers cited
    invalid_citations: list[int] = field(default_factory=list)  # cited numbers that name no source
    prompt: str | None = None
    finish_reason: str | None = None  # "stop": the model ended its turn; "length": max_new_tokens ran out
    token_ids: list[int] = field(default_factory=list, repr=False)  # the answer's tokens

    def cited(self) -> list[Hit]:
        """The sources the answer cites, in order of first citation."""
        return [self.sources[n - 1] for n in self.citations]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "citations": self.citations,
                "invalid_citations": self.invalid_citations, "finish_reason": self.finish_reason,
                "sources": [{"n": n, **h.to_dict()} for n, h in enumerate(self.sources, start=1)]}

    def format(self) -> str:
        """The answer and the numbered list of sources (cited ones marked with *)."""
        lines = [self.text.strip() or "(the model wrote nothing)", ""] if self.text is not None else []
        lines.append("Sources:")
        for n, h in enumerate(self.sources, start=1):
            mark = "*" if n in self.citations else " "
            lines.append(f"{mark}[{n}] {h.label()}  (score {h.score:.3f})")
        if self.finish_reason == "length":
            lines.append("(the answer was cut at max_new_tokens)")
        if self.invalid_citations:
            lines.append(f"(the model also cited {', '.join(f'[{n}]' for n in self.invalid_citations)}, "
                         "which name no source: removed from the answer)")
        return "\n".join(lines)


def fit_prompt(question: str, hits: Sequence[Hit], tokenizer, budget: int,
               template: str | None = None) -> tuple[str, list[Hit]]:
    """(prompt, hits it holds) with at most ``budget`` tokens.

    Passages are cut to the longest common length that fits (binary search on characters);
    if that would leave them shorter than ~200 characters, the lowest-ranked passage is
    dropped instead and the search repeated.
    """
    from ..chat import render_chat

    def render(kept: Sequence[Hit]) -> str:
        return render_chat(build_messages(question, kept), template, tokenizer)

    def size(kept: Sequence[Hit]) -> int:
        return len(tokenizer.encode(render(kept)))

    hits = list(hits)
    while hits:
        if size(hits) <= budget:
            return render(hits), hits
        # The largest cap (characters per passage) that fits, by binary search; -1: none does.
        low, high = -1, max(len(h.text) for h in hits)
        while low < high:
            cap = (low + high + 1) // 2
            if size(_capped(hits, cap)) <= budget:
                low = cap
            else:
                high = cap - 1
        if low >= 200 or (len(hits) == 1 and low > 0):
            kept = _capped(hits, low)
            return render(kept), kept
        hits = hits[:-1]  # too many passages to keep each readable: drop the lowest-ranked
    raise RagError(f"the model's context leaves {budget} tokens for the prompt: too few for the "
                   "question and one source; use a model with a longer context or lower --max-new-tokens")


def _capped(hits: Sequence[Hit], cap: int) -> list[Hit]:
    return [h if len(h.text) <= cap else replace(h, text=h.text[:cap].rstrip() + " …", end=h.start + cap)
            for h in hits]


def answer(question: str, hits: Sequence[Hit], model, tokenizer, *, max_new_tokens: int = 256,
           template: str | None = None, **generate_options) -> Answer:
    """Generate an answer to ``question`` from the retrieved ``hits`` with a scratchlm model.

    ``generate_options`` are ``generate.generate``'s (temperature, top_p, stop, ...); the
    ones not given take ``rag ask``'s defaults (rag/config.py: AskConfig), which keep a
    small model out of repetition loops. The answer ends at the template's end of turn;
    citation numbers that name no passage are removed from its text (and listed in
    ``invalid_citations``)."""
    return answer_batch([(question, hits)], model, tokenizer, max_new_tokens=max_new_tokens, template=template,
                        **generate_options)[0]


def answer_batch(questions: Sequence[tuple[str, Sequence[Hit]]], model, tokenizer, *, max_new_tokens: int = 256,
                 template: str | None = None, **generate_options) -> list[Answer]:
    """``answer`` for several (question, hits) pairs at once: one batched decode loop (the
    rows are left-padded; each stops on its own), so a batch costs little more than its
    longest answer."""
    from ..chat import chat_stops, resolve_template
    from ..generate import generate

    if tokenizer is None:
        raise RagError("the model has no tokenizer, so it cannot read a prompt")
    template = resolve_template(template, tokenizer)
    budget = model.config.context_length - max_new_tokens
    if budget < 16:
        raise RagError(f"max_new_tokens={max_new_tokens} leaves no room for sources in the model's "
                       f"context of {model.config.context_length} tokens")
    fitted = [fit_prompt(question, hits, tokenizer, budget, template) for question, hits in questions]
    stop_strings, stop_ids = chat_stops(template, tokenizer)
    stop = list(stop_strings) + list(generate_options.pop("stop", None) or [])
    defaults = {k: v for k, v in AskConfig().generate_options().items() if k != "max_new_tokens"}
    completions = generate(model, tokenizer, [prompt for prompt, _ in fitted], max_new_tokens=max_new_tokens,
                           stop=stop, stop_token_ids=stop_ids, **{**defaults, **generate_options})
    answers = []
    for (question, _), (prompt, kept), completion in zip(questions, fitted, completions, strict=True):
        valid, invalid = parse_citations(completion.text, len(kept))
        text = drop_invalid_citations(completion.text, len(kept)) if invalid else completion.text
        answers.append(Answer(question, kept, text, valid, invalid, prompt, completion.finish_reason,
                              completion.token_ids))
    return answers


def ask(question: str, index=None, model=None, tokenizer=None, *, k: int = 4, mode: str = "dense",
        max_new_tokens: int = 256, template: str | None = None, **generate_options) -> Answer:
    """Retrieve the ``k`` best chunks from ``index`` and, given a ``model``, answer from them.

    index: a Retriever, a RagIndex, an index directory, or None for the built-in Python
        reference index (built on first use).
    model: a Transformer (pass its ``tokenizer`` too) or anything ``load.load_any`` takes
        (a scratchlm model directory, a Hugging Face directory or id, a preset);
        None: retrieval only (``Answer.text`` is None).
    mode: "dense" (default), "keyword" (BM25) or "hybrid" (both, fused by RRF).
    """
    from .retrieve import Retriever, open_retriever

    if isinstance(index, Retriever):
        retriever = index
    elif index is None or isinstance(index, (str, os.PathLike)):
        retriever = open_retriever(index)
    else:
        retriever = Retriever(index)
    hits = retriever.search(question, k=k, mode=mode)
    if model is None:
        return Answer(question, hits)
    if isinstance(model, (str, os.PathLike)):
        from ..load import load_any

        model, tokenizer = load_any(model)
    return answer(question, hits, model, tokenizer, max_new_tokens=max_new_tokens, template=template,
                  **generate_options)


__all__ = ["ask", "answer", "answer_batch", "Answer", "build_messages", "sources_block", "parse_citations", "fit_prompt",
           "drop_invalid_citations",
           "INSTRUCTIONS"]
