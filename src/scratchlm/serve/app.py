"""The HTTP side: FastAPI routes speaking the OpenAI API, in front of the model worker.

    GET  /                      the chat page (static/chat.html)
    GET  /health                liveness and load: {"status": "ok", "active": 2, "queued": 0, ...}
    GET  /v1/models             the one model this server serves
    POST /v1/completions        continue a prompt         (stream: text_completion chunks)
    POST /v1/chat/completions   answer a conversation     (stream: chat.completion.chunk chunks)

A request passes the door first (security.py: Host, Origin, JSON content type, API key,
body size and read time), is validated (protocol.py; else 400), turned into token ids
(prompts.py), and handed to the Engine (engine.py) as one Sequence per choice; the
worker's events come back as the response (replies.py).

Every error, whatever raised it, leaves as an OpenAI-style JSON body, never a traceback.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ScratchLMError
from . import READ_TIMEOUT_S, security
from .engine import Engine, QueueFull, SamplingParams
from .prompts import chat_prompt_ids, prompt_ids, token_budget
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body, validation_error
from .replies import Choices, Mailbox, Reply, event_stream
from .security import RequestGuard, authorize, check_api_key, read_body

if TYPE_CHECKING:
    from ..model import Transformer
    from ..tokenizer.base import Tokenizer


class ServerSettings:
    """What `scratchlm serve` was told, in one place (the flags are in cli/serve.py)."""

    def __init__(self, model_name: str, *, api_key: str | None = None, max_batch: int = 16,
                 max_queue: int = 64, max_body_bytes: int = 1_000_000, chat_template: str | None = None,
                 retriever=None, rag_k: int = 4, rag_mode: str = "dense", host: str = "127.0.0.1",
                 allowed_hosts: list[str] | tuple[str, ...] = (), read_timeout: float = READ_TIMEOUT_S):
        self.model_name, self.chat_template = model_name, chat_template
        self.api_key = check_api_key(api_key)  # "" is refused, not taken as "no key"
        self.max_batch, self.max_queue, self.max_body_bytes = max_batch, max_queue, max_body_bytes
        # Retrieval-augmented chat (scratchlm serve --rag-index DIR): a rag.Retriever, or None.
        self.retriever, self.rag_k, self.rag_mode = retriever, rag_k, rag_mode
        # The Host names answered (None: any); the bound address is one of them.
        self.host, self.allowed_hosts = host, security.allowed_hosts(host, allowed_hosts)
        if not (read_timeout > 0 and read_timeout < float("inf")):
            raise ScratchLMError(f"the read timeout must be a positive number of seconds, got {read_timeout}")
        self.read_timeout = read_timeout


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
        import asyncio

        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="scratchlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings
    app.add_middleware(RequestGuard, allowed=settings.allowed_hosts)
    _add_error_handlers(app)

    # ---- request plumbing ----------------------------------------------------------------
    def key_required(request: Request) -> None:
        authorize(request.headers, settings.api_key)

    async def body_of(request: Request) -> bytes:
        return await read_body(request, settings.max_body_bytes, settings.read_timeout)

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"The model '{name[:200]}' does not exist; this server serves "
                                f"'{settings.model_name}'", param="model", code="model_not_found")

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

    @app.get("/v1/models", dependencies=[Depends(key_required)])
    async def list_models() -> dict:
        return {"object": "list", "data": [_model_card(settings.model_name, created, context)]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(key_required)])
    async def get_model(name: str) -> dict:
        check_model(name)
        return _model_card(settings.model_name, created, context)

    @app.post("/v1/completions", dependencies=[Depends(key_required)])
    async def completions(request: Request):
        req = parse_body(CompletionRequest, await body_of(request))
        req.check_supported()
        check_model(req.model)
        prompts = prompt_ids(req.prompt, tokenizer, model.config.vocab_size)
        params = [[sampling(req, token_budget(ids, req.max_tokens, context, "max_tokens", "prompt"), c)
                   for c in range(req.n)] for ids in prompts]
        choices = run(prompts, params)
        reply = Reply("text_completion", "cmpl", settings.model_name, sum(len(p) for p in prompts))
        if req.stream:
            return event_stream(reply.stream(choices, req.stream_options, chat=False), choices, engine)
        return await reply.complete(choices, request, engine, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(key_required)])
    async def chat_completions(request: Request):
        req = parse_body(ChatCompletionRequest, await body_of(request))
        req.check_supported()
        check_model(req.model)
        ids, stop_strings, stop_ids, sources = await chat_prompt_ids(req, settings, tokenizer, context)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = token_budget(ids, req.token_limit, context, param, "messages")
        choices = run([ids], [[sampling(req, budget, c, stop_strings, stop_ids) for c in range(req.n)]])
        reply = Reply("chat.completion", "chatcmpl", settings.model_name, len(ids), sources=sources)
        if req.stream:
            return event_stream(reply.stream(choices, req.stream_options, chat=True), choices, engine)
        return await reply.complete(choices, request, engine, chat=True)

    return app


def _model_card(name: str, created: int, context: int) -> dict:
    # max_model_len is not OpenAI's, but vLLM's name for it: clients can size their requests.
    return {"id": name, "object": "model", "created": created, "owned_by": "scratchlm", "max_model_len": context}


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as {"error": {...}}: ours, FastAPI's and Starlette's, and bugs."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {429: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"},
                   408: {"Connection": "close"}}.get(e.status)  # 408: the rest of the body is not awaited
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
