"""Chat templates: a list of messages -> the one prompt string a chat model was trained on.

A chat model reads a conversation as plain text with markers around each turn; the markers
are special tokens it learned during instruction tuning, and the end-of-turn marker is what
tells generation to stop. Built in:

    "llama3"   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>
               <|start_header_id|>assistant<|end_header_id|>\\n\\n          stop: <|eot_id|>
    "chatml"   <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n    stop: <|im_end|>
    "plain"    User: Hi\\nAssistant:                                       stop: \\nUser:
    "alpaca"   Below is an instruction ... ### Instruction:\\nHi\\n\\n### Response:\\n
                                                                  stop: <|endoftext|>

(the llama3 example is one line, broken here to fit). A tokenizer loaded from a Hugging
Face directory usually carries the model's own Jinja template (``tokenizer.chat_template``,
from tokenizer_config.json); with ``template=None`` that one is used, else a built-in
one chosen from the tokenizer's special tokens, else "plain".

>>> messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
>>> print(render_chat(messages, "plain", None))
System: Be brief.
User: Hi
Assistant:
>>> render_chat(messages[1:], "chatml", None)
'<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
>>> chat_stops("chatml", None)
(['<|im_end|>'], [])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

TEMPLATES = ("llama3", "chatml", "plain", "alpaca")
# A fine-tuned model directory records the format it was tuned with (see finetune/), and
# generate, chat and serve use it: {"template": "alpaca" | "llama3" | "chatml", ...}.
PROMPT_FORMAT_FILE = "prompt_format.json"

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_HEADER_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                            "provides further context. Write a response that appropriately completes the request.")
ROLES = ("system", "user", "assistant", "tool")

# Special tokens that end a turn in the templates we know; a tokenizer that has one of
# these stops generation on it.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "<|endoftext|>", "</s>")


def _check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with a string 'content', got {m!r}")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; expected one of {ROLES}")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt up to and including "### Response:\\n" (what the model continues)."""
    if input:
        return (f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                f"### Input:\n{input}\n\n### Response:\n")
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def read_prompt_format(directory: str | os.PathLike) -> Optional[str]:
    """The template recorded in a (fine-tuned) model directory, or None when it has none."""
    file = Path(directory) / PROMPT_FORMAT_FILE
    if not file.is_file():
        return None
    try:
        template = json.loads(file.read_text()).get("template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{file} is not a valid prompt format file: {e}") from None
    if template not in TEMPLATES:
        raise ValueError(f"{file}: unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    return template


def resolve_template(template: Optional[str], tokenizer, model_dir: str | os.PathLike | None = None) -> str:
    """The template to use: a built-in name or Jinja source.

    None picks the format recorded in ``model_dir`` (a fine-tuned model), else the
    tokenizer's own Jinja template, else a built-in one that matches its special tokens,
    else "plain". A string containing "{%" or "{{" is Jinja source.
    """
    if template is None and model_dir is not None and Path(model_dir).is_dir():
        template = read_prompt_format(model_dir)
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own:
            return own
        specials = getattr(tokenizer, "special_tokens", None) or {}
        if "<|eot_id|>" in specials:
            return "llama3"
        if "<|im_start|>" in specials:
            return "chatml"
        return "plain"
    if template in TEMPLATES or "{%" in template or "{{" in template:
        return template
    raise ValueError(f"unknown chat template {template!r}: choose {', '.join(TEMPLATES)} or give Jinja source")


def render_chat(messages: Sequence[dict], template: Optional[str], tokenizer, add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` (a list of {"role", "content"} dicts).

    With add_generation_prompt the text ends where the assistant's reply begins.
    """
    _check_messages(messages)
    template = resolve_template(template, tokenizer)
    if template == "llama3":
        text = "<|begin_of_text|>"
        for m in messages:
            text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return text
    if template == "chatml":
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if template == "alpaca":  # one instruction, no history: the last user message
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ValueError("the alpaca template needs a user message")
        return alpaca_prompt(users[-1])
    if template == "plain":
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")
    return _render_jinja(template, messages, tokenizer, add_generation_prompt)


def _render_jinja(source: str, messages, tokenizer, add_generation_prompt: bool) -> str:
    """Render a Hugging Face style Jinja chat template in a sandbox."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not parse: {e}") from None
    return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           bos_token=_token_text(tokenizer, "bos"), eos_token=_token_text(tokenizer, "eos"))


def _token_text(tokenizer, which: str) -> str:
    """The text of the BOS / EOS token ("" when unknown)."""
    name = getattr(tokenizer, f"{which}_token", None)
    if isinstance(name, str):
        return name
    token_id = getattr(tokenizer, "bos_id" if which == "bos" else "eot_id", None)
    for text, i in (getattr(tokenizer, "special_tokens", None) or {}).items():
        if i == token_id:
            return text
    return ""


def chat_stops(template: Optional[str], tokenizer) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids) that end the assistant's turn under ``template``."""
    template = resolve_template(template, tokenizer)
    specials = getattr(tokenizer, "special_tokens", None) or {}
    if template == "llama3":
        markers = ["<|eot_id|>"]
    elif template == "chatml":
        markers = ["<|im_end|>"]
    elif template == "alpaca":
        markers = ["<|endoftext|>"]
    elif template == "plain":
        return ["\nUser:", "\nSystem:"], []
    else:  # the tokenizer's own template: whichever end-of-turn markers it has
        markers = [m for m in END_OF_TURN if m in specials]
    ids = [specials[m] for m in markers if m in specials]
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None and eot not in ids:
        ids.append(eot)
    # A marker that is a special token stops by id; one that is not stops as text.
    strings = [m for m in markers if m not in specials]
    return strings, ids
