"""Instruction data -> token ids with loss masks -> padded (or packed) batches.

    file (alpaca JSON / JSONL, chat JSONL)          load_records
      -> records, checked row by row
      -> segments in the prompt format              chat.render_example
      -> ids + one "trainable" flag per token       tokenize_example
      -> inputs x = ids[:-1], targets y = ids[1:]   (y = -100 where the token is not
                                                     trainable: prompt and padding)
      -> batches padded to their longest row        collate  (or pack rows first: pack)

Why mask: the loss is the mean over target positions. Unmasked, most of it would be spent
on predicting the instruction, which the user always writes; masked, every gradient step
is about writing the answer. ``IGNORE_INDEX`` (-100) is the value F.cross_entropy skips.

>>> ex = Example(ids=[0, 1, 4, 2, 5], trainable=[False, False, False, True, True])
>>> x, y = collate([ex, Example([0, 4, 2], [False, False, True])], pad_id=5)
>>> x.tolist()
[[0, 1, 4, 2], [0, 4, 5, 5]]
>>> y.tolist()    # only the answer's tokens (2 and the end token 5) are targets
[[-100, -100, 2, 5], [-100, 2, -100, -100]]
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat import END_OF_TEXT, ROLES, PromptFormatError, Segment, render_example
from ..corpus import decode_text, read_bytes
from ..errors import ConfigError, DataError, NotFound, ScratchLMError

IGNORE_INDEX = -100  # F.cross_entropy(ignore_index=-100): these targets add nothing to the loss


# ----------------------------------------------------------------------------------------
# Reading and checking records
# ----------------------------------------------------------------------------------------
def read_data_text(path: Path, what: str) -> str:
    """The text of a data file; a missing file, a FIFO, a folder or bytes that are not UTF-8
    stop with one line (``what`` names the file's kind: "data file not found: ...")."""
    if not path.exists():
        raise NotFound(f"{what} not found: {path}")
    return decode_text(read_bytes(path), path)


def jsonl_rows(text: str, path: Path) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of JSONL ``text`` (read from ``path``);
    a line that is not JSON is a DataError naming the file and the row."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} row {number}: not valid JSON ({e.msg})") from None
    return rows


def load_records(path: str | os.PathLike) -> list[dict]:
    """Read alpaca records ({instruction, input?, output}) or chats ({messages: [...]}).

    ``.json``: one JSON array of records. ``.jsonl`` (or anything else): one record per line;
    blank lines are skipped. Rows are numbered from 1 (JSONL: the line number).
    """
    path = Path(path)
    text = read_data_text(path, "data file")
    if not text.strip():
        raise DataError(f"{path} is empty: no examples to train on")
    if text.lstrip().startswith("["):  # a JSON array (alpaca_data.json style)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e}") from None
        rows = list(enumerate(data, start=1))
    else:
        rows = jsonl_rows(text, path)
    if not rows:
        raise DataError(f"{path} is empty: no examples to train on")
    return [check_record(record, path, number) for number, record in rows]


def check_record(record, path, number: int) -> dict:
    """The record if it is a usable alpaca record or chat; else DataError naming file and row."""
    where = f"{path} row {number}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {i} needs a 'role' and a 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {i} content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the chat has no assistant turn, so there is no answer to learn")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for name in ("instruction", "output"):
        if name not in record:
            raise DataError(f"{where}: missing field {name!r} (alpaca rows need instruction, "
                            f"output and optionally input; chat rows need messages)")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} must be a string")
    if not isinstance(record.get("input", ""), str):
        raise DataError(f"{where}: field 'input' must be a string")
    if not record["output"]:
        raise DataError(f"{where}: field 'output' is empty, so there is no answer to learn")
    return {"instruction": record["instruction"], "input": record.get("input", "") or "",
            "output": record["output"]}


