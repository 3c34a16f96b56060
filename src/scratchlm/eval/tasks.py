"""Task files: the JSONL layouts we read, turned into one uniform list of items, and few-shot.

Every scored task is a list of ``Item``s of one of the three kinds of nanochat's CORE:

    multiple_choice     one context, several continuations      (HellaSwag, ARC, PIQA, MMLU)
                        "The cat sat on the" + " mat" | " moon" | " idea"
    schema              several contexts, one continuation      (Winograd-style)
                        "The trophy didn't fit: the trophy" | "...: the suitcase" + " was too big"
    language_modeling   one context, one continuation that greedy decoding must reproduce (LAMBADA)

and generative tasks (``gsm8k``: the answer is generated, then checked) are items whose
``continuations`` hold the reference answer.

The layouts, one JSON object per line (detected from the first line's fields):

    {"context": str, "choices": [str, ...], "label": int}            our simple multiple choice
    {"context_options": [str, ...], "continuation": str, "label": int}   schema
    {"context": str, "continuation": str}                            language modelling
    {"ctx_a", "ctx_b", "activity_label", "endings": [4], "label"}    HellaSwag (HF "Rowan/hellaswag")
    {"question", "choices": {"text": [...], "label": ["A", ...]}, "answerKey"}   ARC
    {"goal", "sol1", "sol2", "label"}                                PIQA
    {"question", "choices": [4 str], "answer": int, "subject"?}      MMLU (answered by letter)
    {"text": str}                                                    LAMBADA (last word)
    {"question", "answer": "... #### 42"}                            GSM8K (generative)

Each is rendered as lm-evaluation-harness renders that task (the same ``doc_to_text``,
choices and target delimiter), so the same model and file score the same. A file in our
simple layout is exactly an lm-eval ``multiple_choice`` task with ``doc_to_text:
"{{context}}"``, ``doc_to_choice: "{{choices}}"``, ``doc_to_target: "{{label}}"``.

Few-shot: ``k`` solved examples drawn from the other items of the file (a fixed seed and
the item's row: the same shots whatever ``limit`` is) go before each question, each
rendered as context + delimiter + correct continuation, separated by a blank line.

>>> import json, tempfile
>>> path = tempfile.mkdtemp() + "/colors.jsonl"
>>> rows = [{"context": "Grass is", "choices": ["green", "red"], "label": 0},
...         {"context": "Snow is", "choices": ["black", "white"], "label": 1}]
>>> _ = open(path, "w").write("".join(json.dumps(r) + "\\n" for r in rows))
>>> task = load_task_file(path)
>>> task.name, task.kind, len(task.items), task.items[1].continuations
('colors', 'multiple_choice', 2, ['black', 'white'])
>>> print(task.prompt(task.items[1], num_fewshot=1, seed=0))
Grass is green
<BLANKLINE>
Snow is
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NotFound, ScratchLMError

KINDS = ("multiple_choice", "schema", "language_modeling", "generative")


class TaskError(ScratchLMError):
    """A task file that cannot be read: the message names the file and the line."""


@dataclass
class Item:
    """One question. ``contexts`` has one entry (multiple_choice, language_modeling,
    generative) or one per option (schema); ``continuations`` one per option or one."""

    contexts: list[str]
    continuations: list[str]
    label: int
    row: int  # 1-based line of the file, for messages


@dataclass
class Task:
    name: str
    kind: str
    items: list[Item]
    source: str = ""
    delimiter: str = " "  # between a context and its continuation
    fewshot_delimiter: str = "\n\n"  # between solved examples
    description: str = ""  # a line before everything (MMLU's subject)
    until: list[str] = field(default_factory=list)  # generative: where an answer ends
    letters: bool = False  # choices are answer letters (MMLU)

    def shot(self, item: Item) -> str:
        """A solved example: context + delimiter + the right continuation."""
        context = item.contexts[item.label if len(item.contexts) > 1 else 0]
        answer = item.continuations[item.label if len(item.continuations) > 1 else 0]
        return context + self.delimiter + answer

    def fewshot_prefix(self, item: Item, num_fewshot: int, seed: int) -> str:
        if num_fewshot <= 0:
            return self.description
        others = [x for x in self.items if x.row != item.row]
        if num_fewshot > len(others):
            raise TaskError(f"{self.source}: {num_fewshot}-shot needs {num_fewshot + 1} items, the file has "
                            f"{len(self.items)}")
        shots = random.Random(seed * 1_000_003 + item.row).sample(others, num_fewshot)
        return self.description + "".join(self.shot(s) + self.fewshot_delimiter for s in shots)

    def prompt(self, item: Item, num_fewshot: int = 0, seed: int = 1234, option: int = 0) -> str:
        """The text the model reads before the continuation (of ``option`` for schema items)."""
        return self.fewshot_prefix(item, num_fewshot, seed) + item.contexts[option]


# ----------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a clear error for a bad line or no line."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"task file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TaskError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise TaskError(f"{path}: the file has no items")
    return rows


def load_task_file(path: str | Path, name: str | None = None) -> Task:
    """A local JSONL file in one of the layouts of the module doc -> a Task named after its stem."""
    path = Path(path)
    rows = read_jsonl(path)
    layout = detect_layout(rows[0][1], f"{path} line {rows[0][0]}")
    return build_task(name or path.stem, layout, rows, str(path))


def detect_layout(obj: dict, where: str) -> str:
    keys = set(obj)
    if {"task_id", "prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    for layout, needed in LAYOUTS.items():
        if needed <= keys:
            return layout
    raise TaskError(f"{where}: unknown layout (fields {sorted(keys)}); expected one of: "
                    + "; ".join(f"{k} {sorted(v)}" for k, v in LAYOUTS.items()))


# The fields that identify a layout, most specific first.
LAYOUTS: dict[str, set[str]] = {
    "simple": {"context", "choices", "label"},
    "schema": {"context_options", "continuation", "label"},
    "language_modeling": {"context", "continuation"},
    "hellaswag": {"endings", "label"},
    "arc": {"question", "choices", "answerKey"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "mmlu": {"question", "choices", "answer"},
    "gsm8k": {"question", "answer"},
    "lambada": {"text"},
}


def build_task(name: str, layout: str, rows: list[tuple[int, dict]], source: str) -> Task:
    if layout == "humaneval":
        raise TaskError(f"{source}: a HumanEval-format file: run it as the task 'humaneval:{source}'")
    kind = {"schema": "schema", "language_modeling": "language_modeling", "lambada": "language_modeling",
            "gsm8k": "generative"}.get(layout, "multiple_choice")
    task = Task(name, kind, [], source)
    if layout == "lambada":
        task.delimiter = ""
    if layout == "gsm8k":
        task.until = ["Question:", "</s>", "<|im_end|>", "\n\n"]
    if layout == "mmlu":
        task.letters = True
        subject = rows[0][1].get("subject")
        if subject:
            task.description = ("The following are multiple choice questions (with answers) about "
                                f"{str(subject).replace('_', ' ')}.\n\n")
    for n, obj in rows:
        where = f"{source} line {n}"
        task.items.append(_ITEM_READERS[layout](obj, where, n))
    return task


def _field(obj: dict, key: str, where: str, kind: type | tuple = str):
    if key not in obj:
        raise TaskError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskError(f"{where}: field {key!r} must be {expected}, got {type(value).__name__}")
    return value


def _strings(obj: dict, key: str, where: str, at_least: int = 2) -> list[str]:
    values = _field(obj, key, where, list)
    if len(values) < at_least or not all(isinstance(v, str) for v in values):
        raise TaskError(f"{where}: field {key!r} must be a list of at least {at_least} strings")
    return values


def _label(obj: dict, key: str, where: str, n: int) -> int:
    value = obj.get(key)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # HF HellaSwag stores the label as a string
    if key not in obj:
        raise TaskError(f"{where}: missing field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise TaskError(f"{where}: field {key!r} must be an integer, got {value!r}")
    if not 0 <= value < n:
        raise TaskError(f"{where}: {key} {value} is out of range for {n} choices (0..{n - 1})")
    return value


def _simple(obj, where, n):
    choices = _strings(obj, "choices", where)
    return Item([_field(obj, "context", where)], choices, _label(obj, "label", where, len(choices)), n)


def _schema(obj, where, n):
    contexts = _strings(obj, "context_options", where)
    return Item(contexts, [_field(obj, "continuation", where)], _label(obj, "label", where, len(contexts)), n)


def _language_modeling(obj, where, n):
    continuation = _field(obj, "continuation", where)
    if not continuation:
        raise TaskError(f"{where}: field 'continuation' is empty")
    return Item([_field(obj, "context", where)], [continuation], 0, n)


def _hellaswag_text(text: str) -> str:  # lm-eval's hellaswag preprocess()
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(obj, where, n):
    endings = _strings(obj, "endings", where)
    if "ctx_a" in obj:
        ctx = _field(obj, "ctx_a", where) + " " + _field(obj, "ctx_b", where).capitalize()
    else:
        ctx = _field(obj, "ctx", where)
    label = _field(obj, "activity_label", where) + ": " if "activity_label" in obj else ""
    return Item([_hellaswag_text(label + ctx)], [_hellaswag_text(e) for e in endings],
                _label(obj, "label", where, len(endings)), n)


def _arc(obj, where, n):
    choices = _field(obj, "choices", where, dict)
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
        raise TaskError(f"{where}: field 'choices' must hold equal lists 'text' and 'label'")
    key = _field(obj, "answerKey", where)
    if key not in labels:
        raise TaskError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
    return Item([f"Question: {_field(obj, 'question', where)}\nAnswer:"], [str(t) for t in texts],
                labels.index(key), n)


def _piqa(obj, where, n):
    return Item([f"Question: {_field(obj, 'goal', where)}\nAnswer:"],
                [_field(obj, "sol1", where), _field(obj, "sol2", where)], _label(obj, "label", where, 2), n)


LETTERS = "ABCDEFGHIJ"


def _mmlu(obj, where, n):
    choices = _strings(obj, "choices", where)
    if len(choices) > len(LETTERS):
        raise TaskError(f"{where}: at most {len(LETTERS)} choices")
    answer = obj.get("answer")
    if isinstance(answer, str) and len(answer) == 1 and answer in LETTERS:
        obj = dict(obj, answer=LETTERS.index(answer))
    question = _field(obj, "question", where).strip()
    text = question + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"
    return Item([text], list(LETTERS[:len(choices)]), _label(obj, "answer", where, len(choices)), n)


def _lambada(obj, where, n):
    text = _field(obj, "text", where)
    words = text.split(" ")
    if len(words) < 2 or not words[-1]:
        raise TaskError(f"{where}: field 'text' needs at least two words (the last one is predicted)")
    return Item([" ".join(words[:-1])], [" " + words[-1]], 0, n)


def _gsm8k(obj, where, n):
    answer = _field(obj, "answer", where)
    if "####" not in answer:
        raise TaskError(f"{where}: field 'answer' has no final '#### number'")
    return Item([f"Question: {_field(obj, 'question', where)}\nAnswer:"], [answer], 0, n)


_ITEM_READERS = {"simple": _simple, "schema": _schema, "language_modeling": _language_modeling,
                 "hellaswag": _hellaswag, "arc": _arc, "piqa": _piqa, "mmlu": _mmlu, "lambada": _lambada,
                 "gsm8k": _gsm8k}


# ----------------------------------------------------------------------------------------
# The same tasks from the Hugging Face hub (needs `datasets` and a network)
# ----------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------
# Built in: a multiple-choice task that needs no download
# ----------------------------------------------------------------------------------------
BUILTIN_TASKS = ("python-docs-choice",)


def docstring_choice_task(n_items: int = 200, seed: int = 0) -> Task:
    """``python-docs-choice``: which ending completes a docstring's first line? Four choices.

    Made from the held-out split of the built-in docstring corpus (the documents that
    ``prepare --corpus python-docs`` puts in val, so a model trained on the train split
    has never seen them): the context is the first half of a summary line, the right
    choice its second half, the three wrong ones the second halves of other summaries.
    In-domain and offline: ``make demo``'s model takes it (random baseline 0.25).
    """
    from ..corpus import load_corpus
    from ..data import split_documents

    summaries = []
    for doc in split_documents(load_corpus("python-docs"), "val"):
        words = doc.strip().split("\n", 1)[0].split()
        if 6 <= len(words) <= 24:
            summaries.append(words)
    rng = random.Random(seed)
    endings = [" ".join(w[len(w) // 2:]) for w in summaries]
    items = []
    for i, words in enumerate(summaries[:n_items]):
        wrong = rng.sample([e for j, e in enumerate(endings) if j != i and e != endings[i]], 3)
        choices = [endings[i], *wrong]
        rng.shuffle(choices)
        items.append(Item([" ".join(words[:len(words) // 2])], choices, choices.index(endings[i]), i + 1))
    return Task("python-docs-choice", "multiple_choice", items, "python-docs:val")


HUB_TASKS: dict[str, tuple[str, str | None, str, str]] = {
    # name: (dataset, config, split, layout)
    "hellaswag": ("Rowan/hellaswag", None, "validation", "hellaswag"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "arc"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "arc"),
    "piqa": ("baber/piqa", None, "validation", "piqa"),
    "mmlu": ("cais/mmlu", "all", "test", "mmlu"),
    "lambada": ("EleutherAI/lambada_openai", "default", "test", "lambada"),
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k"),
}


def load_hub_task(name: str) -> Task:
    """A built-in task name, loaded through ``datasets`` (needs a network, or its cache)."""
    dataset, config, split, layout = HUB_TASKS[name]
    try:
        import datasets

        rows = datasets.load_dataset(dataset, config, split=split)
    except ImportError:
        raise NotFound(f"task {name!r} loads through the `datasets` package: pip install datasets, "
                       f"or give a local JSONL file") from None
    except Exception as e:  # noqa: BLE001 - offline, missing, refused: all mean "not here"
        raise NotFound(f"task {name!r}: could not load {dataset} ({type(e).__name__}); offline, give a "
                       f"local JSONL file in the {layout} layout instead") from None
    return build_task(name, layout, [(i + 1, dict(r)) for i, r in enumerate(rows)], f"{dataset}:{split}")
