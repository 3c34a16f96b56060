"""The way back: the worker's events for one request, turned into the OpenAI response.

    worker thread --Mailbox (one wake-up per step)--> asyncio.Queue of the request (Choices)
        --> Reply.complete: one JSON object when every choice has finished
        --> Reply.stream:   server-sent events, ``data: {json}\\n\\n`` ... ``data: [DONE]``

If the client goes away, the response task is cancelled and its sequences are cancelled
with it, so the worker stops spending steps on them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse, StreamingResponse

from .engine import Engine, SamplingParams, Sequence
from .protocol import APIError

if TYPE_CHECKING:
    from fastapi import Request

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class Mailbox:
    """Carries events from the worker thread to the event loop, in bulk.

    Waking the event loop from another thread costs a system call and a loop iteration.
    A decode step of B rows produces B events at once, so they are collected here and
    the loop is woken once to deliver all of them to their requests' queues.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        """Called on the worker thread."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return  # a wake-up is already on its way and will take this item too
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server is stopping, nobody is listening
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class Choices:
    """The Sequences of one request and the queue their events arrive on, as (index, Event)."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sequences: list[Sequence] = []

    def add(self, prompt_ids: list[int], params: SamplingParams) -> None:
        index = len(self.sequences)
        self.sequences.append(Sequence(prompt_ids, params,
                                       lambda event: self.mailbox.post(self.queue, (index, event))))

    async def batches(self):
        """Lists of (index, Event), as they arrive (everything already waiting comes together),
        until every choice has finished; an error event ends them all."""
        open_choices = len(self.sequences)
        while open_choices:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            yield batch
            for _, event in batch:
                if event.error is not None:
                    return
                if event.finish_reason is not None:
                    open_choices -= 1


class Reply:
    """Builds the response objects of one request, streamed or whole."""

    def __init__(self, kind: str, id_prefix: str, model_name: str, prompt_tokens: int,
                 sources: list | None = None):
        self.kind, self.model, self.prompt_tokens = kind, model_name, prompt_tokens
        self.sources = sources  # retrieved passages (an extension field), sent once
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    async def complete(self, choices: Choices, request: Request, engine: Engine, *, chat: bool) -> JSONResponse:
        """Wait for every choice, then answer with one JSON object. A client that hangs up
        meanwhile gets its sequences cancelled (polled: nothing else reads its socket)."""
        n = len(choices.sequences)
        texts, reasons, tokens = [[] for _ in range(n)], [None] * n, [0] * n
        open_choices = n
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while open_choices:
                try:
                    timeout = max(0.0, next_check - loop.time())
                    index, event = await asyncio.wait_for(choices.queue.get(), timeout)
                except asyncio.TimeoutError:
                    pass
                else:
                    if event.error is not None:
                        raise APIError(500, event.error, type="server_error")
                    texts[index].append(event.text)
                    tokens[index] = event.completion_tokens
                    if event.finish_reason is not None:
                        reasons[index] = event.finish_reason
                        open_choices -= 1
                if loop.time() >= next_check:  # events or not, look at the socket now and then
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody is there to read it
                    next_check = loop.time() + DISCONNECT_POLL_S
        finally:
            engine.cancel([s for s in choices.sequences if not s.done.is_set()])
        if chat:
            items = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                      "logprobs": None, "finish_reason": reasons[i]} for i in range(n)]
        else:
            items = [{"index": i, "text": "".join(texts[i]), "logprobs": None, "finish_reason": reasons[i]}
                     for i in range(n)]
        body = self._envelope(self.kind, items)
        body["usage"] = self.usage(sum(tokens))
        if self.sources is not None:
            body["sources"] = self.sources
        return JSONResponse(body)

    async def stream(self, choices: Choices, stream_options, *, chat: bool):
        """The server-sent events of a streamed reply, in OpenAI's order:

        chat:   {"delta": {"role": "assistant", "content": ""}} per choice, then
                {"delta": {"content": "..."}} as text arrives, then {"delta": {}, "finish_reason": ...}
        text:   {"text": "..."} as text arrives, then {"text": "", "finish_reason": ...}
        then, if stream_options.include_usage, one chunk with "choices": [] and the usage;
        then ``data: [DONE]``.
        """
        include_usage = bool(stream_options and stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, *, text: str | None = None, role: bool = False,
                  finish: str | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                item = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                item = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = self._envelope(obj, [item])
            if include_usage:
                body["usage"] = None  # only the last chunk carries usage, as OpenAI streams it
            if role and self.sources is not None:
                body["sources"] = self.sources  # the first chunk says what the answer will cite
            return sse(body)

        if chat:
            for i in range(len(choices.sequences)):
                yield chunk(i, role=True)
        tokens = [0] * len(choices.sequences)
        async for batch in choices.batches():
            out = []  # the events of one batch leave in one write
            for index, event in batch:
                if event.error is not None:
                    out.append(sse(APIError(500, event.error, type="server_error").body()))
                    yield "".join(out)
                    return
                tokens[index] = event.completion_tokens
                if event.text:
                    out.append(chunk(index, text=event.text))
                if event.finish_reason is not None:
                    out.append(chunk(index, finish=event.finish_reason))
            yield "".join(out)
        if include_usage:
            last = self._envelope(obj, [])
            last["usage"] = self.usage(sum(tokens))
            yield sse(last)
        yield "data: [DONE]\n\n"


def event_stream(body, choices: Choices, engine: Engine) -> StreamingResponse:
    """A text/event-stream response whose sequences are cancelled however it ends: finished,
    failed, or the client went away (Starlette then cancels the task iterating ``body``)."""

    async def guarded():
        try:
            async for piece in body:
                yield piece
        finally:
            engine.cancel([s for s in choices.sequences if not s.done.is_set()])

    # no-cache and no proxy buffering: each event should reach the client as it is made.
    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


__all__ = ["Mailbox", "Choices", "Reply", "event_stream", "sse", "DISCONNECT_POLL_S"]
