"""The Ollama Modelfile beside a GGUF export: its TEMPLATE renders conversations exactly as
chat.py does, for every built-in prompt format.

No Go toolchain here, so ``render_go`` below interprets the part of Go's text/template
that the templates use (text, {{ .Field }}, {{ $var }}, := and =, range, if / else if /
else, eq, ne, not, or, index), strictly: anything else is an error, so a template that
Ollama would reject or read differently fails the test instead of passing by accident.
"""

import re

import pytest

from scratchlm.chat import FORMATS, render_chat
from scratchlm.gguf_io.modelfile import modelfile_path, modelfile_text, ollama_template, write_modelfile

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _parse(template: str):
    """Go template text -> a tree: str | ("out", expr) | ("set"/"decl", var, expr) |
    ("range", expr, body) | ("if", [(cond, body), ...], else_body)."""
    tokens, pos = [], 0
    for m in _ACTION.finditer(template):
        assert not m.group(1) and not m.group(3), "trim markers change whitespace: not used by us"
        tokens.append(template[pos:m.start()])
        tokens.append(("action", m.group(2)))
        pos = m.end()
    tokens.append(template[pos:])

    def block(i, stop):
        out = []
        while i < len(tokens):
            t = tokens[i]
            if isinstance(t, str):
                if t:
                    out.append(t)
                i += 1
                continue
            text = t[1]
            word = text.split()[0] if text.split() else ""
            if word in stop or text.startswith("else"):
                return out, i
            if word == "range":
                body, i = block(i + 1, {"end"})
                assert tokens[i][1] == "end"
                out.append(("range", text[len("range"):].strip(), body))
                i += 1
            elif word == "if":
                branches, cond = [], text[2:].strip()
                while True:
                    body, i = block(i + 1, {"end"})
                    branches.append((cond, body))
                    t = tokens[i][1]
                    if t == "end":
                        out.append(("if", branches, []))
                        break
                    if t.startswith("else if"):
                        cond = t[len("else if"):].strip()
                        continue
                    assert t == "else", t
                    else_body, i = block(i + 1, {"end"})
                    assert tokens[i][1] == "end"
                    out.append(("if", branches, else_body))
                    break
                i += 1
            elif re.fullmatch(r"\$\w+ :?= .+", text):
                var, op, expr = text.split(" ", 2)
                out.append(("decl" if op == ":=" else "set", var, expr))
                i += 1
            else:
                out.append(("out", text))
                i += 1
        return out, i

    tree, i = block(0, set())
    assert i == len(tokens), "unbalanced template"
    return tree


def _split_args(expr: str) -> list[str]:
    args, depth, cur, quoted = [], 0, "", False
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        if not quoted and ch == "(":
            depth += 1
        if not quoted and ch == ")":
            depth -= 1
        if ch == " " and depth == 0 and not quoted:
            if cur:
                args.append(cur)
            cur = ""
        else:
            cur += ch
    return args + ([cur] if cur else [])


def _eval(expr: str, dot, scope: list[dict], root):
    args = _split_args(expr.strip())
    if len(args) > 1:
        fn, rest = args[0], [_eval(a, dot, scope, root) for a in args[1:]]
        functions = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
                     "or": lambda *a: next((x for x in a if x), a[-1]), "index": lambda a, i: a[i]}
        return functions[fn](*rest)
    a = args[0]
    if a.startswith("(") and a.endswith(")"):
        return _eval(a[1:-1], dot, scope, root)
    m = re.fullmatch(r"\((.*)\)((?:\.\w+)+)", a)  # (index .Messages 0).Role
    if m:
        value = _eval(m.group(1), dot, scope, root)
        for name in m.group(2).split(".")[1:]:
            value = value[name]
        return value
    if a.startswith('"'):
        return a[1:-1].replace('\\"', '"')
    if a.isdigit():
        return int(a)
    if a.startswith("$"):
        for frame in reversed(scope):
            if a in frame:
                return frame[a]
        raise KeyError(a)
    if a.startswith("."):
        value = dot
        for name in a.split(".")[1:]:
            value = value[name]
        return value
    raise AssertionError(f"not a Go template expression we interpret: {a!r}")


def render_go(template: str, data: dict) -> str:
    out = []

    def run(nodes, dot, scope):
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "out":
                out.append(str(_eval(node[1], dot, scope, data)))
            elif node[0] == "decl":
                scope[-1][node[1]] = _eval(node[2], dot, scope, data)
            elif node[0] == "set":
                frame = next(f for f in reversed(scope) if node[1] in f)  # = needs a declared variable
                frame[node[1]] = _eval(node[2], dot, scope, data)
            elif node[0] == "range":
                for item in _eval(node[1], dot, scope, data):
                    run(node[2], item, scope + [{}])
            elif node[0] == "if":
                for cond, body in node[1]:
                    if _eval(cond, dot, scope, data):
                        run(body, dot, scope + [{}])
                        break
                else:
                    run(node[2], dot, scope + [{}])

    run(_parse(template), data, [{}])
    return "".join(out)


def _ollama_messages(messages):
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "You answer in {{ curly }} \"quotes\"."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2\n\nwith lines"}],
]


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system+user", "multi-turn"])
def test_template_renders_like_chat_py(name, messages):
    template = ollama_template(name, end_of_text="<|endoftext|>")
    ours = render_chat(messages, name, None)
    assert render_go(template, _ollama_messages(messages)) == ours


@pytest.mark.parametrize("name", list(FORMATS))
def test_modelfile_structure(name, tmp_path):
    fmt = FORMATS[name]
    text = modelfile_text("out.gguf", name, list(fmt.stops))
    lines = text.splitlines()
    assert "FROM ./out.gguf" in lines
    body = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert body and body.group(1) == ollama_template(name)
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    assert stops and all(re.fullmatch(r'PARAMETER stop "[^"\n]+"', s) for s in stops)
    _parse(body.group(1))  # balanced, and only constructs Go accepts


def test_export_writes_a_modelfile_beside_the_gguf(tmp_path):
    """`scratchlm export MODEL out.gguf --format gguf` writes out.Modelfile for the model's format."""
    pytest.importorskip("gguf")
    import torch

    from scratchlm import ModelConfig, Transformer
    from scratchlm.chat import write_prompt_format
    from scratchlm.checkpoint import save_model
    from scratchlm.cli import main
    from scratchlm.tokenizer.bpe import BPETokenizer

    tokenizer = BPETokenizer.train("hello world, a few words to learn merges from " * 20, vocab_size=280,
                                   special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, d_model=32, n_layers=1, n_heads=2,
                         d_ff=64, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    model_dir = save_model(tmp_path / "m", Transformer(config), tokenizer)
    write_prompt_format(model_dir, "chatml")
    out = tmp_path / "out.gguf"
    assert main(["export", str(model_dir), str(out), "--format", "gguf"]) == 0
    modelfile = modelfile_path(out)
    assert modelfile == tmp_path / "out.Modelfile" and modelfile.is_file()
    text = modelfile.read_text()
    assert "FROM ./out.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    messages = CONVERSATIONS[1]
    assert render_go(template, _ollama_messages(messages)) == render_chat(messages, "chatml", None)
    assert write_modelfile(out, tokenizer, template="llama3").read_text().count("<|start_header_id|>") >= 1
