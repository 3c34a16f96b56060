"""Hostile requests: every field at 0, negative, NaN, inf, huge and of the wrong type,
malformed JSON, huge bodies, chat templates that misbehave, and rows that break the model
next to innocent ones. Each must end as a 4xx JSON error (or a normal answer where the
value is valid), and the server must stay healthy for the next client.

The app runs in-process (FastAPI's TestClient); the concurrent test uses a real uvicorn.
"""

import copy
import json
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from scratchlm.generate import generate  # noqa: E402
from scratchlm.serve import create_app  # noqa: E402
from scratchlm.tokenizer.bpe import BPETokenizer  # noqa: E402
from serve_fixtures import TEXT, ServerThread, tiny_model_and_tokenizer  # noqa: E402

NAME = "tiny"
pytestmark = pytest.mark.timeout(180)
HEADERS = {"Content-Type": "application/json"}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
COMPLETION = {"model": NAME, "prompt": "The quick", "max_tokens": 2}


@pytest.fixture(scope="module")
def client():
    model, tokenizer = tiny_model_and_tokenizer()
    with TestClient(create_app(model, tokenizer, NAME, max_body_bytes=20_000),
                    base_url="http://127.0.0.1") as c:
        yield c


def raw(value) -> str:
    """``value`` as JSON text, NaN and Infinity included (Python's json writes them)."""
    return json.dumps(value)


def handled(response) -> bool:
    """A 4xx with the OpenAI error body, or a 200 answer (the value was valid)."""
    if response.status_code == 200:
        return True
    if not 400 <= response.status_code < 500:
        return False
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("message"), str) and bool(error["message"]) and "Traceback" not in error["message"]


def healthy(client) -> bool:
    model, tokenizer = tiny_model_and_tokenizer()
    r = client.post("/v1/completions", json={**COMPLETION, "max_tokens": 4, "temperature": 0})
    ok = r.status_code == 200 and r.json()["choices"][0]["text"] == generate(
        model, tokenizer, "The quick", max_new_tokens=4)[0].text
    return ok and client.get("/health").json()["status"] == "ok"


# ---- the 500s of the issue: now 400s that name the field -------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("seed", 2**70), ("seed", -(2**70)), ("seed", 2**64),
    ("temperature", 1e-300), ("temperature", 5e-324), ("temperature", 0.001),
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("repetition_penalty", 0.0001),
])
def test_values_that_overflowed_are_400s_naming_the_field(client, field, value):
    for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        for extra in ({}, {"stream": True}):
            r = client.post(path, json={**body, **extra, "temperature": 1.0, field: value})  # sampling
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == field
    assert healthy(client)


def test_edge_values_that_are_valid_still_work(client):
    """The bounds are where numbers overflow, not narrower: these sample normally."""
    model, tokenizer = tiny_model_and_tokenizer()
    for extra in ({"seed": 2**63 - 1, "n": 2}, {"seed": -(2**63)}, {"temperature": 0.01, "seed": 1},
                  {"repetition_penalty": 0.01, "temperature": 0.01, "seed": 2}, {"repetition_penalty": 100.0}):
        r = client.post("/v1/completions", json={**COMPLETION, "temperature": 1.0, **extra})
        assert r.status_code == 200, (extra, r.text)
    r = client.post("/v1/completions", json={**COMPLETION, "temperature": 0.01, "seed": 5, "max_tokens": 6})
    want = generate(model, tokenizer, "The quick", max_new_tokens=6, temperature=0.01, seed=5)[0].text
    assert r.json()["choices"][0]["text"] == want


