"""A request's prompt as token ids: completions prompts (text or ids), chat messages in the
chat template, or a retrieval-augmented prompt; and how many tokens the reply may have.

Every problem with a prompt is an APIError(400) naming the field: text the tokenizer
cannot encode, ids outside the vocabulary, a chat template that fails or renders
nothing, a prompt longer than the context.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..errors import ScratchLMError
from ..model import check_token_ids
from .protocol import APIError

if TYPE_CHECKING:
    from .app import ServerSettings


def token_budget(prompt_ids: list[int], asked: int | None, context: int, param: str, prompt_param: str) -> int:
    """max_tokens for one prompt: as asked if it fits the context (else a 400), or by
    default all the room the context leaves."""
    if len(prompt_ids) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the "
                            f"prompt has {len(prompt_ids)} tokens", param=prompt_param,
                       code="context_length_exceeded")
    if asked is None:
        return context - len(prompt_ids)
    if len(prompt_ids) + asked > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens; you asked "
                            f"for {len(prompt_ids) + asked} ({len(prompt_ids)} in the prompt, {asked} "
                            f"for the completion): lower {param} or shorten the prompt",
                       param=param, code="context_length_exceeded")
    return asked


def prompt_ids(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """The completions ``prompt`` field (text, texts, ids, or lists of ids) as id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]  # one prompt given as token ids
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    rows = []
    for p in prompt:
        if isinstance(p, str):
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            ids = encode(tokenizer, p, "prompt")
        else:
            ids = list(p)
            try:
                check_token_ids(ids, vocab_size)  # forward does not check: ids are checked here
            except ScratchLMError as e:
                raise APIError(400, str(e), param="prompt") from None
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        rows.append(ids)
    return rows


def encode(tokenizer, text: str, param: str) -> list[int]:
    """Text -> ids; text the tokenizer cannot encode (e.g. an unknown character) is a 400."""
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:
        raise APIError(400, f"cannot tokenize the {param}: {str(e).splitlines()[0]}", param=param) from None


async def chat_prompt_ids(req, settings: ServerSettings, tokenizer, context: int):
    """A chat request's prompt: (ids, stop strings, stop ids, sources or None). The messages
    in the chat template, or with --rag-index the retrieval prompt for the last question."""
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat", param="messages")
    sources = None
    if settings.retriever is not None:
        text, stop_strings, stop_ids, sources = await retrieval_prompt(req, settings, tokenizer, context)
    else:
        text, stop_strings, stop_ids = render_chat_prompt(req.messages, settings.chat_template, tokenizer)
    ids = encode(tokenizer, text, "messages")
    if not ids:  # a custom template may render nothing at all for these messages
        raise APIError(400, "the chat template rendered these messages as an empty prompt", param="messages")
    return ids, stop_strings, stop_ids, sources


async def retrieval_prompt(req, settings: ServerSettings, tokenizer, context: int):
    """Retrieval-augmented chat: the last user message is the question; the prompt holds the
    numbered passages retrieved for it (rag.pipeline's format), cut to leave room for the answer.
    Earlier turns are not sent to the model: each question is answered from its sources.
    Returns (prompt text, stop strings, stop ids, sources as JSON)."""
    from ..chat import chat_stops, resolve_template
    from ..rag.pipeline import fit_prompt

    questions = [m.text() for m in req.messages if m.role == "user"]
    if not questions or not questions[-1].strip():
        raise APIError(400, "retrieval needs a non-empty user message to search for", param="messages")
    question = questions[-1]
    try:
        hits = await asyncio.to_thread(settings.retriever.search, question, settings.rag_k, settings.rag_mode)
        template = resolve_template(settings.chat_template, tokenizer)
        answer_room = req.token_limit or min(256, context // 2)
        text, kept = await asyncio.to_thread(fit_prompt, question, hits, tokenizer, context - answer_room, template)
        stop_strings, stop_ids = chat_stops(template, tokenizer)
    except ValueError as e:
        raise APIError(400, str(e).splitlines()[0], param="messages") from None
    sources = [{"n": n, **h.to_dict()} for n, h in enumerate(kept, start=1)]
    return text, list(stop_strings), list(stop_ids), sources


def render_chat_prompt(messages, template: str | None, tokenizer) -> tuple[str, list[str], list[int]]:
    """The conversation as prompt text in the chat template, and what ends the assistant's
    turn in that template: (text, stop strings, stop token ids)."""
    from ..chat import chat_stops, render_chat

    # "developer" is the newer OpenAI name of the system role.
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        text = render_chat(plain, template, tokenizer)
        stop_strings, stop_ids = chat_stops(template, tokenizer)
    except ValueError as e:
        raise APIError(400, str(e).splitlines()[0], param="messages") from None
    return text, list(stop_strings), list(stop_ids)


__all__ = ["prompt_ids", "encode", "chat_prompt_ids", "retrieval_prompt", "render_chat_prompt", "token_budget"]
