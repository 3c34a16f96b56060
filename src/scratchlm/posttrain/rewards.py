"""Verifiable tasks for reinforcement learning: problems whose answers a rule can check.

A task hands out problems (a question and its gold answer) for training and a fixed
held-out set for evaluation; reward functions score a completion. Reward functions take
TRL's signature, so one written for TRL's GRPOTrainer works here unchanged:

    reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float]

Built in:

- ``arithmetic``: word problems generated on the fly ("Ada has 3 pears and buys 4 more..."),
  a held-out split by a hash of the question text (a question is in exactly one split);
- ``gsm8k``: a local GSM8K JSONL file ({"question", "answer": "... #### 42"}), the held-out
  split from ``--val-data`` or a share of the file;
- ``correct_reward``: 1 when the completion's final number (eval/generative.py's GSM8K rule:
  after ``####`` if there is one, else the last number) equals the gold answer;
- ``format_reward``: 1 when the completion ends with ``#### <number>``, the place the answer
  is expected. A lenient correctness check plus a small format reward teaches the format
  without letting the model farm the format alone;
- a user's function, by path: ``my_rewards.py:length_penalty``.

>>> task = ArithmeticTask(max_operand=9, ops="+", seed=0)
>>> p = task.heldout(1)[0]
>>> p.question.endswith("?"), p.answer == str(sum(int(n) for n in p.question.split() if n.isdigit()))
(True, True)
>>> correct_reward(["q"], ["3 + 4 = 7. #### 7", "It is 8"], answer=["7", "7"])
[1.0, 0.0]
>>> format_reward(["q", "q"], ["so #### 7", "7"])
[1.0, 0.0]
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError, NotFound
from ..eval.generative import final_number

RewardFn = Callable[..., list]


@dataclass(frozen=True)
class Problem:
    question: str  # the user's message (rendered through a prompt format, or raw)
    answer: str  # the gold final number, normalised as final_number does


# ----------------------------------------------------------------------------------------
# Reward functions (TRL's signature)
# ----------------------------------------------------------------------------------------
def correct_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **kwargs) -> list[float]:
    """1.0 where the completion's final number equals the gold answer, else 0.0."""
    return [float(final_number(c) is not None and final_number(c) == final_number(a))
            for c, a in zip(completions, answer, strict=True)]


_FORMAT = re.compile(r"####\s*-?\d[\d,]*(?:\.\d+)?\s*$")


def format_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """1.0 where the completion ends with ``#### <number>`` (the answer where it is expected)."""
    return [float(_FORMAT.search(c) is not None) for c in completions]