# ---- chat templates that misbehave ------------------------------------------------------------------
TEMPLATES = {
    "renders nothing": "{% for m in messages %}{% endfor %}",
    "sandbox: a method that mutates": "{{ messages.append(1) }}{% for m in messages %}{{ m.content }}{% endfor %}",
    "sandbox: dunder attributes": "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "loops for ever, silently": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                "{% endfor %}x",
    "writes without end": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}"
                          "{% endfor %}",
    "one huge string": "{{ 'x' * 10**9 }}",
    "doubles a string": "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}",
    "a huge power": "{{ 7 ** 10000000 }}",
    "powers of powers": "{{ ((10 ** 50) ** 50) ** 50 }}",
    "divides by zero": "{{ 1 / 0 }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "raises on purpose": "{{ raise_exception('roles must alternate') }}",
    "undefined": "{{ nothing.here }}",
    "type error": "{{ messages[0].content + 1 }}",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_misbehaving_chat_template_is_a_400_in_bounded_time(name):
    import time

    model, tokenizer = tiny_model_and_tokenizer()
    with TestClient(create_app(model, tokenizer, NAME, chat_template=TEMPLATES[name]),
                    base_url="http://127.0.0.1") as c:
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=CHAT)
        assert time.monotonic() - t0 < 5
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "messages" and ("template" in error["message"]), error
        # The server is fine: completions need no template.
        assert c.post("/v1/completions", json=COMPLETION).status_code == 200


def test_the_template_bounds_leave_real_templates_alone():
    """A Hugging Face style template (loops, filters, conditionals) renders as jinja2 renders it."""
    import jinja2.sandbox

    from scratchlm.chat import render_chat

    source = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }}"
              " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "x" * 100_000}]
    want = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        source).render(messages=messages, bos_token="", eos_token="<|endoftext|>", add_generation_prompt=True)
    _, tokenizer = tiny_model_and_tokenizer()
    assert render_chat(messages, source, tokenizer) == want


# ---- one bad row must not fail its neighbours ---------------------------------------------------------
def rigged(model, rules: dict[int, int], known: int):
    """A copy of ``model`` that, in a row whose last input token is a key of ``rules``, makes
    the value by far the most likely next token: a model that writes a chosen token at a
    chosen moment, for one row only. Otherwise it never writes an id from ``known`` on (as
    a model with a padded vocabulary never writes the padding ids it was not trained on)."""
    model = copy.deepcopy(model)
    last = {}

    def remember(module, args):
        last["ids"] = args[0][:, -1]  # (B,) the last input token of each row

    def force(module, args, logits):  # logits (B, V) or (B, T, V)
        top = logits.abs().amax() * 10 + 100
        logits[..., known:] = -top
        for after, token in rules.items():
            logits[last["ids"] == after, ..., token] = top
        return logits

    model.register_forward_pre_hook(remember)
    model.lm_head.register_forward_hook(force)
    return model


def breaks_on(model, token_id: int):
    """A copy of ``model`` whose forward pass raises when its input holds ``token_id``."""
    def explode(module, args):
        if (args[0] == token_id).any():
            raise RuntimeError("simulated failure")

    broken = copy.deepcopy(model)
    broken.register_forward_pre_hook(explode)
    return broken


@pytest.fixture(scope="module")
def short_tokenizer():
    """The fixture's tokenizer trained to 280 ids: its first merges are the same (BPE is
    greedy and deterministic), so the 300-id model's ids from 280 on are beyond it."""
    return BPETokenizer.train(TEXT, 280, special_tokens=["<|endoftext|>"])


BACKTICK, CARET, TILDE, BEYOND = ord("`"), ord("^"), ord("~"), 290  # the bytes are in no merge of TEXT
GOOD = ["The quick", "A model reads", "Attention lets", "Hello, world"]


def bad_rows_model():
    """After '`': a token the tokenizer lacks (fails as the row starts). After '^': '~', then
    that token (fails at its first decode step). And any input holding '|' breaks the
    forward pass itself (fails the batched step)."""
    model, _ = tiny_model_and_tokenizer()
    rules = {BACKTICK: BEYOND, CARET: TILDE, TILDE: BEYOND, ord("{"): ord("|")}
    return breaks_on(rigged(model, rules, known=280), ord("|"))


