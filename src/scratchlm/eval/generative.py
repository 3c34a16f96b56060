"""Generative tasks with a verifier: the model writes its answer, a rule checks it.

GSM8K-style: the reference answer ends with ``#### 42``; the model's answer counts when
the last number it wrote (commas dropped, a trailing ``.0`` ignored) equals that number.
Generation is greedy and stops at the task's stop strings (the next "Question:" or a
blank line), so a few-shot prompt of "Question: ...\\nAnswer: ... #### n" examples teaches
the format.

>>> final_number("She has 3 + 4 = 7 apples. #### 7")
'7'
>>> final_number("The answer is 1,234.00 dollars."), final_number("no digits")
('1234', None)
"""

from __future__ import annotations

import re

from .multiple_choice import TaskResult
from .tasks import Task, TaskError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in ``text``, normalised (no commas, no trailing zeros after a point)."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def evaluate_generative(model, tokenizer, task: Task, *, num_fewshot: int = 0, seed: int = 1234,
                        limit: int | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                        template: str | None = None, progress: bool = False) -> TaskResult:
    """Exact match of the final number, greedy decoding (through ``template`` for a chat model)."""
    from tqdm.auto import tqdm

    from ..generate import generate

    if task.kind != "generative":
        raise TaskError(f"{task.name}: a {task.kind} task is not generative")
    items = task.items[:limit] if limit else task.items
    prompts = []
    for item in items:
        prompt = task.prompt(item, num_fewshot, seed)
        if template:
            from ..chat import render_chat

            content = prompt.removesuffix("Answer:").rstrip() + "\nEnd your answer with '#### <number>'."
            prompt = render_chat([{"role": "user", "content": content}], template, tokenizer)
        prompts.append(prompt)
    correct, details = 0, []
    bar = tqdm(total=len(items), desc=task.name, unit="item", disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        chunk = list(range(start, min(start + batch_size, len(items))))
        results = generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                           stop=None if template else task.until, overflow="truncate")
        for i, result in zip(chunk, results):
            gold, got = final_number(items[i].continuations[0]), final_number(result.text)
            correct += got is not None and got == gold
            details.append({"row": items[i].row, "answer": result.text, "extracted": got, "gold": gold})
        bar.update(len(chunk))
    bar.close()
    return TaskResult(task.name, "generative", {"exact_match": correct / len(items), "items": len(items)},
                      0.0, details)
