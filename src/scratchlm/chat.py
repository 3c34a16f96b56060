"""Prompt formats: a conversation -> the one text layout a chat model was trained on.

A chat model reads a conversation as plain text with markers around each turn. The
markers are (usually) special tokens it learned during instruction tuning; the end-of-turn
marker is what it learns to write after an answer, and what stops generation. ``FORMATS``
is the table of the layouts built in (one ``PromptFormat`` each):

    name    begin              header (user; assistant)                      end of turn
    llama3  <|begin_of_text|>  <|start_header_id|>user<|end_header_id|>\\n\\n   <|eot_id|>
    chatml                     <|im_start|>user\\n                           <|im_end|> \\n
    qwen    chatml, with Qwen 2.5's system message when the conversation has none
    qwen3   chatml; the answers after the last user message open with a think block,
            <think>\\n{reasoning}\\n</think>\\n\\n (empty without reasoning), earlier
            answers lose theirs (Qwen3, QwQ)
    gemma   <bos>              <start_of_turn>user\\n; <start_of_turn>model\\n  <end_of_turn> \\n
            (no system turn: the system message opens the first user message; Gemma 2, 3)
    olmo2   <|endoftext|>      <|user|>\\n; <|assistant|>\\n                 user: \\n; answer: <|endoftext|> \\n
            (Tulu 3's layout, OLMo 2 Instruct: no \\n after the last answer)
    plain                      User: ; Assistant:                            \\n
    alpaca  one instruction and its answer: "Below is an instruction ... ### Response:\\n"
            then the answer and the tokenizer's end-of-text token

One renderer, ``render_segments``, lays a conversation out as ``Segment(text, trainable,
special)`` pieces. Inference joins the texts into the prompt (``render_chat``); training
encodes each piece and takes the loss only on the trainable ones: the assistant's answers
and the end-of-turn marker after each (finetune/instruct_data.py). ``special`` pieces are
template markup, where special-token strings become their ids; the others are user text,
encoded with special tokens off, so data can never smuggle a control token in.

>>> messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
>>> print(render_chat(messages, "plain", None))
System: Be brief.
User: Hi
Assistant:
>>> render_chat(messages[1:], "chatml", None)
'<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
>>> chat = messages[1:] + [{"role": "assistant", "content": "Hello."}]
>>> [s.text for s in render_segments(chat, "chatml") if s.trainable]     # what training learns
['Hello.', '<|im_end|>']
>>> "".join(s.text for s in render_segments(chat, "chatml")) == render_chat(chat, "chatml", None, False)
True
>>> chat_stops("chatml", None)      # no tokenizer with <|im_end|> as a special token: stop as text
(['<|im_end|>'], [])

Which format a model uses (``resolve_template``): the first of

1. the one asked for: a name from ``FORMATS``, or Jinja source (a string with ``{%`` or ``{{``);
2. the one recorded in the model directory's ``prompt_format.json`` (written by fine-tuning);
3. the tokenizer's own Jinja template (``tokenizer.chat_template``, from a Hugging Face
   ``tokenizer_config.json``); skipped for training, which needs a built-in's segments;
4. the built-in format whose marker tokens the tokenizer has as special tokens (or its
   Jinja template writes);
5. "plain"; for training "alpaca", or "chatml" when the data holds multi-turn chats.

>>> class Tokenizer:                # the attributes resolution looks at
...     chat_template, special_tokens = None, {"<|im_start|>": 5, "<|im_end|>": 6}
>>> resolve_template(None, Tokenizer()), resolve_template("llama3", Tokenizer())
('chatml', 'llama3')
>>> Tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
>>> resolve_template(None, Tokenizer()) == Tokenizer.chat_template      # its own Jinja template
True
>>> resolve_template(None, Tokenizer(), training=True)                   # training: a built-in
'chatml'
>>> resolve_template(None, None), resolve_template(None, None, training=True)
('plain', 'alpaca')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ScratchLMError


class PromptFormatError(ScratchLMError):
    """A conversation, format name or prompt_format.json that cannot be used."""


ROLES = ("system", "user", "assistant", "tool")
# A fine-tuned model directory records the format it was tuned with, and generate, chat
# and serve use it: {"template": "chatml", "end_of_turn": "<|im_end|>"}.
PROMPT_FORMAT_FILE = "prompt_format.json"
# Stands for the tokenizer's own end-of-text token, whatever its name (alpaca's answers end
# with it; finetune/instruct_data.py encodes it as ``tokenizer.eot_id``).
END_OF_TEXT = "<|endoftext|>"
# Special tokens that end a turn in the templates we know: a Jinja template's turns are
# taken to end with whichever of these the tokenizer has.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "<|endoftext|>",
                      "</s>")

ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_HEADER_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                            "provides further context. Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class PromptFormat:
    """How one format lays out a conversation: ``begin``, then for every message
    ``header[role] + content + end_of_turn + after_turn``, then at inference
    ``generation_header`` (the text the assistant's reply follows)."""

    name: str
    header: Mapping[str, str]  # text before a message's content, per role
    end_of_turn: str  # after every message; after an answer it is trained: the model learns to stop
    generation_header: str  # opens the assistant's reply at inference
    stops: tuple[str, ...]  # what ends a reply: by id where it is a special token, else as text
    begin: str = ""  # once, before the first message
    after_turn: str = ""  # markup after end_of_turn that is not trained ("\n" in chatml)
    special_tokens: tuple[str, ...] = ()  # the special tokens its markup is written with
    signature: tuple[str, ...] = ()  # tokens that identify it in a tokenizer (resolution step 4)
    system_in_first_user: bool = False  # no system turn: the system text opens the first message
    default_system: str | None = None  # the system message of a conversation that has none
    single_turn: bool = False  # alpaca: one instruction and its answer, laid out by alpaca_prompt
    strip_content: bool = False  # each message's text without surrounding whitespace (Jinja's | trim)
    prompt_end: str | None = None  # what ends a system / user / tool message, if not end_of_turn + after_turn
    after_last_turn: bool = True  # after_turn after the conversation's last message too
    thinking: bool = False  # Qwen3's think blocks (see _answer_segments)


def _headers(pattern: str, **names: str) -> dict[str, str]:
    """{role: header} with ``{role}`` in ``pattern`` replaced by the role's name in this format."""
    return {role: pattern.format(role=names.get(role, role)) for role in ROLES}


_CHATML = dict(header=_headers("<|im_start|>{role}\n"), end_of_turn="<|im_end|>", after_turn="\n",
               generation_header="<|im_start|>assistant\n", stops=("<|im_end|>",),
               special_tokens=("<|im_start|>", "<|im_end|>"))

# Detection (resolution step 4) tries these in order.
FORMATS: dict[str, PromptFormat] = {f.name: f for f in (
    PromptFormat("llama3", begin="<|begin_of_text|>", header=_headers("<|start_header_id|>{role}<|end_header_id|>\n\n"),
                 end_of_turn="<|eot_id|>", generation_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
                 stops=("<|eot_id|>",), signature=("<|start_header_id|>", "<|eot_id|>"),
                 special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                 strip_content=True),
    # Before chatml: a Qwen3 tokenizer has ChatML's tokens and <think>.
    PromptFormat("qwen3", **_CHATML, signature=("<think>",), thinking=True),
    PromptFormat("chatml", **_CHATML, signature=("<|im_start|>",)),
    PromptFormat("qwen", **_CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    PromptFormat("gemma", begin="<bos>", header=_headers("<start_of_turn>{role}\n", assistant="model"),
                 end_of_turn="<end_of_turn>", after_turn="\n", generation_header="<start_of_turn>model\n",
                 stops=("<end_of_turn>",), special_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
                 signature=("<start_of_turn>",), system_in_first_user=True, strip_content=True),
    # Tulu 3's layout (OLMo 2 Instruct): its markers are plain text, its turns end with the
    # end-of-text token, which also begins the conversation (OLMo 2's BOS).
    PromptFormat("olmo2", begin=END_OF_TEXT, header=_headers("<|{role}|>\n"), end_of_turn=END_OF_TEXT,
                 after_turn="\n", prompt_end="\n", after_last_turn=False, generation_header="<|assistant|>\n",
                 stops=(END_OF_TEXT,), special_tokens=(END_OF_TEXT,), signature=("<|assistant|>",)),
    # A base model's layout: nothing to learn but "Role: " prefixes.
    PromptFormat("plain", header=_headers("{role}: ", **{r: r.capitalize() for r in ROLES}), end_of_turn="\n",
                 generation_header="Assistant:", stops=("\nUser:", "\nSystem:")),
    # Stanford Alpaca's template, for models without chat tokens.
    PromptFormat("alpaca", header=_headers(""), end_of_turn=END_OF_TEXT, generation_header="",
                 stops=(END_OF_TEXT,), single_turn=True),
)}
TEMPLATES = tuple(FORMATS)


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool  # part of the answer: its tokens are loss targets
    special: bool = False  # template markup: special-token strings in it become their ids


def get_format(template: str) -> PromptFormat:
    """The built-in format called ``template``; PromptFormatError for any other name."""
    if template not in FORMATS:
        raise PromptFormatError(f"unknown chat template {template!r}: choose {', '.join(TEMPLATES)}")
    return FORMATS[template]


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------
def check_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages if they are a non-empty list of {"role", "content"}; else PromptFormatError."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptFormatError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise PromptFormatError(f"message {i} must be a dict with a string 'content', got {m!r}")
        if m.get("role") not in ROLES:
            raise PromptFormatError(f"message {i} has role {m.get('role')!r}; expected one of {ROLES}")
    return list(messages)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt up to and including "### Response:\\n" (what the model continues)."""
    if input:
        return (f"{ALPACA_HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                f"### Input:\n{input}\n\n### Response:\n")
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def as_messages(record: dict) -> list[dict]:
    """A training record as a chat: an alpaca record ({instruction, input?, output?}) becomes
    a user message (the input after a blank line) and the assistant's answer."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    answer = [{"role": "assistant", "content": record["output"]}] if "output" in record else []
    return [{"role": "user", "content": user}] + answer


def render_segments(conversation: Sequence[dict] | dict, template: str,
                    add_generation_prompt: bool = False) -> list[Segment]:
    """``conversation`` (a list of messages, or a training record: alpaca
    {instruction, input?, output?} or {messages}) laid out in the built-in format ``template``.

    With ``add_generation_prompt`` the layout ends where the assistant's reply begins.
    """
    fmt = get_format(template)
    if fmt.single_turn:
        return _single_turn_segments(conversation, add_generation_prompt)
    messages = check_messages(as_messages(conversation) if isinstance(conversation, dict) else conversation)
    if fmt.default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": fmt.default_system}] + messages
    prefix = ""  # the system text a format without a system turn puts in the first message
    if fmt.system_in_first_user and messages[0]["role"] == "system":
        if len(messages) == 1:
            raise PromptFormatError(f"the {template} format has no system turn: a system message must be "
                                    "followed by a user message, which it opens")
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    segments = [Segment(fmt.begin, False, True)] if fmt.begin else []
    # Qwen3: the index of the last user message (not a tool response); the answers after it keep their reasoning.
    last_query = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"
                       and not _is_tool_response(messages[i]["content"])), len(messages))
    for i, m in enumerate(messages):
        if fmt.system_in_first_user and m["role"] == "system":
            raise PromptFormatError(f"the {template} format has no system turn: only a first system message "
                                    "can be given (it opens the first user message)")
        is_answer, last = m["role"] == "assistant", i == len(messages) - 1
        segments.append(Segment(fmt.header[m["role"]], False, True))
        if prefix:
            segments.append(Segment(prefix, False))
            prefix = ""
        content = m["content"].strip() if fmt.strip_content else m["content"]
        if is_answer and fmt.thinking:
            segments += _answer_segments(m, think=i > last_query, last=last)
        else:
            segments.append(Segment(content, is_answer))
        if not is_answer and fmt.prompt_end is not None:
            segments.append(Segment(fmt.prompt_end, False, True))
            continue
        segments.append(Segment(fmt.end_of_turn, is_answer, True))
        if fmt.after_turn and (fmt.after_last_turn or not last):
            segments.append(Segment(fmt.after_turn, False, True))
    if add_generation_prompt:
        segments.append(Segment(fmt.generation_header, False, True))
    return segments


