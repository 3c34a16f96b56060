"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP.

Every server here is real: uvicorn on a free 127.0.0.1 port, in a thread of this process.
Outputs are compared with generate(), the reference decode loop.
"""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, str(Path(__file__).parent))
from scratchlm.chat import chat_stops, render_chat  # noqa: E402
from scratchlm.generate import generate  # noqa: E402
from scratchlm.serve import create_app  # noqa: E402
from serve_fixtures import ServerThread, slowed_down, tiny_model_and_tokenizer  # noqa: E402

NAME = "tiny"
KEY = "sk-test-key"
PROMPTS = ["The quick", "A model", "Attention lets", "Hello,", "Serving a", "many clients", "its own", "look back"]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model_and_tokenizer()


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    """The open server: no key, default limits. Yields (base_url, app)."""
    model, tokenizer = model_and_tokenizer
    app = create_app(model, tokenizer, NAME, max_batch=16)
    with ServerThread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def guarded(model_and_tokenizer):
    """A slow server with an API key, one row, one queue place and a small body limit."""
    model, tokenizer = model_and_tokenizer
    app = create_app(slowed_down(model, 0.01), tokenizer, NAME, api_key=KEY, max_batch=1, max_queue=1,
                     max_body_bytes=4096)
    with ServerThread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    # Retries as the SDK's default does: a pooled connection that the server closed after its
    # 5 s keep-alive can race a new request (RemoteProtocolError); 4xx answers are not retried.
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=2, timeout=30)


def expected(model_and_tokenizer, prompt, **options):
    model, tokenizer = model_and_tokenizer
    return generate(model, tokenizer, prompt, **options)[0]


def expected_chat(model_and_tokenizer, messages, max_tokens):
    """generate() on the conversation rendered as the server renders it."""
    model, tokenizer = model_and_tokenizer
    stop_strings, stop_ids = chat_stops(None, tokenizer)
    return generate(model, tokenizer, render_chat(messages, None, tokenizer), max_new_tokens=max_tokens,
                    stop=stop_strings, stop_token_ids=stop_ids)[0]


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


# ---- the happy path, through the official client ----------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    card = client.models.retrieve(NAME)
    assert card.owned_by == "scratchlm" and card.model_extra["max_model_len"] == 128
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["active"] == 0


def test_completion_greedy_equals_generate(client, model_and_tokenizer):
    ref = expected(model_and_tokenizer, "The quick", max_new_tokens=20)
    r = client.completions.create(model=NAME, prompt="The quick", max_tokens=20, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    assert r.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens


def test_completion_stream_equals_generate(client, model_and_tokenizer):
    ref = expected(model_and_tokenizer, "Hello,", max_new_tokens=16)
    chunks = list(client.completions.create(model=NAME, prompt="Hello,", max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2  # it streamed, token by token
    assert "".join(c.choices[0].text for c in text_chunks) == ref.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    usage = chunks[-1].usage  # the last chunk: no choices, the usage
    assert chunks[-1].choices == [] and usage.completion_tokens == ref.completion_tokens == 16


def test_completion_batch_of_prompts_and_token_ids(client, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    r = client.completions.create(model=NAME, prompt=["The quick", "A model"], max_tokens=8, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        expected(model_and_tokenizer, p, max_new_tokens=8).text for p in ("The quick", "A model")]
    ids = tokenizer.encode("Serving a")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected(model_and_tokenizer, "Serving a", max_new_tokens=8).text
    assert r.usage.prompt_tokens == len(ids)


def test_chat_greedy_equals_generate_streamed_and_not(client, model_and_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]
    ref = expected_chat(model_and_tokenizer, messages, 24)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].choices[0].delta.content is None


def test_stop_strings_cut_the_text(client, model_and_tokenizer):
    full = expected(model_and_tokenizer, "The quick", max_new_tokens=20).text
    stop = full[8:11]  # a piece from the middle of the greedy continuation
    ref = expected(model_and_tokenizer, "The quick", max_new_tokens=20, stop=[stop])
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt="The quick", max_tokens=20, temperature=0,
                                      stop=[stop, "never appears"], stream=stream)
        if stream:
            text = "".join(c.choices[0].text for c in r)
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
            assert reason == "stop"
        assert text == ref.text == full[:full.index(stop)]


def test_sampling_n_and_seed(client, model_and_tokenizer):
    kw = dict(model=NAME, prompt="A model", max_tokens=12, temperature=1.0, top_p=0.95, seed=7, n=3)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice draws its own tokens (seed + index)
    ref = expected(model_and_tokenizer, "A model", max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    assert texts[0] == ref.text  # choice 0 draws exactly what generate(seed=7) draws
    assert first.usage.completion_tokens == sum(
        expected(model_and_tokenizer, "A model", max_new_tokens=12, temperature=1.0, top_p=0.95,
                 seed=7 + i).completion_tokens for i in range(3))
    top_k = client.completions.create(model=NAME, prompt="A model", max_tokens=12, temperature=1.0, seed=3,
                                      extra_body={"top_k": 1})
    assert top_k.choices[0].text == expected(model_and_tokenizer, "A model", max_new_tokens=12).text


def test_streamed_choices_and_extensions(client, model_and_tokenizer):
    """n=2 streamed: each chunk names its choice, each choice finishes once; and the
    repetition_penalty extension decodes as generate() does."""
    ref = expected(model_and_tokenizer, "Serving a", max_new_tokens=10)
    chunks = list(client.completions.create(model=NAME, prompt="Serving a", max_tokens=10, temperature=0, n=2,
                                            stream=True))
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(m.text for m in mine) == ref.text
        assert [m.finish_reason for m in mine if m.finish_reason] == ["length"]
    ref = expected(model_and_tokenizer, "A model", max_new_tokens=20, repetition_penalty=1.5)
    r = client.completions.create(model=NAME, prompt="A model", max_tokens=20, temperature=0,
                                  extra_body={"repetition_penalty": 1.5})
    assert r.choices[0].text == ref.text != expected(model_and_tokenizer, "A model", max_new_tokens=20).text


# ---- concurrency ------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny", "gemma3-tiny"])  # gemma3: a window of 16
def test_engine_rows_joining_and_leaving_decode_like_generate(preset):
    """Continuous batching: 12 prompts of different lengths arrive while others run, each
    with its own max_tokens, in a 48-token context. The shared cache starts with 8 columns,
    so it grows (8 -> 16 -> 32 -> 48) and then slides rows left when columns run out.
    Every row's tokens equal generate() alone on that prompt."""
    import random

    import torch

    from scratchlm import ModelConfig, Transformer
    from scratchlm.serve.engine import Engine, RunningBatch, SamplingParams, Sequence

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, context_length=48)).eval()
    with torch.no_grad():  # sharpen the random model's logits: greedy ties would be luck
        model.lm_head.weight.mul_(20) if not model.config.tie_embeddings else model.tok_emb.weight.mul_(20)
    rng = random.Random(0)
    engine = Engine(model, None, max_batch=5)
    engine.batch = RunningBatch(model, 5, columns=8)
    engine.start()
    try:
        sequences = []
        # First a short prompt that runs long, then a longer prompt than it has columns for
        # (the running row must move right), then a random mix.
        shapes = [(2, 40), (25, 10)] + [(rng.randrange(1, 30), None) for _ in range(10)]
        for length, budget in shapes:
            prompt = [rng.randrange(1, 500) for _ in range(length)]
            budget = budget or rng.randrange(1, 48 - len(prompt) + 1)
            sequences.append(Sequence(prompt, SamplingParams(max_tokens=budget), lambda event: None))
            engine.submit([sequences[-1]])
            time.sleep(0.002 * rng.randrange(0, 4))
        assert all(s.done.wait(30) for s in sequences)
    finally:
        engine.close()
    for s in sequences:
        [ref] = generate(model, None, [s.prompt_ids], max_new_tokens=s.params.max_tokens)
        assert s.generated == ref.token_ids
    assert engine.active == 0 and engine.batch.columns == 48


