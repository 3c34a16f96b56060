"""Multiple choice by log-likelihood: the model is not asked to answer, it is asked how likely
each answer is, and the most likely one is its choice.

    context:  "Question: What do plants need to grow?\\nAnswer:"
    choices:  " sunlight"  " plastic"  " silence"          (target delimiter " " + choice)
    score:    log p(" sunlight" | context) = -3.1,  -9.4,  -8.0   -> picks choice 0

``acc``: the choice with the highest total log-likelihood is the label. A longer choice
has more tokens and so a lower total; ``acc_norm`` (lm-evaluation-harness's definition)
divides each total by the choice's length in characters before taking the argmax.

The three kinds of task (nanochat's CORE):

- multiple_choice: one context, several continuations (the choices share the context,
  which is read once through the KV cache);
- schema: several contexts, one continuation: which context makes the shared ending most
  likely (continuations are equal, so acc == acc_norm);
- language_modeling: one continuation that greedy decoding must reproduce token by token.

Chat models answer MMLU/ARC-style questions better by letter: ``letter_choice`` renders the
question with lettered options through the chat template, and compares the logits of the
letters at the position where the answer begins.

>>> import torch
>>> from scratchlm import ModelConfig, Transformer
>>> from scratchlm.tokenizer import CharTokenizer
>>> from scratchlm.eval.tasks import Item, Task
>>> tok = CharTokenizer.train("abcdxyz ", special_tokens=["<|endoftext|>"])
>>> model = Transformer(ModelConfig.preset("gpt-tiny")).eval()
>>> task = Task("toy", "multiple_choice", [Item(["ab"], ["cd", "xyz"], 0, 1)])
>>> result = evaluate_choices(model, tok, task)
>>> sorted(result.metrics), result.metrics["items"]
(['acc', 'acc_norm', 'items'], 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .loglik import ContextTooLong, encode_pair, prefix_token_id, score_continuations
from .tasks import Task, TaskError


@dataclass
class TaskResult:
    """What a task measured: ``metrics`` (acc, acc_norm, items, ...), the random baseline
    of ``acc`` and, per item, whatever explains the score (log-likelihoods, the choice)."""

    name: str
    kind: str
    metrics: dict
    baseline: float = 0.0
    details: list[dict] = field(default_factory=list)

    @property
    def main_metric(self) -> str:
        return next(m for m in ("acc", "pass@1", "exact_match", "bits_per_byte") if m in self.metrics)

    @property
    def centered(self) -> float | None:
        """(score - random baseline) / (1 - baseline): 0 is chance, 1 is perfect (CORE's centering)."""
        if self.main_metric == "bits_per_byte" or self.baseline >= 1:
            return None
        return (self.metrics[self.main_metric] - self.baseline) / (1 - self.baseline)


def build_requests(task: Task, tokenizer, items, num_fewshot: int = 0, seed: int = 1234):
    """The (context ids, continuation ids) of every option of every item, and which item and
    option each one is."""
    prefix = prefix_token_id(tokenizer)
    requests, owners = [], []
    for index, item in enumerate(items):
        n = max(len(item.contexts), len(item.continuations))
        for option in range(n):
            context = task.prompt(item, num_fewshot, seed, option if len(item.contexts) > 1 else 0)
            continuation = item.continuations[option if len(item.continuations) > 1 else 0]
            requests.append(encode_pair(tokenizer, context, task.delimiter + continuation, prefix))
            owners.append((index, option))
    return requests, owners


def evaluate_choices(model, tokenizer, task: Task, *, num_fewshot: int = 0, seed: int = 1234,
                     limit: int | None = None, batch_size: int = 32, progress: bool = False) -> TaskResult:
    """Score a multiple_choice, schema or language_modeling task by log-likelihood."""
    if task.kind not in ("multiple_choice", "schema", "language_modeling"):
        raise TaskError(f"{task.name}: a {task.kind} task is not scored by log-likelihood")
    items = task.items[:limit] if limit else task.items
    requests, owners = build_requests(task, tokenizer, items, num_fewshot, seed)
    try:
        scores = score_continuations(model, requests, batch_size=batch_size, progress=progress)
    except ContextTooLong as e:
        item = items[owners[e.index][0]]
        n = len(requests[e.index][0]) + len(requests[e.index][1])
        raise TaskError(f"{task.source or task.name} line {item.row}: the context and choice are {n} tokens, "
                        f"longer than the model's context of {model.config.context_length}") from None

    per_item: list[list[tuple[float, bool]]] = [[] for _ in items]
    for (index, _), score in zip(owners, scores):
        per_item[index].append(score)
    correct = correct_norm = 0
    details = []
    for item, options in zip(items, per_item):
        lls = [lp for lp, _ in options]
        if task.kind == "language_modeling":
            ok = options[0][1]
            correct += ok
            details.append({"row": item.row, "loglikelihood": lls[0], "greedy": ok})
            continue
        lengths = [float(len(c)) for c in item.continuations] if task.kind == "multiple_choice" else [1.0] * len(lls)
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        correct += pred == item.label
        correct_norm += pred_norm == item.label
        details.append({"row": item.row, "loglikelihoods": lls, "label": item.label,
                        "prediction": pred, "prediction_norm": pred_norm})
    n = len(items)
    metrics = {"acc": correct / n, "items": n}
    if task.kind != "language_modeling":
        metrics["acc_norm"] = correct_norm / n
    baseline = 0.0 if task.kind == "language_modeling" else sum(
        1 / max(len(i.contexts), len(i.continuations)) for i in items) / n
    return TaskResult(task.name, task.kind, metrics, baseline, details)


# ----------------------------------------------------------------------------------------
# Chat models: the answer letter
# ----------------------------------------------------------------------------------------
@torch.inference_mode()
def letter_choice(model, tokenizer, task: Task, *, template: str | None = None, limit: int | None = None,
                  progress: bool = False) -> TaskResult:
    """Score a multiple-choice task on a chat model: the question and lettered options go in a
    user turn; the prediction is the letter whose token has the highest logit where the
    assistant's reply begins."""
    from ..chat import render_chat
    from .tasks import LETTERS

    items = task.items[:limit] if limit else task.items
    if task.kind != "multiple_choice":
        raise TaskError(f"{task.name}: letter choice needs a multiple_choice task, not {task.kind}")
    device = model.tok_emb.weight.device
    correct, details = 0, []
    from tqdm.auto import tqdm

    for item in tqdm(items, desc=task.name, disable=not progress, leave=False):
        n = len(item.continuations)
        question = task.description + item.contexts[0].removesuffix("Answer:").rstrip()
        if not task.letters:  # MMLU's text already lists lettered options; others get them here
            question += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.continuations))
        letters = LETTERS[:n]
        content = f"{question}\n\nAnswer with the letter of the correct option ({', '.join(letters)}) only."
        prompt = render_chat([{"role": "user", "content": content}], template, tokenizer)
        ids = tokenizer.encode(prompt)
        if len(ids) > model.config.context_length:
            raise TaskError(f"{task.source or task.name} line {item.row}: the prompt is {len(ids)} tokens, longer "
                            f"than the model's context of {model.config.context_length}")
        letter_ids = [tokenizer.encode(letter)[0] for letter in letters]
        hidden = model(torch.tensor([ids], device=device), return_hidden=True)[0, -1]
        logits = model.lm_head(hidden).float()[letter_ids]
        pred = int(logits.argmax())
        correct += pred == item.label
        details.append({"row": item.row, "letter_logits": logits.tolist(), "label": item.label, "prediction": pred})
    baseline = sum(1 / len(i.continuations) for i in items) / len(items)
    return TaskResult(task.name, "letter_choice", {"acc": correct / len(items), "items": len(items)},
                      baseline, details)
