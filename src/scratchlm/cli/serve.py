"""`scratchlm serve`: argument parsing for the OpenAI-compatible server (scratchlm/serve/)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ScratchLMError
from ..serve import DEFAULT_PORT, READ_TIMEOUT_S  # serve/__init__ imports FastAPI only when used
from . import UsageError


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
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SCRATCHLM_API_KEY, which keeps "
                        "the key out of `ps`; else open)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeatable; e.g. the machine's name "
                        "behind a proxy). Always answered: localhost, 127.0.0.1, ::1 and --host. '*' answers "
                        "any Host: use it only with an API key")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S, metavar="SECONDS",
                   help=f"a request's headers, and then its body, must arrive within SECONDS, else the "
                        f"connection is closed (default {READ_TIMEOUT_S:g})")
    p.add_argument("--offline", action="store_true",
                   help="never ask the Hugging Face hub (as HF_HUB_OFFLINE=1): only local models and snapshots")
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
        raise ScratchLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _serve_command(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ScratchLMError(f"serving needs the serve extra ({e.name} is missing): "
                             "pip install 'scratchlm[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    api_key = api_key_from(args.api_key, os.environ)
    from ..serve.security import allowed_hosts, check_api_key

    check_api_key(api_key)  # before the model loads: a mistake here is said at once
    allowed_hosts(args.host, args.allowed_host)
    if not (0 < args.read_timeout < float("inf")):
        raise UsageError(f"--read-timeout must be a positive number of seconds, got {args.read_timeout}")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by scratchlm.hub, and huggingface_hub if imported later
    _check_port_free(args.host, args.port)
    from ..serve import load_for_serving, serve

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
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this "
              "machine can use the model (set --api-key or SCRATCHLM_API_KEY)", file=sys.stderr, flush=True)
    if args.host in ("0.0.0.0", "::", "") and not args.allowed_host:
        print("note: only requests with Host localhost, 127.0.0.1 or ::1 are answered; add "
              "--allowed-host NAME for each name or address clients use", file=sys.stderr, flush=True)
    serve(model, tokenizer, host=args.host, port=args.port, model_name=name, log_level=args.log_level,
          api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
          max_body_bytes=args.max_body_bytes, chat_template=args.chat_template,
          retriever=retriever, rag_k=args.rag_k, rag_mode=args.rag_mode,
          allowed_hosts=args.allowed_host, read_timeout=args.read_timeout)
    return 0


def api_key_from(flag: str | None, environ) -> str | None:
    """--api-key, else $SCRATCHLM_API_KEY, else None. An empty key is refused, never taken as
    "no key": it would look set and protect nothing."""
    if flag is not None:
        if not flag.strip():
            raise UsageError("--api-key is empty: give a real key, or leave it out to serve without one")
        return flag
    key = environ.get("SCRATCHLM_API_KEY")
    if key is not None and not key.strip():
        raise UsageError("SCRATCHLM_API_KEY is set but empty: give a real key, or unset it to serve without one")
    return key
