"""The server's door (scratchlm/serve/security.py): what a web page, a slow client or a
careless flag cannot do. The app runs in-process (FastAPI's TestClient) except for the
timeout test, which needs real sockets and a real uvicorn."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from scratchlm.generate import generate  # noqa: E402
from scratchlm.serve import create_app  # noqa: E402
from serve_fixtures import ServerThread, tiny_model_and_tokenizer  # noqa: E402

NAME = "tiny"
pytestmark = pytest.mark.timeout(120)
BODY = {"model": NAME, "prompt": "The quick", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def local():
    """The default server, reached as http://127.0.0.1 (the Host a local client sends)."""
    model, tokenizer = tiny_model_and_tokenizer()
    with TestClient(create_app(model, tokenizer, NAME), base_url="http://127.0.0.1") as client:
        yield client


def error_of(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code is None or error["code"] == code, error
    return error


# ---- DNS rebinding: the Host header ---------------------------------------------------------------
def test_a_foreign_host_is_refused_and_local_names_are_answered(local):
    model, tokenizer = tiny_model_and_tokenizer()
    want = generate(model, tokenizer, "The quick", max_new_tokens=4)[0].text
    # A DNS-rebinding page reaches 127.0.0.1 under its own name: every route refuses it, the page too.
    for method, path in (("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
        r = local.request(method, path, json=BODY, headers={"Host": "attacker.example:8000"})
        assert "attacker.example" in error_of(r, 403, "host_not_allowed")["message"]
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "localhost."):
        r = local.post("/v1/completions", json=BODY, headers={"Host": host})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (host, r.text)
    assert local.get("/", headers={"Host": "localhost:8000"}).text.startswith("<!")  # the chat page


def test_allowed_hosts_and_the_bound_address():
    model, tokenizer = tiny_model_and_tokenizer()
    app = create_app(model, tokenizer, NAME, host="10.1.2.3", allowed_hosts=["models.example.com"])
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for host, status in (("10.1.2.3:8000", 200), ("models.example.com", 200), ("Models.Example.Com:443", 200),
                             ("127.0.0.1", 200), ("evil.example.com", 403), ("10.1.2.4", 403), ("", 403)):
            assert client.get("/health", headers={"Host": host}).status_code == status, host
    # 0.0.0.0 is not a name: bound to it, only the local names (and --allowed-host) are answered.
    with TestClient(create_app(model, tokenizer, NAME, host="0.0.0.0"), base_url="http://127.0.0.1") as client:
        assert client.get("/health", headers={"Host": "0.0.0.0:8000"}).status_code == 403
        assert client.get("/health", headers={"Host": "192.168.1.9:8000"}).status_code == 403
    with TestClient(create_app(model, tokenizer, NAME, allowed_hosts=["*"]), base_url="http://127.0.0.1") as client:
        assert client.get("/health", headers={"Host": "anything.example"}).status_code == 200


# ---- cross-site requests: Origin and content type ----------------------------------------------------
def test_a_cross_origin_form_post_is_refused(local):
    """What a page on another site can send without the browser asking (no CORS preflight):
    a form, a text/plain body, a body with no type. All refused before any generation."""
    steps = local.app.state.engine.steps
    payload = json.dumps(BODY)
    simple = [({"Content-Type": "application/x-www-form-urlencoded"}, "prompt=hi&model=tiny"),
              ({"Content-Type": "text/plain"}, payload),
              ({"Content-Type": "text/plain; charset=utf-8"}, payload),
              ({"Content-Type": "multipart/form-data; boundary=x"}, "--x\r\n\r\nhi\r\n--x--"),
              ({}, payload)]
    for path in ("/v1/completions", "/v1/chat/completions"):
        for headers, content in simple:
            r = local.post(path, content=content, headers=headers)
            error_of(r, 415, "unsupported_media_type")
            # ...and from another origin it is refused for its origin first.
            r = local.post(path, content=content, headers={**headers, "Origin": "https://attacker.example"})
            assert "attacker.example" in error_of(r, 403, "origin_not_allowed")["message"]
    # JSON from another origin (a browser would have asked first, and been told nothing) is refused too.
    r = local.post("/v1/completions", json=BODY, headers={"Origin": "http://localhost:3000"})
    error_of(r, 403, "origin_not_allowed")
    error_of(local.post("/v1/completions", json=BODY, headers={"Origin": "null"}), 403, "origin_not_allowed")
    assert local.app.state.engine.steps == steps  # none of it reached the model


def test_the_chat_page_origin_and_json_with_a_charset_are_accepted(local):
    """The chat page at / calls the API from this server's own origin."""
    page = local.get("/").text
    assert "application/json" in page  # what the page sends
    r = local.post("/v1/chat/completions", headers={"Origin": "http://127.0.0.1", "Content-Type":
                   "application/json; charset=utf-8"}, content=json.dumps(
        {"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    # GETs need no content type.
    assert local.get("/v1/models", headers={"Origin": "http://127.0.0.1"}).status_code == 200


# ---- the API key -------------------------------------------------------------------------------------
def test_an_empty_api_key_is_refused_not_taken_as_no_key():
    from scratchlm.errors import ScratchLMError

    model, tokenizer = tiny_model_and_tokenizer()
    for key in ("", "   ", " padded ", "tab\tkey", "clé"):
        with pytest.raises(ScratchLMError, match="API key"):
            create_app(model, tokenizer, NAME, api_key=key)
    with TestClient(create_app(model, tokenizer, NAME, api_key="sk-1"), base_url="http://127.0.0.1") as client:
        error_of(client.post("/v1/completions", json=BODY), 401, "invalid_api_key")
        error_of(client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer "}), 401)
        assert client.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer sk-1"}).status_code == 200


def test_cli_api_key_from_the_environment_and_empty_keys(monkeypatch, capsys):
    """`--api-key ""` and an empty SCRATCHLM_API_KEY are one-line errors before the model
    loads; a key in SCRATCHLM_API_KEY (kept out of `ps`) reaches the server."""
    import scratchlm.serve
    from scratchlm.cli import main

    got = {}
    monkeypatch.setattr(scratchlm.serve, "serve", lambda *a, **kw: got.update(kw))
    monkeypatch.setattr(scratchlm.serve, "load_for_serving", lambda ref: tiny_model_and_tokenizer())
    monkeypatch.delenv("SCRATCHLM_API_KEY", raising=False)
    for argv, env, says in ((["--api-key", ""], None, "--api-key is empty"),
                            (["--api-key", "  "], None, "--api-key is empty"),
                            ([], "", "SCRATCHLM_API_KEY is set but empty"),
                            (["--api-key", "a\tb"], None, "printable ASCII")):
        if env is not None:
            monkeypatch.setenv("SCRATCHLM_API_KEY", env)
        assert main(["serve", "gpt-tiny", "--port", "0", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("scratchlm: error:") and says in err and "\n" not in err, err
        assert not got  # refused before serving
        monkeypatch.delenv("SCRATCHLM_API_KEY", raising=False)
    monkeypatch.setenv("SCRATCHLM_API_KEY", "sk-from-env")
    assert main(["serve", "gpt-tiny", "--port", "0"]) == 0
    assert got["api_key"] == "sk-from-env"
    assert main(["serve", "gpt-tiny", "--port", "0", "--api-key", "sk-flag", "--allowed-host", "box.lan",
                 "--allowed-host", "10.0.0.2"]) == 0
    assert got["api_key"] == "sk-flag" and got["allowed_hosts"] == ["box.lan", "10.0.0.2"]
    monkeypatch.delenv("SCRATCHLM_API_KEY")
    assert main(["serve", "gpt-tiny", "--port", "0"]) == 0 and got["api_key"] is None
    for bad in ("0", "-1", "nan", "inf"):
        assert main(["serve", "gpt-tiny", "--port", "0", "--read-timeout", bad]) == 2
        assert "--read-timeout" in capsys.readouterr().err


# ---- slow clients ------------------------------------------------------------------------------------
def test_a_slow_client_is_disconnected_within_the_read_timeout(tmp_path):
    """A real uvicorn (in a thread) with a 1 s read timeout: a client that opens a connection
    and says nothing, one that sends its headers a byte at a time, and one that never
    finishes its body are all cut off within about that time; the server stays healthy."""
    model, tokenizer = tiny_model_and_tokenizer()
    with ServerThread(create_app(model, tokenizer, NAME, read_timeout=1.0)) as url:
        host, port = url.removeprefix("http://").split(":")

        def held_for(send_slowly) -> float:
            """Seconds until the server closes the connection while send_slowly dribbles."""
            with socket.create_connection((host, int(port)), timeout=10) as s:
                t0 = time.monotonic()
                s.settimeout(0.1)
                for piece in send_slowly:
                    try:
                        s.sendall(piece)
                        data = s.recv(65536)
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        return time.monotonic() - t0
                    if data == b"" or data.startswith(b"HTTP/1.1 408"):
                        return time.monotonic() - t0
                return float("inf")

        def dribble(data: bytes, every: float):
            for i in range(len(data)):
                time.sleep(every)
                yield data[i:i + 1]
            while True:  # then say nothing more
                time.sleep(every)
                yield b""

        silent = held_for(dribble(b"", 0.1))
        headers = held_for(dribble(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200, 0.05))
        body = json.dumps(BODY).encode()
        start = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode()

        def slow_body():
            yield start
            yield from dribble(body[:-1], 0.05)  # never the last byte

        held_body = held_for(slow_body())
        for held in (silent, headers, held_body):
            assert 0.8 < held < 4.0, (silent, headers, held_body)
        assert httpx.get(url + "/health").json()["status"] == "ok"
        # A client that takes its time but stays within the limit is served.
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(start)
            time.sleep(0.3)
            s.sendall(body)
            reply = s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")


def test_cli_serve_answers_with_its_security_defaults(tmp_path):
    """The real command in a subprocess: a foreign Host and a text/plain POST are refused;
    the key comes from the environment."""
    import os

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SCRATCHLM_API_KEY": "sk-env"}
    proc = subprocess.Popen([sys.executable, "-m", "scratchlm.cli", "serve", "gpt-tiny", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()
        assert "sk-env" not in " ".join(proc.args)  # not on the command line, so not in `ps`
        key = {"Authorization": "Bearer sk-env"}
        body = {"model": "gpt-tiny", "prompt": [1, 2, 3], "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        assert httpx.post(url + "/v1/completions", json=body, headers=key).status_code == 200
        assert httpx.post(url + "/v1/completions", json=body, headers={**key, "Host": "evil.example"}).status_code == 403
        r = httpx.post(url + "/v1/completions", content=json.dumps(body), headers={**key, "Content-Type": "text/plain"})
        assert r.status_code == 415
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_read_timeout_never_cuts_a_reply_in_progress():
    """Two pipelined requests on one connection, the second a generation that takes longer
    than the read timeout: both answers arrive whole (the timer only watches for headers)."""
    from serve_fixtures import slowed_down

    model, tokenizer = tiny_model_and_tokenizer()
    with ServerThread(create_app(slowed_down(model, 0.04), tokenizer, NAME, read_timeout=0.5)) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({**BODY, "max_tokens": 40}).encode()
        requests = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(requests)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert time.monotonic() - t0 > 1.0  # the generation outlasted the timeout...
        assert reply.count(b"HTTP/1.1 200 OK") == 2, reply[:300]  # ...and was answered in full
        answer = json.loads(reply.rsplit(b"\r\n\r\n", 1)[1])
        assert answer["usage"]["completion_tokens"] == 40


def test_cli_serve_option_mistakes_are_one_line(monkeypatch, capsys, tmp_path):
    """Each of `serve`'s options at 0, negative, NaN, inf, huge or the wrong type: one line
    on stderr, exit 2, and no server started."""
    import scratchlm.serve
    from scratchlm.cli import main

    started = []
    monkeypatch.setattr(scratchlm.serve, "serve", lambda *a, **kw: started.append(kw))
    monkeypatch.delenv("SCRATCHLM_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    cases = [["--port", v] for v in ("-1", "70000", "abc", "nan")]
    cases += [[flag, v] for flag in ("--max-batch", "--max-queue", "--max-body-bytes", "--rag-k")
              for v in ("0", "-3", "nan", "inf", "1e30", "x")]
    cases += [["--read-timeout", v] for v in ("0", "-1", "nan", "inf", "-inf", "x")]
    cases += [["--allowed-host", ""], ["--allowed-host", " "], ["--host", "no such host .invalid"],
              ["--rag-index", str(tmp_path / "missing")], ["--log-level", "loud"],
              ["--rag-mode", "psychic"]]
    models = ["run2/latest", str(tmp_path), "", "owner/name/extra"]
    tried = 0
    for argv in [["gpt-tiny", "--port", "0", *c] for c in cases] + [[m, "--port", "0"] for m in models]:
        tried += 1
        try:
            code = main(["serve", *argv])
        except SystemExit as e:  # argparse's own refusals exit from inside main
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("scratchlm") and "error" in err and "\n" not in err and "Traceback" not in err, (argv, err)
    assert not started and tried == len(cases) + len(models)