def _is_tool_response(text: str) -> bool:
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


def _answer_segments(message: dict, think: bool, last: bool) -> list[Segment]:
    """An answer in Qwen3's layout: its reasoning is ``reasoning_content``, or the text up to
    ``</think>`` in its content. An answer after the last user message (``think``) keeps it
    in a think block, which the last answer has even when empty (the model writes one
    before every reply); an earlier answer keeps only the text after the block. The block
    is trained: the model learns to write it."""
    content, reasoning = message["content"], message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    if think and (last or reasoning):
        return [Segment("<think>\n", True, True), Segment(reasoning.strip("\n"), True),
                Segment("\n</think>\n\n", True, True), Segment(content.lstrip("\n"), True)]
    return [Segment(content, True)]


def _single_turn_segments(conversation: Sequence[dict] | dict, add_generation_prompt: bool) -> list[Segment]:
    """Alpaca: the prompt (user text: no special tokens), then the answer and the end-of-text
    token when there is one.

    From a chat: at inference (a generation prompt, or a chat that ends in a user turn) the
    last user message is the instruction (Alpaca has no place for a system message or
    history); a transcript that ends in an answer must be one user message and its answer."""
    if isinstance(conversation, dict) and "messages" not in conversation:
        record = conversation
    else:
        messages = check_messages(conversation["messages"] if isinstance(conversation, dict) else conversation)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise PromptFormatError("the alpaca template needs a user message")
        roles = [m["role"] for m in messages]
        if add_generation_prompt or roles[-1] != "assistant":
            record = {"instruction": users[-1]}
        elif roles == ["user", "assistant"]:
            record = {"instruction": users[0], "output": messages[1]["content"]}
        else:
            raise PromptFormatError(f"the alpaca template holds one instruction and one answer, this chat has "
                                    f"turns {roles}: use --template chatml or llama3")
    segments = [Segment(alpaca_prompt(record["instruction"], record.get("input", "") or ""), False)]
    if "output" in record and not add_generation_prompt:
        segments += [Segment(record["output"], True), Segment(END_OF_TEXT, True, True)]
    return segments


