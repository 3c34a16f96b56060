"""Preference pairs: a prompt, a chosen and a rejected response -> token ids with masks -> batches.

    file (JSONL: {prompt, chosen, rejected})             load_pairs
      -> pairs, checked row by row (DataError names the file and the row)
      -> two conversations, prompt + chosen and prompt + rejected, in a prompt format
         (../chat.py); only the final response (and its end-of-turn marker) is trainable
      -> ids + trainable flags                              tokenize_pair
      -> one batch of 2B rows: the B chosen, then the B rejected   collate_pairs
         inputs x = ids[:-1], targets y = ids[1:], y = -100 on the prompt and padding

A row is plain text or chat messages:

    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": "Seven."}

A text prompt is the user's message; with the ``raw`` template it is used as is (prompt,
then response, then the end-of-text token), which is how TRL reads non-chat pairs.

Why both responses go in one batch: the model runs once over 2B rows instead of twice
over B, and the chosen and rejected rows of pair i are rows i and B + i.

>>> from scratchlm.tokenizer import CharTokenizer
>>> tok = CharTokenizer.train("abcxyz", special_tokens=["<|endoftext|>"])   # a..z: 0..5, end: 6
>>> pair = tokenize_pair({"prompt": "ab", "chosen": "x", "rejected": "yz"}, tok, "raw")
>>> pair.chosen.ids, pair.chosen.trainable       # prompt "ab" (not trained), then "x" and the end token
([0, 1, 3, 6], [False, False, True, True])
>>> x, y = collate_pairs([pair], pad_id=6)
>>> y.tolist()                                    # row 0: chosen, row 1: rejected; -100: not in the loss
[[-100, 3, 6, -100], [-100, 4, 5, 6]]
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import END_OF_TEXT, ROLES, Segment, render_segments
from ..finetune.instruct_data import DataError, Example, collate, fit_rows, jsonl_rows, read_data_text, tokenize_example

RAW = "raw"  # no prompt format: prompt text, response text, end-of-text token


# ----------------------------------------------------------------------------------------
# Reading and checking rows
# ----------------------------------------------------------------------------------------
def load_pairs(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file of preference pairs, checked; rows are numbered by line."""
    path = Path(path)
    pairs = [check_pair(row, path, number) for number, row in jsonl_rows(read_data_text(path, "preference file"), path)]
    if not pairs:
        raise DataError(f"{path} is empty: no preference pairs to train on")
    return pairs


def _messages(value, where: str, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {name!r} must be a string or a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(f"{where}: {name!r} message {i} needs a 'role' and a string 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {name!r} message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response(value, where: str, name: str) -> str:
    """A response as text: a string, one assistant message, or a list holding one."""
    if isinstance(value, str):
        text = value
    else:
        messages = _messages([value] if isinstance(value, dict) else value, where, name)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise DataError(f"{where}: {name!r} must be one assistant message (or a string), "
                            f"got roles {[m['role'] for m in messages]}")
        text = messages[0]["content"]
    if not text:
        raise DataError(f"{where}: {name!r} is empty, so there is nothing to compare")
    return text


def check_pair(row, path, number: int) -> dict:
    """{"prompt": str | messages, "chosen": str, "rejected": str, "row": number}, or DataError
    naming file and row."""
    where = f"{path} row {number}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in ("prompt", "chosen", "rejected"):
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} (rows need prompt, chosen and rejected)")
    prompt = row["prompt"]
    if not isinstance(prompt, str):
        prompt = _messages(prompt, where, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant message; it must end where the "
                            "response begins")
    return {"prompt": prompt, "chosen": _response(row["chosen"], where, "chosen"),
            "rejected": _response(row["rejected"], where, "rejected"), "row": number}


def is_chat(pair: dict) -> bool:
    return isinstance(pair["prompt"], list)


def split_pairs(pairs: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Shuffle with ``seed`` and hold out ``val_fraction`` (at least one pair when > 0)."""
    from ..finetune.instruct_data import split_records

    return split_records(pairs, val_fraction, seed)


# ----------------------------------------------------------------------------------------
# Tokens and masks
# ----------------------------------------------------------------------------------------
@dataclass
class Pair:
    chosen: Example
    rejected: Example


def response_segments(prompt, response: str, template: str) -> list[Segment]:
    """The conversation prompt + response in ``template``, with only the response (and the
    marker that ends it) trainable: earlier assistant turns in the prompt are context."""
    if template == RAW:
        if not isinstance(prompt, str):
            raise DataError("the raw template takes text prompts, not chat messages")
        return [Segment(prompt, False), Segment(response, True), Segment(END_OF_TEXT, True, True)]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    segments = render_segments(messages + [{"role": "assistant", "content": response}], template)
    # The response is the last run of trainable segments (its text, then its end of turn).
    last = max(i for i, s in enumerate(segments) if s.trainable)
    first = last
    while first > 0 and segments[first - 1].trainable:
        first -= 1
    return [Segment(s.text, first <= i <= last, s.special) for i, s in enumerate(segments)]


def tokenize_pair(pair: dict, tokenizer, template: str) -> Pair:
    """Both conversations, tokenized segment by segment: the prompt's tokens are the same
    in both rows, exactly as the prompt alone would be encoded at inference."""
    return Pair(*(tokenize_example(response_segments(pair["prompt"], pair[side], template), tokenizer)
                  for side in ("chosen", "rejected")))


def make_pairs(pairs: list[dict], tokenizer, template: str, max_length: int, source: str = "data"
               ) -> tuple[list[Pair], int]:
    """Tokenize every pair and cut each row to ``max_length`` tokens (context + 1). Returns
    (pairs, number cut). A pair whose prompt alone fills the context has no response left to
    compare and is left out, with a warning (DataError if none is left)."""
    def encode(pair):
        tokens = tokenize_pair(pair, tokenizer, template)
        return [tokens.chosen, tokens.rejected]

    rows, cut = fit_rows(pairs, encode, max_length, source, ("row", "pairs"), "response to compare")
    return [Pair(*r) for r in rows], cut


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (2B, T): rows 0..B-1 the chosen responses, B..2B-1 the rejected,
    right-padded to the longest; targets are -100 except on the responses' tokens."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def pair_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` pairs in ``epoch`` (a function of seed and epoch: resumable)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


__all__ = ["load_pairs", "check_pair", "split_pairs", "is_chat", "Pair", "response_segments", "tokenize_pair",
           "make_pairs", "collate_pairs", "pair_order", "DataError", "RAW"]