def test_eight_concurrent_streams_each_get_their_own_text(server, model_and_tokenizer):
    url, app = server
    refs = [expected(model_and_tokenizer, p, max_new_tokens=24).text for p in PROMPTS]
    assert len(set(refs)) == len(PROMPTS)  # distinct answers, so any mix-up would show
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(PROMPTS))
    steps_before = app.state.engine.steps

    def one_client(i):
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            start.wait()
            s = c.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=24, temperature=0, stream=True)
            results[i] = "".join(chunk.choices[0].text for chunk in s if chunk.choices)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [results[i] for i in range(len(PROMPTS))] == refs
    # The 8 x 24 tokens took far fewer than 8 x 24 model steps: the rows ran batched.
    assert app.state.engine.steps - steps_before < len(PROMPTS) * 24 * 0.6


# ---- bad requests -----------------------------------------------------------------------
BAD = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[]", 400, None, None),
    (b"", 400, None, "invalid_json"),
    (b'{"prompt": "x"}', 400, "model", "missing_required_parameter"),
    (b'{"model": "nope", "prompt": "x"}', 404, "model", "model_not_found"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 500}', 400, "max_tokens", "context_length_exceeded"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens", None),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens", None),
    (b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', 400, "temperature", None),
    (b'{"model": "tiny", "prompt": "x", "temperature": -0.5}', 400, "temperature", None),
    (b'{"model": "tiny", "prompt": "x", "top_p": 0}', 400, "top_p", None),
    (b'{"model": "tiny", "prompt": "x", "n": 0}', 400, "n", None),
    (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', 400, "stream", None),
    (b'{"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop", None),
    (b'{"model": "tiny", "prompt": ""}', 400, "prompt", None),
    (b'{"model": "tiny", "prompt": [1, 2, 99999]}', 400, "prompt", None),
    (b'{"model": "tiny", "prompt": 12.5}', 400, "prompt", None),
    (b'{"model": "tiny", "prompt": "x", "logprobs": 2}', 400, "logprobs", "unsupported_parameter"),
    (b'{"model": "tiny", "prompt": "' + b"x " * 200 + b'", "max_tokens": 1}', 400, "prompt",
     "context_length_exceeded"),
]
BAD_CHAT = [
    (b'{"model": "tiny", "messages": []}', 400, "messages", None),
    (b'{"model": "tiny", "messages": "hi"}', 400, "messages", None),
    (b'{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages.0.role", None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}', 400, "messages.0.content", None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}',
     400, "max_completion_tokens", "context_length_exceeded"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": '
     b'"json_object"}}', 400, "response_format", "unsupported_parameter"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 100}', 400, "n", None),
]


def assert_openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param and error["code"] == code
    return error


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[b[:40].decode(errors="replace") for b, *_ in BAD])
def test_bad_completion_requests(server, body, status, param, code):
    r = httpx.post(server[0] + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, status, param, code)