def load_reward_function(spec: str) -> RewardFn:
    """``path/to/file.py:function`` -> the function (TRL's reward signature)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ConfigError(f"--reward {spec!r}: expected FILE.py:FUNCTION")
    if not Path(path).is_file():
        raise NotFound(f"--reward: file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"scratchlm_user_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # the user's own code, run as they asked
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward: {path} has no function {name!r}")
    return fn


def call_reward(fn: RewardFn, prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """Call one reward function; its answer must be one finite number per completion."""
    name = getattr(fn, "__name__", repr(fn))
    try:
        params = inspect.signature(fn).parameters
        takes_answer = "answer" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # a builtin or a C function: no signature to read
        takes_answer = True
    kwargs = {"answer": answers} if takes_answer else {}  # TRL passes dataset columns as keywords
    values = fn(prompts=prompts, completions=completions, **kwargs)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"reward function {name} must return a list of numbers") from None
    if len(values) != len(completions):
        raise DataError(f"reward function {name} returned {len(values)} rewards for {len(completions)} completions")
    return values


# ----------------------------------------------------------------------------------------
# Tasks: where problems come from
# ----------------------------------------------------------------------------------------
def _held_out(question: str, fraction: float) -> bool:
    """Whether a question is in the held-out split: a hash of its text, so the split holds
    wherever and whenever the question is generated."""
    h = int.from_bytes(hashlib.sha1(question.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


NAMES = ["Ada", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia"]
THINGS = ["apples", "pears", "coins", "books", "shells", "stamps", "marbles", "cards", "eggs", "pens"]
# (operation, template): {n} a name, {t} a thing, {a} and {b} the numbers.
TEMPLATES = {
    "+": ["{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
          "There are {a} {t} in a box and {b} {t} on the table. How many {t} are there in all?"],
    "-": ["{n} has {a} {t} and gives {b} away. How many {t} does {n} have left?",
          "A shop had {a} {t} and sold {b}. How many {t} are left?"],
    "*": ["{n} buys {a} bags with {b} {t} in each. How many {t} does {n} buy?",
          "There are {a} rows of {b} {t}. How many {t} are there?"],
}


class ArithmeticTask:
    """One-step word problems with numbers 0..max_operand and the operations in ``ops``."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 20, ops: str = "+-", seed: int = 0, heldout_fraction: float = 0.1):
        if max_operand < 1:
            raise ConfigError(f"max_operand must be >= 1, got {max_operand}")
        bad = set(ops) - set(TEMPLATES)
        if not ops or bad:
            raise ConfigError(f"arithmetic ops are some of '+-*', got {ops!r}")
        self.max_operand, self.ops, self.seed, self.fraction = max_operand, ops, seed, heldout_fraction

    def _draw(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        if op == "-" and b > a:
            a, b = b, a  # no negative counts
        question = rng.choice(TEMPLATES[op]).format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b)
        return Problem(question, str({"+": a + b, "-": a - b, "*": a * b}[op]))

    def _draw_from(self, rng: random.Random, held_out: bool) -> Problem:
        for _ in range(10_000):
            p = self._draw(rng)
            if _held_out(p.question, self.fraction) == held_out:
                return p
        raise ConfigError("the arithmetic task has too few distinct problems for a held-out split: "
                          "raise max_operand")

    def train(self, n: int, rng: random.Random) -> list[Problem]:
        return [self._draw_from(rng, held_out=False) for _ in range(n)]

    def heldout(self, n: int) -> list[Problem]:
        rng = random.Random(f"heldout-{self.seed}")
        return [self._draw_from(rng, held_out=True) for _ in range(n)]


class GSM8KTask:
    """Problems from a local GSM8K JSONL file: {"question", "answer": "... #### 42"} per line."""

    name = "gsm8k"

    def __init__(self, path: str | os.PathLike, val_path: str | os.PathLike | None = None,
                 val_fraction: float = 0.1, seed: int = 0):
        problems = read_gsm8k(path)
        if val_path is not None:
            self.train_set, self.val_set = problems, read_gsm8k(val_path)
        else:
            self.val_set = [p for p in problems if _held_out(p.question, val_fraction)]
            self.train_set = [p for p in problems if not _held_out(p.question, val_fraction)]
        if not self.train_set:
            raise DataError(f"{path}: no training problems left after the held-out split")

    def train(self, n: int, rng: random.Random) -> list[Problem]:
        return [rng.choice(self.train_set) for _ in range(n)]

    def heldout(self, n: int) -> list[Problem]:
        return self.val_set[:n]


def read_gsm8k(path: str | os.PathLike) -> list[Problem]:
    """The problems of a GSM8K JSONL file; a bad row is a DataError naming file and row."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"GSM8K file not found: {path}")
    problems = []
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{row}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or \
                    not isinstance(obj.get("answer"), (str, int, float)):
                raise DataError(f"{path}:{row}: expected {{\"question\": str, \"answer\": \"... #### N\"}}")
            gold = final_number(str(obj["answer"]))
            if gold is None:
                raise DataError(f"{path}:{row}: the answer has no final number (GSM8K ends it with '#### N')")
            problems.append(Problem(obj["question"], gold))
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    return problems


__all__ = ["Problem", "ArithmeticTask", "GSM8KTask", "read_gsm8k", "correct_reward", "format_reward",
           "load_reward_function", "call_reward", "RewardFn"]