def render_example(record: dict, template: str) -> list[Segment]:
    """One training example (alpaca record or {messages}) as segments in ``template``."""
    return render_segments(record, template, add_generation_prompt=False)


def format_prompt(template: str, prompt: str | dict | Sequence[dict], input: str = "") -> str:
    """The text to give the model at inference: an instruction (a string, with an optional
    ``input``), an alpaca record {"instruction", "input"?} or the chat so far (messages),
    laid out in the built-in ``template``, ending where the answer begins.

    >>> format_prompt("llama3", "Name a colour.")[:40]
    '<|begin_of_text|><|start_header_id|>user'
    """
    if isinstance(prompt, str):
        prompt = {"instruction": prompt, "input": input}
    elif isinstance(prompt, dict):
        prompt = {"instruction": prompt["instruction"], "input": prompt.get("input", "") or input}
    elif input:
        raise PromptFormatError("an input goes with an instruction, not with a list of messages")
    return "".join(s.text for s in render_segments(prompt, template, add_generation_prompt=True))


def render_chat(messages: Sequence[dict], template: str | None, tokenizer, add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` (a list of {"role", "content"} dicts) in ``template``
    (a built-in name, Jinja source, or None: see ``resolve_template``).

    With add_generation_prompt the text ends where the assistant's reply begins.
    """
    messages = check_messages(messages)
    template = resolve_template(template, tokenizer)
    if template in FORMATS:
        return "".join(s.text for s in render_segments(messages, template, add_generation_prompt))
    return _render_jinja(template, messages, tokenizer, add_generation_prompt)


# A Jinja chat template is code from a model's files (or --chat-template): it renders in a
# sandbox, and within bounds, so a template that loops for ever, builds a huge string or
# recurses fails one request with a PromptFormatError instead of holding the process.
TEMPLATE_TIME_LIMIT_S = 1.0  # rendering time (real templates take about a millisecond)
TEMPLATE_MAX_CHARS = 4_000_000  # rendered text: far more than any context holds


def _render_jinja(source: str, messages, tokenizer, add_generation_prompt: bool) -> str:
    """Render a Hugging Face style Jinja chat template in a sandbox, within the bounds above."""
    import sys
    import time

    import jinja2

    def raise_exception(message):
        raise PromptFormatError(f"chat template: {message}")

    def strftime_now(fmt):
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = _bounded_sandbox()
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(source)
    except jinja2.TemplateError as e:
        raise PromptFormatError(f"chat template does not parse: {e}") from None
    # The time bound: a trace function on this thread sees every line the template's compiled
    # code runs (its frames are named "<template>"), so even a loop that writes nothing stops.
    deadline = time.monotonic() + TEMPLATE_TIME_LIMIT_S

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise PromptFormatError(f"chat template: rendering took more than {TEMPLATE_TIME_LIMIT_S:g} s")
        return trace if frame.f_code.co_filename == "<template>" else None

    pieces, size = [], 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for piece in compiled.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       bos_token=_token_text(tokenizer, "bos"), eos_token=_token_text(tokenizer, "eos")):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise PromptFormatError(f"chat template: the prompt grew past {TEMPLATE_MAX_CHARS} characters")
            pieces.append(piece)
    except PromptFormatError:
        raise
    except jinja2.TemplateError as e:  # e.g. an undefined variable, or the sandbox refusing
        raise PromptFormatError(f"chat template failed: {e}") from None
    except (RecursionError, MemoryError, ArithmeticError, LookupError, TypeError, ValueError) as e:
        # The template's own mistake (1/0, a recursive macro, "a" + 1), not scratchlm's.
        raise PromptFormatError(f"chat template failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)


def _bounded_sandbox():
    """Jinja's immutable sandbox with the settings transformers renders with ({% break %} /
    {% continue %} included), where ``*`` and ``**`` cannot build huge values."""
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            if _too_large(operator, left, right):
                raise SecurityError(f"chat template: {operator} would build a value that is too large")
            return super().call_binop(context, operator, left, right)

    return Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])


def _too_large(operator: str, left, right) -> bool:
    """Whether ``left operator right`` would make a string or list longer than
    TEMPLATE_MAX_CHARS, or an integer of more than 4096 bits: one such operation can take
    more memory or time than the template's bounds can stop (it runs as one C call)."""
    def size(x):
        return len(x) if isinstance(x, (str, list, tuple)) else None

    if operator == "+":
        return size(left) is not None and size(right) is not None and size(left) + size(right) > TEMPLATE_MAX_CHARS
    ints = [isinstance(x, int) for x in (left, right)]
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if size(seq) is not None and isinstance(times, int) and size(seq) * times > TEMPLATE_MAX_CHARS:
                return True
        return all(ints) and left.bit_length() + right.bit_length() > 4096
    if operator == "**":
        return isinstance(right, (int, float)) and (abs(right) > 4096 or (
            ints[0] and left.bit_length() * abs(right) > 4096))
    return False


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


def chat_stops(template: str | None, tokenizer) -> tuple[list[str], list[int]]:
    """(stop strings, stop token ids) that end the assistant's turn under ``template``: the
    format's stops (for Jinja: the known end-of-turn tokens the tokenizer has), each by id
    where it is a special token of the tokenizer, else as text; and the tokenizer's
    end-of-text id."""
    template = resolve_template(template, tokenizer)
    specials = getattr(tokenizer, "special_tokens", None) or {}
    if template in FORMATS:
        markers = list(FORMATS[template].stops)
    else:  # the tokenizer's own template: whichever end-of-turn markers it has
        markers = [m for m in END_OF_TURN_TOKENS if m in specials]
    ids = [specials[m] for m in markers if m in specials]
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None and eot not in ids:
        ids.append(eot)
    strings = [m for m in markers if m not in specials]
    return strings, ids


# ----------------------------------------------------------------------------------------
# Which format a model uses, and recording it in a model directory
# ----------------------------------------------------------------------------------------
def resolve_template(template: str | None, tokenizer, model_dir: str | os.PathLike | None = None, *,
                     training: bool = False, records: Sequence[dict] | None = None) -> str:
    """The format to use: a built-in name, or Jinja source (never for ``training``).
    The order is the module docstring's; ``records`` (training data) decide step 5."""
    if template is not None:
        if not isinstance(template, str):
            raise PromptFormatError(f"a chat template is a name or Jinja source, not {type(template).__name__}")
        if template in FORMATS:
            return template
        if not ("{%" in template or "{{" in template):
            raise PromptFormatError(f"unknown chat template {template!r}: choose {', '.join(TEMPLATES)} "
                                    "or give Jinja source")
        if training:
            raise PromptFormatError(f"fine-tuning needs a built-in prompt format ({', '.join(TEMPLATES)}), "
                                    "not Jinja source: its answers must be told apart from the prompt")
        return template
    if model_dir is not None and Path(model_dir).is_dir():
        recorded = read_prompt_format(model_dir)
        if recorded is not None:
            return recorded
    own = getattr(tokenizer, "chat_template", None)
    if not training and isinstance(own, str) and own:
        return own
    detected = detect_format(tokenizer)
    if detected is not None:
        return detected
    if not training:
        return "plain"
    multi_turn = any("messages" in r and [m.get("role") for m in r["messages"]] != ["user", "assistant"]
                     for r in records or [])
    return "chatml" if multi_turn else "alpaca"  # alpaca holds one exchange only


def detect_format(tokenizer) -> str | None:
    """The first built-in format whose signature tokens the tokenizer has as special tokens
    or its Jinja chat template writes; None when there is none."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    own = getattr(tokenizer, "chat_template", None)
    own = own if isinstance(own, str) else ""
    for fmt in FORMATS.values():
        if any(token in specials or token in own for token in fmt.signature):
            return fmt.name
    return None


def write_prompt_format(directory: str | os.PathLike, template: str) -> None:
    """Record ``template`` in ``directory/prompt_format.json`` (atomically: a temporary file
    renamed into place)."""
    fmt = get_format(template)
    file = Path(directory) / PROMPT_FORMAT_FILE
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps({"template": fmt.name, "end_of_turn": fmt.end_of_turn}, indent=2) + "\n")
    os.replace(tmp, file)


def read_prompt_format(directory: str | os.PathLike) -> str | None:
    """The format recorded in a (fine-tuned) model directory, or None when it has none;
    PromptFormatError when the file is malformed or names an unknown format."""
    file = Path(directory) / PROMPT_FORMAT_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptFormatError(f"{file} is not a valid prompt format file: {e}") from None
    if not isinstance(record, dict):
        raise PromptFormatError(f"{file} is not a valid prompt format file: expected a JSON object")
    template = record.get("template")
    if template not in FORMATS:
        raise PromptFormatError(f"{file}: unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    return template
