"""Shared by test_serve.py and test_chat_page.py: a tiny model with a trained tokenizer,
and a real uvicorn server for it on a free 127.0.0.1 port, in a background thread."""

from __future__ import annotations

import socket
import threading
import time

import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.tokenizer.bpe import BPETokenizer

TEXT = """The quick brown fox jumps over the lazy dog. A model reads tokens and writes tokens.
Attention lets every position look back at the positions before it. Hello, world! Serving a
model means answering many clients at once, each with its own prompt and its own reply.
""" * 4


def tiny_model_and_tokenizer(seed: int = 0):
    """A 2-layer GPT with a 300-token byte-level BPE tokenizer, random but decisive.

    Random weights give nearly flat logits, where the argmax could flip between two
    mathematically equal computations (batched or not, masked or not). Scaling the (tied)
    embedding matrix sharpens the logits ~30x, so greedy decoding is stable to compare.
    """
    tokenizer = BPETokenizer.train(TEXT, 300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(seed)
    config = ModelConfig.preset("gpt-tiny", vocab_size=tokenizer.vocab_size, context_length=128)
    model = Transformer(config).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(30)
    return model, tokenizer


class ServerThread:
    """``with ServerThread(app) as base_url:`` runs uvicorn in a thread until the block ends."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))  # the OS picks a free port; no race with other tests
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