@pytest.mark.parametrize("body,status,param,code", BAD_CHAT, ids=[b[30:70].decode() for b, *_ in BAD_CHAT])
def test_bad_chat_requests(server, body, status, param, code):
    r = httpx.post(server[0] + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(r, status, param, code)


def test_unknown_route_and_method_are_json(server):
    assert_openai_error(httpx.get(server[0] + "/v1/nothing"), 404, None, "not_found")
    assert_openai_error(httpx.get(server[0] + "/v1/completions"), 405)


def test_the_client_sees_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.body["param"] == "temperature"


# ---- key, limits, disconnects (the guarded server: one row, one queue place) ------------
def test_api_key(guarded):
    url, _ = guarded
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
    error = assert_openai_error(httpx.post(url + "/v1/completions", json=body), 401, None, "invalid_api_key")
    assert "API key" in error["message"]
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert_openai_error(httpx.post(url + "/v1/completions", json=body, headers=wrong), 401, None, "invalid_api_key")
    assert_openai_error(httpx.get(url + "/v1/models", headers={"Authorization": KEY}), 401, None, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert ok.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    assert httpx.get(url + "/health").status_code == 200  # no key needed to check liveness


def test_body_too_large_is_413(guarded):
    url, _ = guarded
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"model": NAME, "prompt": "x" * 5000}).encode()
    assert_openai_error(httpx.post(url + "/v1/completions", content=big, headers=headers), 413, None,
                        "request_too_large")

    def chunked():  # no Content-Length: the limit must hold while reading too
        for _ in range(10):
            yield b" " * 1000

    assert_openai_error(httpx.post(url + "/v1/completions", content=chunked(), headers=headers), 413, None,
                        "request_too_large")


