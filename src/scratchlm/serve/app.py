"""The HTTP side: FastAPI routes speaking the OpenAI API, in front of the model worker.

    GET  /                      the chat page (static/chat.html)
    GET  /health                liveness and load: {"status": "ok", "active": 2, "queued": 0, ...}
    GET  /v1/models             the one model this server serves
    POST /v1/completions        continue a prompt         (stream: text_completion chunks)
    POST /v1/chat/completions   answer a conversation     (stream: chat.completion.chunk chunks)

A request is read (at most ``max_body_bytes``, else 413), validated (protocol.py; else 400),
turned into token ids, and handed to the Engine as one Sequence per choice. Events from
the worker come back through an asyncio.Queue per request (a Mailbox carries each step's
events across threads in one hand-over); a streaming response writes
each as a server-sent event, ``data: {json}\\n\\n``, and ends with ``data: [DONE]\\n\\n``.
If the client goes away, the response task is cancelled and its sequences are cancelled
with it, so the worker stops spending steps on them.

Every error, whatever raised it, leaves as an OpenAI-style JSON body, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ScratchLMError
from ..model import check_token_ids
from .engine import Engine, QueueFull, SamplingParams, Sequence
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body, validation_error

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizer.base import Tokenizer

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class ServerSettings:
    """What `scratchlm serve` was told, in one place (the flags are in cli/serve.py)."""

    def __init__(self, model_name: str, *, api_key: str | None = None, max_batch: int = 16,
                 max_queue: int = 64, max_body_bytes: int = 1_000_000, chat_template: str | None = None,
                 retriever=None, rag_k: int = 4, rag_mode: str = "dense"):
        self.model_name, self.api_key, self.chat_template = model_name, api_key or None, chat_template
        self.max_batch, self.max_queue, self.max_body_bytes = max_batch, max_queue, max_body_bytes
        # Retrieval-augmented chat (scratchlm serve --rag-index DIR): a rag.Retriever, or None.
        self.retriever, self.rag_k, self.rag_mode = retriever, rag_k, rag_mode


def create_app(model: Transformer, tokenizer: Tokenizer | None, settings: ServerSettings) -> FastAPI:
    """A FastAPI app serving ``model``; its worker thread runs while the app is up."""
    if tokenizer is not None:
        from ..chat import resolve_template

        resolve_template(settings.chat_template, tokenizer)  # an unknown name fails now, not per request
    engine = Engine(model, tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue)
    created = int(time.time())
    context = model.config.context_length

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="scratchlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings
    _add_error_handlers(app)

    # ---- request plumbing ----------------------------------------------------------------
    def authorize(request: Request) -> None:
        """With an API key set, every /v1 request carries ``Authorization: Bearer <key>``."""
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the strings differ: no timing hints.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        """The body, refusing more than max_body_bytes (413) before and while reading it."""
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
        return bytes(body)

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{settings.model_name}'", param="model", code="model_not_found")

    def token_budget(prompt_ids: list[int], asked: int | None, param: str, prompt_param: str) -> int:
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

    def sampling(req, max_tokens: int, choice: int, extra_stops=(), stop_ids=()) -> SamplingParams:
        # n choices with one seed must still differ: choice i draws with seed + i.
        seed = None if req.seed is None else req.seed + choice
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                              top_p=None if req.top_p >= 1.0 else req.top_p, top_k=req.top_k or None,
                              min_p=req.min_p, repetition_penalty=req.repetition_penalty, seed=seed,
                              stop=list(req.stop or []) + list(extra_stops), stop_token_ids=list(stop_ids))

    def run(prompts: list[list[int]], params: list[list[SamplingParams]]) -> Choices:
        """Queue one Sequence per (prompt, choice); their events arrive on one queue."""
        wanted = sum(len(per_choice) for per_choice in params)
        if wanted > settings.max_queue:  # could never fit, however long the client retries
            raise APIError(400, f"this request asks for {wanted} sequences (prompts x n); the server "
                                f"queues at most {settings.max_queue}", param="n")
        choices = Choices(app.state.mailbox)
        for ids, per_choice in zip(prompts, params, strict=True):
            for p in per_choice:
                choices.add(ids, p)
        try:
            engine.submit(choices.sequences)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        return choices

    # ---- routes ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("scratchlm").joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "active": engine.active,
                "queued": engine.queued, "max_batch": settings.max_batch, "steps": engine.steps}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(settings.model_name, created, context)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def get_model(name: str) -> dict:
        check_model(name)
        return _model_card(settings.model_name, created, context)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        req = parse_body(CompletionRequest, await read_body(request))
        req.check_supported()
        check_model(req.model)
        prompts = _prompt_ids(req.prompt, tokenizer, model.config.vocab_size)
        params = [[sampling(req, token_budget(ids, req.max_tokens, "max_tokens", "prompt"), c) for c in range(req.n)]
                  for ids in prompts]
        choices = run(prompts, params)
        reply = Reply("text_completion", "cmpl", settings.model_name, sum(len(p) for p in prompts))
        if req.stream:
            return _event_stream(reply.stream(choices, req.stream_options, chat=False), choices, engine)
        return await reply.complete(choices, request, engine, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        req = parse_body(ChatCompletionRequest, await read_body(request))
        req.check_supported()
        check_model(req.model)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", param="messages")
        sources = None
        if settings.retriever is not None:
            text, stop_strings, stop_ids, sources = await _retrieval_prompt(req, settings, tokenizer, context)
        else:
            text, stop_strings, stop_ids = _render_chat(req.messages, settings.chat_template, tokenizer)
        ids = _encode(tokenizer, text, "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = token_budget(ids, req.token_limit, param, "messages")
        choices = run([ids], [[sampling(req, budget, c, stop_strings, stop_ids) for c in range(req.n)]])
        reply = Reply("chat.completion", "chatcmpl", settings.model_name, len(ids), sources=sources)
        if req.stream:
            return _event_stream(reply.stream(choices, req.stream_options, chat=True), choices, engine)
        return await reply.complete(choices, request, engine, chat=True)

    return app


# ---- choices in flight ---------------------------------------------------------------------
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
            return _sse(body)

        if chat:
            for i in range(len(choices.sequences)):
                yield chunk(i, role=True)
        tokens = [0] * len(choices.sequences)
        async for batch in choices.batches():
            out = []  # the events of one batch leave in one write
            for index, event in batch:
                if event.error is not None:
                    out.append(_sse(APIError(500, event.error, type="server_error").body()))
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
            yield _sse(last)
        yield "data: [DONE]\n\n"


def _event_stream(body, choices: Choices, engine: Engine) -> StreamingResponse:
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


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _model_card(name: str, created: int, context: int) -> dict:
    # max_model_len is not OpenAI's, but vLLM's name for it: clients can size their requests.
    return {"id": name, "object": "model", "created": created, "owned_by": "scratchlm", "max_model_len": context}


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes",
                    code="request_too_large")


def _prompt_ids(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
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
            ids = _encode(tokenizer, p, "prompt")
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


def _encode(tokenizer, text: str, param: str) -> list[int]:
    """Text -> ids; text the tokenizer cannot encode (e.g. an unknown character) is a 400."""
    try:
        return list(tokenizer.encode(text))
    except ValueError as e:
        raise APIError(400, f"cannot tokenize the {param}: {str(e).splitlines()[0]}", param=param) from None


async def _retrieval_prompt(req, settings: ServerSettings, tokenizer, context: int):
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


def _render_chat(messages, template: str | None, tokenizer) -> tuple[str, list[str], list[int]]:
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


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as {"error": {...}}: ours, FastAPI's and Starlette's, and bugs."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ScratchLMError)
    async def user_error(request: Request, e: ScratchLMError):  # a request we cannot serve
        error = APIError(400, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        error = validation_error(errors[0]) if errors else APIError(400, "invalid request")
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        error = APIError(e.status_code, str(e.detail), type="invalid_request_error",
                         code="not_found" if e.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        error = APIError(500, f"internal server error ({type(e).__name__})", type="server_error")
        return JSONResponse(error.body(), status_code=500)
