"""An Ollama ``Modelfile`` for a GGUF export: FROM the file, TEMPLATE from our prompt format,
PARAMETER stop for its stop strings.

Ollama builds a model from a Modelfile (``ollama create NAME -f out.Modelfile``). Its
TEMPLATE is a Go ``text/template`` that lays out the conversation, ``.Messages`` (each
with ``.Role`` and ``.Content``), the way the model was trained to read it: the same job
as a row of chat.py's ``FORMATS``. ``ollama_template`` writes that row in Go's syntax:

    chat.py (chatml)                          Go template
    header["user"] = "<|im_start|>user\\n"     {{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user
    content                                   {{ else if ... }}{{ end }}{{ .Content }}<|im_end|>
    end_of_turn + after_turn                  {{ end }}<|im_start|>assistant
    generation_header = "<|im_start|>assistant\\n"

so that Ollama renders a conversation to exactly the text ``chat.render_chat`` gives
(tests/test_gguf_modelfile.py renders both and compares). Formats with a twist keep it:
gemma's system text opens the first user message (a ``$system`` variable carries it),
qwen adds its default system message when there is none, alpaca keeps only the last
user message as the instruction.

>>> print(ollama_template("chatml"))  # doctest: +NORMALIZE_WHITESPACE
{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system
{{ else if eq .Role "user" }}<|im_start|>user
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ else }}<|im_start|>tool
{{ end }}{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

from __future__ import annotations

import os
from pathlib import Path

from ..chat import END_OF_TEXT, FORMATS, ROLES, alpaca_prompt, detect_format, get_format, resolve_template
from .container import GGUFError

_ELSE_ROLES = ROLES[:-1]  # system, user, assistant get an "if"; the last role (tool) is the else


def ollama_template(template: str, end_of_text: str = "") -> str:
    """The Go template of the built-in prompt format ``template`` (a chat.FORMATS name).

    ``end_of_text``: the tokenizer's end-of-text token, which alpaca's answers end with.
    """
    fmt = get_format(template)
    if fmt.single_turn:  # alpaca: the last user message is the instruction
        instruction = "{{ $instruction }}"
        layout = alpaca_prompt(instruction).replace(instruction, "\0")  # the header's text, Go-escaped below
        return ('{{ $instruction := "" }}{{ range .Messages }}{{ if eq .Role "user" }}'
                '{{ $instruction = .Content }}{{ end }}{{ end }}' + _literal(layout).replace("\0", instruction))
    system = "{{ $system := \"\" }}" if fmt.system_in_first_user else ""
    out = [_literal(fmt.begin), system]
    if fmt.default_system is not None:
        out.append('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}'
                   + _literal(fmt.header["system"] + fmt.default_system + fmt.end_of_turn + fmt.after_turn)
                   + "{{ end }}")
    out.append("{{ range .Messages }}")
    for i, role in enumerate(_ELSE_ROLES):
        keyword = "if" if i == 0 else "else if"
        body = _literal(fmt.header[role])
        if fmt.system_in_first_user and role == "system":
            body = "{{ $system = .Content }}"
        elif fmt.system_in_first_user:  # the first message after the system one opens with its text
            body += '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
        out.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{body}')
    tool = _literal(fmt.header[ROLES[-1]])
    if fmt.system_in_first_user:
        tool += '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
    out.append(f"{{{{ else }}}}{tool}{{{{ end }}}}")
    content = "{{ .Content }}" + _literal(fmt.end_of_turn + fmt.after_turn)
    if fmt.prompt_end is not None:  # olmo2: system / user / tool messages end otherwise than answers
        content = ('{{ .Content }}{{ if eq .Role "assistant" }}' + _literal(fmt.end_of_turn + fmt.after_turn)
                   + "{{ else }}" + _literal(fmt.prompt_end) + "{{ end }}")
    if fmt.system_in_first_user:  # the system message itself writes nothing
        content = '{{ if ne .Role "system" }}' + content + "{{ end }}"
    out += [content, "{{ end }}", _literal(fmt.generation_header)]
    text = "".join(out)
    return text.replace(END_OF_TEXT, end_of_text) if end_of_text else text


def _literal(text: str) -> str:
    """Text that a Go template writes as it is: only "{{" would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile_text(gguf_name: str, template: str | None, stops: list[str], end_of_text: str = "") -> str:
    """The Modelfile: FROM ./gguf_name, the TEMPLATE of built-in format ``template`` (None:
    no TEMPLATE, Ollama then reads the chat template inside the GGUF), one PARAMETER stop
    per stop string."""
    lines = ["# Ollama: ollama create NAME -f THIS_FILE, then ollama run NAME",
             f"FROM ./{gguf_name}", ""]
    if template is not None:
        body = ollama_template(template, end_of_text)
        if '"""' in body:
            raise GGUFError(f"the {template} prompt format holds '\"\"\"', which a Modelfile cannot quote")
        lines += [f'TEMPLATE """{body}"""', ""]
    for stop in stops:
        # A Modelfile value is one line: a stop that starts a new line ("\nUser:") stops at its text.
        value = stop.strip("\n")
        if value and "\n" not in value:
            lines.append(f"PARAMETER stop {_quote(value)}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_path(gguf_path: str | os.PathLike) -> Path:
    """``out.gguf`` -> ``out.Modelfile`` beside it."""
    path = Path(gguf_path)
    return path.with_name((path.stem if path.suffix == ".gguf" else path.name) + ".Modelfile")


def write_modelfile(gguf_path: str | os.PathLike, tokenizer, model_dir: str | os.PathLike | None = None,
                    template: str | None = None) -> Path:
    """Write ``out.Modelfile`` beside ``out.gguf`` for the model's prompt format: the one
    asked for, recorded in ``model_dir``, or detected from the tokenizer (chat.py's order).
    A Jinja template that is none of ours gives no TEMPLATE line (Ollama reads it from the
    GGUF's ``tokenizer.chat_template``)."""
    from ..chat import _token_text

    name = resolve_template(template, tokenizer, model_dir=model_dir)
    if name not in FORMATS:
        name = detect_format(tokenizer)
    end_of_text = _token_text(tokenizer, "eos")
    stops: list[str] = []
    if name is not None:
        stops = [end_of_text if s == END_OF_TEXT else s for s in FORMATS[name].stops]
    if end_of_text and end_of_text not in stops:
        stops.append(end_of_text)
    path = modelfile_path(gguf_path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(modelfile_text(Path(gguf_path).name, name, [s for s in stops if s], end_of_text))
    os.replace(tmp, path)
    return path


__all__ = ["ollama_template", "modelfile_text", "modelfile_path", "write_modelfile"]