def stream_request(url, prompt, max_tokens):
    """Open a streaming completion with raw httpx; returns (client, response) to read or close."""
    c = httpx.Client(timeout=30)
    req = c.build_request("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": True})
    return c, c.send(req, stream=True)


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(guarded):
    url, app = guarded
    engine = app.state.engine
    # Request 1 takes the only row (100 slow tokens: ~1 s or more); request 2 the only queue place.
    c1, r1 = stream_request(url, "The quick", 100)
    lines = r1.iter_lines()
    assert next(lines).startswith("data: ")  # generating
    c2, r2 = stream_request(url, "A model", 5)
    assert wait_until(lambda: engine.queued == 1)
    r3 = httpx.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": NAME, "prompt": "x", "max_tokens": 2})
    error = assert_openai_error(r3, 429, None, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error" and r3.headers["retry-after"] == "1"

    # Client 1 hangs up mid-stream: its generation stops and request 2 gets the row at once.
    first = engine.steps
    r1.close()
    c1.close()
    t0 = time.monotonic()
    body = b"".join(r2.iter_bytes())
    waited = time.monotonic() - t0
    c2.close()
    assert body.endswith(b"data: [DONE]\n\n")
    assert waited < 2.0  # not the ~1 s+ that request 1's remaining tokens would have taken
    assert wait_until(lambda: engine.active == 0 and engine.queued == 0)
    assert engine.steps - first < 60  # request 1 did not run to its 100 tokens


def test_a_disconnect_before_the_answer_also_frees_the_slot(guarded):
    url, app = guarded
    engine = app.state.engine
    first = engine.steps
    c = httpx.Client(timeout=0.3)
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: we give up before the answer
        c.post(url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
               json={"model": NAME, "prompt": "Hello,", "max_tokens": 120})
    c.close()
    assert wait_until(lambda: engine.active == 0, timeout=5.0)
    assert engine.steps - first < 100  # stopped well before its 120 tokens


def breaks_on(model, token_id: int):
    """A copy of ``model`` that raises whenever its input holds ``token_id``: a stand-in for
    any bug or out-of-memory error in the middle of generation."""
    import copy

    def explode(module, args):
        if (args[0] == token_id).any():
            raise RuntimeError("simulated failure")

    broken = copy.deepcopy(model)
    broken.register_forward_pre_hook(explode)
    return broken


def test_engine_isolates_a_failing_prompt_admitted_with_others(model_and_tokenizer):
    """Prompts admitted together are prefilled as one batch; if that fails, each is retried
    alone, so only the prompt that breaks the model fails."""
    from scratchlm.serve.engine import Engine, SamplingParams, Sequence

    model, tokenizer = model_and_tokenizer
    engine = Engine(breaks_on(model, 13), tokenizer, max_batch=4).start()
    events = {"bad": [], "good": []}
    bad = Sequence([13, 14], SamplingParams(max_tokens=4), events["bad"].append)
    good = Sequence(tokenizer.encode("The quick"), SamplingParams(max_tokens=6), events["good"].append)
    try:
        engine.submit([bad, good])  # one submit: admitted in the same step
        assert bad.done.wait(30) and good.done.wait(30)
    finally:
        engine.close()
    assert events["bad"][-1].error and "simulated failure" in events["bad"][-1].error
    assert "".join(e.text for e in events["good"]) == expected(model_and_tokenizer, "The quick",
                                                                max_new_tokens=6).text


def test_a_failing_generation_is_a_json_500_and_the_server_carries_on(model_and_tokenizer):
    """A model that breaks on one prompt fails that request with an OpenAI-style
    server_error; the worker keeps serving everyone else."""
    model, tokenizer = model_and_tokenizer
    with ServerThread(create_app(breaks_on(model, 13), tokenizer, NAME)) as url:
        body = {"model": NAME, "prompt": [13, 14], "max_tokens": 4}
        r = httpx.post(url + "/v1/completions", json=body)
        error = assert_openai_error(r, 500)
        assert error["type"] == "server_error" and "simulated failure" in error["message"]
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["type"] == "server_error"
        ok = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "The quick", "max_tokens": 6,
                                                       "temperature": 0})
        assert ok.json()["choices"][0]["text"] == expected(model_and_tokenizer, "The quick", max_new_tokens=6).text


# ---- one stop rule, one check of prompt ids ---------------------------------------------------
def run_engine(model, tokenizer, prompt_ids, params):
    """The engine on one sequence: (text, finish_reason, completion_tokens, generated ids)."""
    from scratchlm.serve.engine import Engine, Sequence

    events = []
    engine = Engine(model, tokenizer, max_batch=2).start()
    try:
        seq = Sequence(prompt_ids, params, events.append)
        engine.submit([seq])
        assert seq.done.wait(30)
    finally:
        engine.close()
    assert events[-1].error is None, events[-1].error
    return "".join(e.text for e in events), events[-1].finish_reason, events[-1].completion_tokens, seq.generated


