"""Prompt formats: how an instruction (or a chat) and its answer are laid out as text.

A pretrained model only continues text. Instruction tuning teaches it one fixed layout,
and at inference the same layout must be used, so a fine-tuned model directory records
its format in ``prompt_format.json`` ({"template": "alpaca" | "llama3" | "chatml"}).

Three formats:

alpaca   (Stanford Alpaca's template; for models that have no chat tokens)::

    Below is an instruction that describes a task. Write a response that appropriately
    completes the request.

    ### Instruction:
    {instruction}

    ### Response:
    {output}<|endoftext|>

llama3   ``<|start_header_id|>user<|end_header_id|>\\n\\n{text}<|eot_id|>`` per message
chatml   ``<|im_start|>user\\n{text}<|im_end|>\\n`` per message

A rendered example is a list of ``Segment(text, trainable, special)``: the parts the model
must learn to write (the answer and the token that ends it) are ``trainable``, everything
the user or the template writes is not. ``special`` parts are template markup (may hold
special tokens); the others are user text (encoded with special tokens off, so data can
never smuggle a control token in).

>>> segments = render_example({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "alpaca")
>>> [s.text for s in segments if s.trainable]
['Hi!', '<|endoftext|>']
>>> format_prompt("chatml", [{"role": "user", "content": "Hi"}])
'<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

# Prompt formats have one home, chat.py; this file adds what training needs (segments).
from ..chat import PROMPT_FORMAT_FILE, alpaca_prompt
from ..chat import read_prompt_format as _read_any_format

TEMPLATES = ("alpaca", "llama3", "chatml")
EOT = "<|endoftext|>"  # the alpaca answer ends with the tokenizer's end-of-text token

# The token that ends an answer, per template (what generation stops on).
END_OF_TURN = {"alpaca": EOT, "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool  # part of the answer: its tokens are loss targets
    special: bool = False  # template markup: special-token strings in it become their ids


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------
def _header(template: str, role: str) -> str:
    if template == "llama3":
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    return f"<|im_start|>{role}\n"


def _chat_segments(messages: list[dict], template: str, add_generation_prompt: bool) -> list[Segment]:
    """Every message as header (markup), content (user text) and end-of-turn (markup);
    content and end-of-turn of assistant messages are trainable."""
    segments = [Segment("<|begin_of_text|>", False, True)] if template == "llama3" else []
    for m in messages:
        is_answer = m["role"] == "assistant"
        segments.append(Segment(_header(template, m["role"]), False, True))
        segments.append(Segment(m["content"], is_answer))
        segments.append(Segment(END_OF_TURN[template], is_answer, True))
        if template == "chatml":
            segments.append(Segment("\n", False, True))
    if add_generation_prompt:
        segments.append(Segment(_header(template, "assistant"), False, True))
    return segments


def as_messages(record: dict) -> list[dict]:
    """An alpaca record as a two-message chat; a chat record as it is."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def render_example(record: dict, template: str) -> list[Segment]:
    """One training example (alpaca record or chat) as segments in ``template``."""
    check_template(template)
    if template == "alpaca":
        if "messages" in record:
            record = _chat_as_alpaca(record["messages"])
        return [Segment(alpaca_prompt(record["instruction"], record.get("input", "")), False),
                Segment(record["output"], True), Segment(EOT, True, True)]
    return _chat_segments(as_messages(record), template, add_generation_prompt=False)


def _chat_as_alpaca(messages: list[dict]) -> dict:
    roles = [m["role"] for m in messages]
    if roles != ["user", "assistant"]:
        raise ValueError(f"the alpaca template holds one instruction and one answer, this chat has "
                         f"turns {roles}: use --template chatml or llama3")
    return {"instruction": messages[0]["content"], "input": "", "output": messages[1]["content"]}


def format_prompt(template: str, prompt: Union[str, dict, list[dict]], input: str = "") -> str:
    """The text to give the model at inference: the instruction (a string, or an alpaca record
    {"instruction", "input"}) or the chat so far (a list of messages), laid out in
    ``template``, ending where the answer begins.

    >>> format_prompt("llama3", "Name a colour.")[:40]
    '<|begin_of_text|><|start_header_id|>user'
    """
    check_template(template)
    if isinstance(prompt, dict):  # an alpaca record: {"instruction", "input"?}
        prompt, input = prompt["instruction"], prompt.get("input", "") or input
    if template == "alpaca":
        if isinstance(prompt, str):
            return alpaca_prompt(prompt, input)
        users = [m for m in prompt if m["role"] == "user"]
        if not users:
            raise ValueError("the chat has no user message")
        return alpaca_prompt(users[-1]["content"], input)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt + (f"\n\n{input}" if input else "")}]
    return "".join(s.text for s in _chat_segments(prompt, template, add_generation_prompt=True))


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose from {', '.join(TEMPLATES)}")


# ----------------------------------------------------------------------------------------
# Which template a model uses, and recording it in a model directory
# ----------------------------------------------------------------------------------------
def detect_template(tokenizer, model_dir: Optional[Union[str, os.PathLike]] = None,
                    records: Optional[list[dict]] = None) -> str:
    """The template to fine-tune with when none is asked for:

    1. the one recorded in ``model_dir/prompt_format.json`` (a model fine-tuned before);
    2. the chat template of the tokenizer: Llama 3 headers -> "llama3", <|im_start|> -> "chatml";
    3. "chatml" for chat data with more than one exchange (alpaca cannot hold it), else "alpaca".
    """
    if model_dir is not None:
        recorded = read_prompt_format(model_dir)
        if recorded:
            return recorded
    specials = set(getattr(tokenizer, "special_tokens", {}) or {})
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    if "<|start_header_id|>" in specials or "<|start_header_id|>" in chat_template:
        return "llama3"
    if "<|im_start|>" in specials or "<|im_start|>" in chat_template:
        return "chatml"
    if records and any("messages" in r and [m["role"] for m in r["messages"]] != ["user", "assistant"]
                       for r in records):
        return "chatml"
    return "alpaca"


def write_prompt_format(directory: Union[str, os.PathLike], template: str) -> None:
    check_template(template)
    record = {"template": template, "end_of_turn": END_OF_TURN[template]}
    (Path(directory) / PROMPT_FORMAT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_prompt_format(directory: Union[str, os.PathLike]) -> Optional[str]:
    """The fine-tuning template recorded in a model directory, or None when it has none."""
    template = _read_any_format(directory)
    if template is not None:
        check_template(template)
    return template
