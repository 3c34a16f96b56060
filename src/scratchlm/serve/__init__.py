"""An OpenAI-compatible HTTP server for a scratchlm model, and a chat page for the browser.

    scratchlm serve runs/my-model --port 8000          # then: http://127.0.0.1:8000/

One concept per file, in the order a request meets them:

    security.py   the door: Host / Origin check, JSON content type, API key, body size and
                  read timeouts (defaults: docs/serving.md, "Security defaults")
    protocol.py   the OpenAI request bodies (pydantic) and the JSON error shape
    prompts.py    a request's prompt as token ids (text, ids, chat template, retrieval)
    app.py        FastAPI routes: /v1/models, /v1/completions, /v1/chat/completions, /health, /
    engine.py     the one worker thread that runs the model, batching requests step by step
    batch.py      the running batch's shared KV cache
    replies.py    the worker's events back as OpenAI responses, whole or streamed

From Python, ``create_app`` gives an ASGI app to run with any server; ``serve`` runs it
with uvicorn until interrupted, ``run_in_background`` in a thread while a ``with`` block
runs. FastAPI and uvicorn (the ``serve`` extra) are imported only when used, so
``scratchlm --help`` works without them. The ``serve`` command's options are parsed in
scratchlm/cli/serve.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..model import Transformer
    from ..tokenizer.base import Tokenizer

DEFAULT_PORT = 8000  # `scratchlm serve --port`'s default
READ_TIMEOUT_S = 20.0  # `scratchlm serve --read-timeout`'s default: headers, then body (security.py)


def create_app(model: Transformer, tokenizer: Tokenizer | None, model_name: str = "scratchlm",
               **settings) -> FastAPI:
    """The FastAPI app for ``model``. settings: api_key, max_batch, max_queue,
    max_body_bytes, chat_template, host (the bound address: a Host it answers to),
    allowed_hosts, read_timeout (see ``scratchlm serve --help``)."""
    from .app import ServerSettings
    from .app import create_app as _create_app

    return _create_app(model, tokenizer, ServerSettings(model_name, **settings))


def serve(model: Transformer, tokenizer: Tokenizer | None, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          model_name: str = "scratchlm", log_level: str = "info", **settings) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    from .security import uvicorn_config

    app = create_app(model, tokenizer, model_name, host=host, **settings)
    # One process, one event loop: the model lives in this process's worker thread.
    config = uvicorn_config(app, read_timeout=app.state.settings.read_timeout, host=host, port=port,
                            log_level=log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn shut down gracefully and re-raised the signal
        pass


class run_in_background:
    """Serve ``app`` from a thread of this process, for notebooks, tests and examples::

        with run_in_background(create_app(model, tokenizer, "tiny")) as url:
            ...  # e.g. OpenAI(base_url=url + "/v1", api_key="unused")

    port 0 lets the operating system pick a free port (the socket is bound before the
    server starts, so no other program can take it in between).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket
        import threading

        import uvicorn

        from .security import uvicorn_config

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        settings = getattr(getattr(app, "state", None), "settings", None)
        timeout = getattr(settings, "read_timeout", READ_TIMEOUT_S)
        self.server = uvicorn.Server(uvicorn_config(app, read_timeout=timeout, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def load_for_serving(model_ref: str) -> tuple[Transformer, Tokenizer | None]:
    """(model, tokenizer) from a model directory, a Hugging Face directory, a preset or a hub id."""
    from ..load import load_any

    model, tokenizer = load_any(model_ref)
    return model.eval(), tokenizer


__all__ = ["create_app", "serve", "run_in_background", "load_for_serving", "DEFAULT_PORT", "READ_TIMEOUT_S"]
