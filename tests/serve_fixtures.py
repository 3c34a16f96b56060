"""Shared by test_serve.py and test_chat_page.py: a tiny model with a trained tokenizer,
and a real uvicorn server on a free 127.0.0.1 port in a background thread
(scratchlm.serve.run_in_background)."""

from __future__ import annotations

import copy
import functools
import time

import torch

from scratchlm import ModelConfig, Transformer
from scratchlm.serve import run_in_background
from scratchlm.tokenizer.bpe import BPETokenizer

TEXT = """The quick brown fox jumps over the lazy dog. A model reads tokens and writes tokens.
Attention lets every position look back at the positions before it. Hello, world! Serving a
model means answering many clients at once, each with its own prompt and its own reply.
""" * 4


@functools.cache
def tiny_model_and_tokenizer():
    """A 2-layer GPT with a 300-token byte-level BPE tokenizer, trained for a few seconds on
    TEXT so that different prompts get different, text-like greedy continuations.

    Built once per test process (both test files share it). Trained, its logits are
    decisive: the best token leads the next by far more than the float rounding that
    separates two equal computations (batched or alone, masked or not), so greedy outputs
    compare exactly.
    """
    tokenizer = BPETokenizer.train(TEXT, 300, special_tokens=["<|endoftext|>"])
    ids = torch.tensor(tokenizer.encode(TEXT))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    config = ModelConfig.preset("gpt-tiny", vocab_size=tokenizer.vocab_size, context_length=128)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
        x = torch.stack([ids[s:s + 64] for s in starts])
        y = torch.stack([ids[s + 1:s + 65] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False), tokenizer


def slowed_down(model, seconds: float):
    """A copy of ``model`` whose every forward pass takes at least ``seconds`` longer, so a
    test can act while a generation is still running."""
    slow = copy.deepcopy(model)
    slow.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return slow


ServerThread = run_in_background  # ``with ServerThread(app) as base_url:``