BAD = {"fails to start": "The quick`", "fails at a step": "A model^", "breaks the batched step": "Hello{"}


def test_engine_a_bad_row_fails_alone_at_admission_and_at_every_step(short_tokenizer):
    from scratchlm.serve.engine import Engine, SamplingParams, Sequence

    model, tokenizer = bad_rows_model(), short_tokenizer
    events: dict[str, list] = {}
    sequences = {}
    for label, text in [*((g, g) for g in GOOD), *BAD.items()]:
        events[label] = []
        sequences[label] = Sequence(tokenizer.encode(text), SamplingParams(max_tokens=8), events[label].append)
    engine = Engine(model, tokenizer, max_batch=8).start()
    try:
        engine.submit(list(sequences.values()))  # one submit: all admitted, prefilled together
        assert all(s.done.wait(30) for s in sequences.values())
    finally:
        engine.close()
    for label in BAD:
        assert events[label][-1].error, label
    assert "not in the vocabulary" in events["fails to start"][-1].error or "290" in events["fails to start"][-1].error
    assert events["fails at a step"][0].text == "~"  # it started, then failed at a step
    assert "simulated failure" in events["breaks the batched step"][-1].error
    for text in GOOD:
        assert events[text][-1].error is None, events[text][-1].error
        want = generate(model, tokenizer, text, max_new_tokens=8)[0]
        assert "".join(e.text for e in events[text]) == want.text
        assert events[text][-1].finish_reason == want.finish_reason


def test_concurrent_requests_beside_bad_ones_all_succeed(short_tokenizer):
    model, tokenizer = bad_rows_model(), short_tokenizer
    results: dict[str, httpx.Response] = {}
    with ServerThread(create_app(model, tokenizer, NAME, max_batch=8)) as url:
        start = threading.Barrier(len(GOOD) * 2 + len(BAD))

        def one(label, text, stream):
            start.wait()
            body = {"model": NAME, "prompt": text, "max_tokens": 8, "temperature": 0, "stream": stream}
            results[label, stream] = httpx.post(url + "/v1/completions", json=body, timeout=60)

        threads = [threading.Thread(target=one, args=(label, text, stream))
                   for label, text in [*((g, g) for g in GOOD), *BAD.items()] for stream in (False, True)
                   if stream is False or label in GOOD]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for text in GOOD:
            want = generate(model, tokenizer, text, max_new_tokens=8)[0].text
            assert results[text, False].json()["choices"][0]["text"] == want
            pieces = [json.loads(line[6:]) for line in results[text, True].text.splitlines()
                      if line.startswith("data: {")]
            assert "".join(p["choices"][0]["text"] for p in pieces if p.get("choices")) == want
        for label in BAD:
            r = results[label, False]
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        assert httpx.get(url + "/health").json()["active"] == 0


# ---- the hostile pass: every field, every kind of bad value -------------------------------------------
FIELDS = {
    "both": ["model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
             "top_k", "min_p", "repetition_penalty", "logprobs", "frequency_penalty", "presence_penalty",
             "logit_bias"],
    "completions": ["prompt", "echo", "suffix", "best_of"],
    "chat": ["messages", "max_completion_tokens", "tools", "response_format"],
}
VALUES = {  # category -> JSON texts
    "zero": ["0", "0.0"],
    "negative": ["-1", "-0.5", "-1e308"],
    "nan": ["NaN"],
    "inf": ["Infinity", "-Infinity"],
    "huge": [raw(2**70), "1e308", raw(10**400)],
    "tiny": ["1e-300", "5e-324"],
    "wrong type": ['"5"', "true", "null", "[]", "{}", '[1, "a"]', '{"a": [1]}'],
}
NESTED = {  # values inside the prompt or the messages
    "prompt ids": ['[0]', '[-1]', '[1.5]', f'[{2**70}]', '[NaN]', '[[1, 2], []]', '[[true]]', '[[1], "a"]',
                   '[' + ",".join(["1"] * 5000) + ']'],
    "messages": ['[{"role": "user"}]', '[{"role": "user", "content": null}]', '[{"content": "hi"}]',
                 '[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]',
                 '[{"role": "user", "content": [{"type": "text", "text": 5}]}]', '[{"role": "assistant", '
                 '"content": "only an answer"}]', '[{"role": "system", "content": ""}]', '[1]', '[[]]',
                 '[{"role": "user", "content": "' + "word " * 2000 + '"}]'],
}
MALFORMED = [b"", b"{", b"}", b"[", b'{"model": "tiny",}', b"{'model': 'tiny'}", b'{"model": "tiny"', b"null", b"42",
             b'"text"', b"\xff\xfe{}", b'{"model": "\xff"}', b'{"model": "tiny", "model": 5}', b"[]" * 100,
             b'{"a":' * 1000 + b"1" + b"}" * 1000, b"\x00" * 10]


