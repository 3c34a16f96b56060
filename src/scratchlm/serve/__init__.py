"""An OpenAI-compatible HTTP server for a scratchlm model, and a chat page for the browser.

    scratchlm serve runs/my-model --port 8000          # then: http://127.0.0.1:8000/

Three parts, one file each:

    protocol.py   the OpenAI request bodies (pydantic) and the JSON error shape
    app.py        FastAPI routes: /v1/models, /v1/completions, /v1/chat/completions, /health, /
    engine.py     the one worker thread that runs the model, batching requests step by step

From Python, ``create_app`` gives an ASGI app to run with any server; ``serve`` runs it
with uvicorn until interrupted, ``run_in_background`` in a thread while a ``with`` block runs. FastAPI and uvicorn (the ``serve`` extra) are imported only when used, so
``scratchlm --help`` works without them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_PORT = 8000


def create_app(model, tokenizer, model_name: str = "scratchlm", **settings):
    """The FastAPI app for ``model``. settings: api_key, max_batch, max_queue,
    max_body_bytes, chat_template (see ``scratchlm serve --help``)."""
    from .app import ServerSettings, create_app as _create_app

    return _create_app(model, tokenizer, ServerSettings(model_name, **settings))


def serve(model, tokenizer, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          model_name: str = "scratchlm", log_level: str = "info", **settings) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(model, tokenizer, model_name, **settings)
    # One process, one event loop: the model lives in this process's worker thread.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


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

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
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


def load_for_serving(model_ref: str):
    """(model, tokenizer) from a model directory, a Hugging Face directory, a preset or a hub id."""
    from ..load import load_any

    model, tokenizer = load_any(model_ref)
    return model.eval(), tokenizer


# ---- the command line ------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve MODEL at http://HOST:PORT: the OpenAI API under /v1 (completions, chat "
                    "completions, models; streaming with server-sent events), /health, and a chat "
                    "page at /.")
    p.add_argument("model", metavar="MODEL", help="model directory, Hugging Face directory or preset")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--model-name", help="the model id clients use (default: MODEL's last path part)")
    p.add_argument("--api-key", default=os.environ.get("SCRATCHLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SCRATCHLM_API_KEY, else open)")
    p.add_argument("--chat-template", default=None,
                   help="llama3, chatml, plain, or the tokenizer's own (default: the tokenizer's, else plain)")
    p.add_argument("--max-batch", type=_positive, default=16,
                   help="sequences decoded together (default 16; 1 = one at a time)")
    p.add_argument("--max-queue", type=_positive, default=64,
                   help="sequences allowed to wait; more get HTTP 429 (default 64)")
    p.add_argument("--max-body-bytes", type=_positive, default=1_000_000,
                   help="largest request body; larger get HTTP 413 (default 1000000)")
    p.add_argument("--rag-index", metavar="DIR", default=None,
                   help="answer chat requests from this `scratchlm rag index` directory: the last user "
                        "message is searched, the prompt holds the numbered passages, and the response "
                        "carries them in a `sources` field")
    p.add_argument("--rag-k", type=_positive, default=4, help="passages retrieved per question (default 4)")
    p.add_argument("--rag-mode", default="dense", choices=["dense", "keyword", "hybrid"],
                   help="retrieval: dense embeddings, BM25 keywords, or both fused (default dense)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve_command)


def _check_port_free(host: str, port: int) -> None:
    """Fail with one line now, not with a uvicorn log after the model has loaded."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _serve_command(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"serving needs the serve extra ({e.name} is missing): "
                         "pip install 'scratchlm[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    _check_port_free(args.host, args.port)
    retriever = None
    if args.rag_index:
        from ..rag.retrieve import open_retriever

        retriever = open_retriever(args.rag_index, build_default=False)
    model, tokenizer = load_for_serving(args.model)
    if args.chat_template is None and Path(args.model).is_dir():
        from ..chat import read_prompt_format

        args.chat_template = read_prompt_format(args.model)  # a fine-tuned model's own format
    name = args.model_name or Path(str(args.model).rstrip("/")).name or "scratchlm"
    print(f"serving {name} at http://{args.host}:{args.port}/ (OpenAI API under /v1)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this "
              "machine can use the model (set --api-key or SCRATCHLM_API_KEY)", file=sys.stderr, flush=True)
    serve(model, tokenizer, host=args.host, port=args.port, model_name=name, log_level=args.log_level,
          api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, chat_template=args.chat_template,
          retriever=retriever, rag_k=args.rag_k, rag_mode=args.rag_mode)
    return 0


__all__ = ["create_app", "serve", "run_in_background", "load_for_serving", "add_commands"]