def test_engine_and_generate_end_rows_alike(model_and_tokenizer):
    """The same prompt and stops give the same text, finish reason and token count from the
    engine as from generate(): max tokens, a stop string, a stop id, a stop id that is also
    where a stop string would end, and the end of the context (the engine's budget)."""
    from scratchlm.serve.engine import SamplingParams

    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode("The quick")
    full = generate(model, tokenizer, [prompt], max_new_tokens=24)[0]
    assert full.finish_reason == "length" and len(full.text) > 12
    cases = [dict(max_tokens=10), dict(max_tokens=24, stop=[full.text[6:9]]),
             dict(max_tokens=24, stop_token_ids=[full.token_ids[7]]),
             dict(max_tokens=24, stop=["\x00never"], stop_token_ids=[full.token_ids[3]])]
    reasons = []
    for case in cases:
        ref = generate(model, tokenizer, [prompt], max_new_tokens=case["max_tokens"], stop=case.get("stop"),
                       stop_token_ids=case.get("stop_token_ids"))[0]
        text, reason, produced, generated = run_engine(model, tokenizer, prompt, SamplingParams(**case))
        assert (text, reason, produced) == (ref.text, ref.finish_reason, ref.completion_tokens), case
        assert generated[:len(ref.token_ids)] == ref.token_ids
        reasons.append(reason)
    assert reasons == ["length", "stop", "stop", "stop"]
    # A 120-token prompt in a 128-token context: the engine stops at the context, 8 tokens in,
    # where generate() with the 8 tokens that fit stops too.
    long = (tokenizer.encode(" ".join(PROMPTS)) * 20)[:120]
    text, reason, produced, _ = run_engine(model, tokenizer, long, SamplingParams(max_tokens=100))
    ref = generate(model, tokenizer, [long], max_new_tokens=8)[0]
    assert (text, reason, produced) == (ref.text, "length", 8)


def test_out_of_vocabulary_prompt_ids_are_a_400(server):
    """Token ids outside the vocabulary are refused where they enter, with the id named."""
    url = server[0] + "/v1/completions"
    for prompt, bad in (([1, 2, 300], 300), ([[5, 6], [7, -1]], -1), ([[5], [4, 3, 1000]], 1000)):
        for stream in (False, True):
            r = httpx.post(url, json={"model": NAME, "prompt": prompt, "max_tokens": 2, "stream": stream})
            error = assert_openai_error(r, 400, "prompt")
            assert f"token id {bad} is outside the vocabulary [0, 300)" in error["message"]
    assert httpx.get(server[0] + "/health").json()["active"] == 0  # nothing was queued


def test_engine_refuses_out_of_vocabulary_ids_and_a_mismatched_tokenizer_is_a_400(model_and_tokenizer):
    """The engine checks prompt ids at submit (a ScratchLMError, not a failed step), and the
    app answers any ScratchLMError with a JSON 400: here a tokenizer whose ids the model
    (a smaller vocabulary) does not have."""
    import torch

    from scratchlm import ModelConfig, Transformer
    from scratchlm.errors import ScratchLMError
    from scratchlm.serve.engine import Engine, SamplingParams, Sequence

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=1)
    with pytest.raises(ScratchLMError, match="token id 300 is outside"):
        engine.submit([Sequence([1, 300], SamplingParams(max_tokens=2), lambda e: None)])
    assert engine.queued == 0
    torch.manual_seed(0)
    small = Transformer(ModelConfig.preset("gpt-tiny", vocab_size=200, context_length=128)).eval()
    with ServerThread(create_app(small, tokenizer, NAME)) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": NAME, "max_tokens": 2, "messages": [
            {"role": "user", "content": "The quick brown fox"}]})
        error = assert_openai_error(r, 400)
        assert "is outside the vocabulary [0, 200)" in error["message"]


# ---- the command line -------------------------------------------------------------------
def test_cli_serve_mistakes_are_one_line(capsys):
    import socket

    from scratchlm.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv, says in ((["serve", "/no/such/model/dir", "--port", "0"], "/no/such/model/dir"),
                           (["serve", "gpt-tiny", "--port", port], "cannot listen"),
                           (["serve", "gpt-tiny", "--port", "0", "--chat-template", "nope"], "chat template")):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("scratchlm: error:") and says in err and "\n" not in err, err


def test_cli_serve_runs_a_saved_model(tmp_path, model_and_tokenizer):
    import socket

    from scratchlm.checkpoint import save_model

    model, tokenizer = model_and_tokenizer
    save_model(tmp_path / "run", model, tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "serve", str(tmp_path / "run"), "--port",
                             str(port), "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # stop waiting if it died

        assert wait_until(up, timeout=60) and proc.poll() is None, proc.stdout.read().decode()
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert c.models.list().data[0].id == "run"
        r = c.completions.create(model="run", prompt="The quick", max_tokens=10, temperature=0)
        assert r.choices[0].text == expected(model_and_tokenizer, "The quick", max_new_tokens=10).text
    finally:
        proc.terminate()
        proc.wait(10)