def test_hostile_pass_every_field_and_value(client, capsys):
    tried, ok = Counter(), Counter()
    failures = []

    def check(category, path, body: bytes, headers=HEADERS):
        r = client.post(path, content=body, headers=headers)
        tried[category] += 1
        refused = category in ("malformed JSON", "huge body", "headers")  # never a valid request
        if handled(r) and not (refused and r.status_code == 200):
            ok[category] += 1
        else:
            failures.append((category, path, body[:120], r.status_code, r.text[:200]))

    for path, base, own in (("/v1/completions", COMPLETION, "completions"), ("/v1/chat/completions", CHAT, "chat")):
        for field in FIELDS["both"] + FIELDS[own]:
            for category, values in VALUES.items():
                for value in values:
                    body = dict(base)
                    text = json.dumps(body)[:-1] + f', "{field}": {value}}}'  # the field set (or replaced) last
                    check(category, path, text.encode())
        nested_field = "prompt" if own == "completions" else "messages"
        for value in NESTED["prompt ids" if own == "completions" else "messages"]:
            body = {k: v for k, v in base.items() if k != nested_field}
            check("nested", path, (json.dumps(body)[:-1] + f', "{nested_field}": {value}}}').encode())
        for body in MALFORMED:
            check("malformed JSON", path, body)
        check("huge body", path, b'{"model": "tiny", "prompt": "' + b"x" * 30_000 + b'"}')
        check("huge body", path, json.dumps({**base, "stop": ["y" * 25_000]}).encode())

        def chunked():  # no Content-Length: the limit holds while reading
            for _ in range(30):
                yield b" " * 4096

        check("huge body", path, chunked())
        for headers in ({"Content-Type": "text/plain"}, {}, {"Content-Type": "application/x-www-form-urlencoded"},
                        {"Content-Type": "application/json", "Host": "evil.example"},
                        {"Content-Type": "application/json", "Origin": "https://evil.example"}):
            check("headers", path, json.dumps(base).encode(), headers)
    print("\nhostile inputs: tried / handled by category")
    for category in tried:
        print(f"  {category:15s} {ok[category]:4d} / {tried[category]}")
    print(f"  {'total':15s} {sum(ok.values()):4d} / {sum(tried.values())}")
    assert not failures, "\n".join(map(str, failures[:10]))
    assert healthy(client)
    assert client.app.state.engine.active == 0 and client.app.state.engine.queued == 0


def test_a_top_p_that_underflows_keeps_the_most_likely_token():
    """top_p = 1e-300 is 0 in float32: the nucleus is still the top token (found by the pass above)."""
    from scratchlm.sampling import SamplingOptions, sample_next

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    for p in (1e-300, 5e-324, 1e-45):
        got = sample_next(logits, SamplingOptions(temperature=1.0, top_p=p), torch.Generator().manual_seed(1))
        assert torch.equal(got, logits.argmax(dim=-1))