def split_records(records: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Shuffle with ``seed`` and hold out ``val_fraction`` of the records (at least one when
    the fraction is > 0 and there are two or more records)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        n_val = max(1, n_val)
    val = [records[i] for i in order[:n_val]]
    train = [records[i] for i in order[n_val:]]
    return train, val


# ----------------------------------------------------------------------------------------
# Tokens and masks
# ----------------------------------------------------------------------------------------
@dataclass
class Example:
    """Token ids and, for each, whether the model should learn to write it."""

    ids: list[int]
    trainable: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    if special:
        return list(tokenizer.encode(text))  # template markup: "<|eot_id|>" -> its id
    try:
        return list(tokenizer.encode(text, allowed_special="none"))  # user text stays text
    except TypeError:  # a tokenizer without the option
        return list(tokenizer.encode(text))


def tokenize_example(segments: Sequence[Segment], tokenizer, train_on_prompt: bool = False) -> Example:
    """Encode each segment on its own (the prompt is encoded exactly as it will be at
    inference) and flag its tokens trainable or not. ``train_on_prompt`` flags all of them.

    The alpaca end token is the tokenizer's own end-of-text token, whatever its name."""
    ids: list[int] = []
    trainable: list[bool] = []
    eot_id = getattr(tokenizer, "eot_id", None)
    for seg in segments:
        if seg.special and seg.text == END_OF_TEXT:
            if eot_id is None:
                raise PromptFormatError("the tokenizer has no end-of-text token, which the alpaca template "
                                 "needs to end an answer")
            piece = [eot_id]
        else:
            piece = _encode(tokenizer, seg.text, seg.special)
        ids.extend(piece)
        trainable.extend([seg.trainable or train_on_prompt] * len(piece))
    return Example(ids, trainable)


def make_examples(records: list[dict], tokenizer, template: str, max_length: int,
                  train_on_prompt: bool = False, source: str = "data") -> tuple[list[Example], int]:
    """Render, tokenize and cut each record to ``max_length`` tokens (context_length + 1:
    inputs and targets are that minus one). Returns (examples, number cut).

    A record whose prompt alone fills ``max_length`` would teach nothing and is left out
    (with a warning); DataError if that leaves no example at all.
    """
    def encode(record):
        return [tokenize_example(render_example(record, template), tokenizer, train_on_prompt)]

    rows, cut = fit_rows(records, encode, max_length, source, ("example", "examples"), "answer to learn")
    return [example for example, in rows], cut


def fit_rows(items: Sequence[dict], encode, max_length: int, source: str, names: tuple[str, str], lacking: str
             ) -> tuple[list[list[Example]], int]:
    """``encode`` each item (a record, a preference pair) into its rows (Examples: one, or a
    pair's two) and cut every row to ``max_length`` tokens. Returns (each kept item's rows,
    number of items cut). An item with a row left without a trainable target (its prompt
    fills the context) is left out, with a warning; DataError if no item is left, or if one
    cannot be encoded. Items are numbered by their "row" in the file when they have one;
    ``names`` (singular, plural) and ``lacking`` word the messages."""
    out, cut, dropped = [], 0, []
    for number, item in enumerate(items, start=1):
        number = item.get("row", number)
        try:
            rows = encode(item)
        except ScratchLMError as e:
            raise DataError(f"{source} {names[0]} {number}: {str(e).splitlines()[0]}") from None
        if max(len(r) for r in rows) > max_length:
            cut += 1
            rows = [Example(r.ids[:max_length], r.trainable[:max_length]) for r in rows]
        if not all(any(r.trainable[1:]) for r in rows):
            dropped.append(number)
            continue
        out.append(rows)
    if dropped:
        message = (f"{source}: {len(dropped)} of {len(items)} {names[1]} (the first: {names[0]} {min(dropped)}) "
                   f"have a prompt that fills the context of {max_length - 1} tokens, leaving no {lacking}")
        if not out:
            raise DataError(message)
        warnings.warn(message + ": left out", stacklevel=3)
    return out, cut


def targets_of(example: Example) -> tuple[list[int], list[int]]:
    """(inputs, targets): targets[t] = ids[t + 1] if that token is trainable, else -100."""
    inputs = example.ids[:-1]
    targets = [i if keep else IGNORE_INDEX for i, keep in zip(example.ids[1:], example.trainable[1:])]
    return inputs, targets


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch to its longest row. Returns inputs (B, T) and targets (B, T);
    padding positions get ``pad_id`` as input and -100 as target."""
    pairs = [targets_of(e) for e in examples]
    T = max(len(x) for x, _ in pairs)
    inputs = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        inputs[row, :len(x)] = torch.tensor(x, dtype=torch.long)
        targets[row, :len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate examples, in order, into rows of at most ``max_length`` tokens.

    Fewer, fuller rows means less compute spent on padding. The masks travel with the
    tokens, so the loss still covers answers only. The price: an example can attend to
    the ones before it in its row (each starts after an end token, which the model learns
    to treat as a boundary, as in pretraining).
    """
    rows: list[Example] = []
    current = Example([], [])
    for e in examples:
        if current.ids and len(current) + len(e) > max_length:
            rows.append(current)
            current = Example([], [])
        current = Example(current.ids + e.ids[:max_length], current.trainable + e.trainable[:max_length])
    if current.ids:
        rows.append(current)
    return rows


def batches(examples: Sequence[Example], batch_size: int, pad_id: int, shuffle: bool = True,
            seed: int = 0, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of padded batches; the order is shuffled by (seed, epoch) so a resumed run
    sees the same order."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)


def count_target_tokens(examples: Sequence[Example]) -> int:
    return sum(sum(e.trainable[1:]) for e in examples)
