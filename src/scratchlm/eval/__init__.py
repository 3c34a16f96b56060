"""Evaluation: a report card for any model scratchlm opens.

One concept per module:

- ``loglik``: the log-likelihood of a continuation given a context (batched, cached);
- ``bpb``: bits per byte of held-out text in rolling windows;
- ``multiple_choice``: scoring choices by log-likelihood (acc, acc_norm) in the three
  task kinds of nanochat's CORE, and letter choice through a chat template;
- ``tasks``: the JSONL layouts (HellaSwag, ARC, PIQA, MMLU, LAMBADA, GSM8K, ...) and few-shot;
- ``generative``: generated answers checked by a verifier (GSM8K's final number);
- ``humaneval`` + ``sandbox``: code completions run in a locked-down subprocess, pass@k;
- ``harness``: the lm-evaluation-harness model ``scratchlm``;
- ``report``: report.md, report.json and a bar chart;
- ``runner``: a list of task specs -> results (what ``scratchlm eval`` runs).

>>> from scratchlm.eval import load_model
>>> model, tokenizer = load_model("gpt-tiny")
>>> model.training
False
"""

from __future__ import annotations


def load_model(ref, device: str = "cpu", dtype=None):
    """(model, tokenizer) for evaluation: whatever scratchlm's loader opens, in eval mode.

    The one place ``eval/`` opens a model (the loader is moving to ``scratchlm.load``).
    """
    from ..load import load_any

    model, tokenizer = load_any(ref, device=device, dtype=dtype)
    return model.requires_grad_(False).eval(), tokenizer
