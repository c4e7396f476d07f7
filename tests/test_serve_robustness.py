"""No request can kill the server: the requests that once stopped the engine for good, bounded
bodies (size and read deadline), preparation off the event loop, errors naming the right
field, engine failures (isolated, then fatal: /health 503 and a non-zero exit), and the
OpenAPI description."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from serve_utils import slow_steps, start_server, wait_for, wait_until_serving

OK = {"model": "mistral", "prompt": "w3 w4", "max_tokens": 2}
ONCE_FATAL = [  # each of these stopped the engine loop for good (issue 10)
    ({**OK, "seed": 18446744073709551616}, 400, "seed"),
    ({**OK, "seed": 18446744073709551615, "n": 2}, 400, "seed"),
    ({**OK, "top_k": 9223372036854775808}, 200, None),
    ({**OK, "min_tokens": 1, "stop_token_ids": [999999]}, 400, "stop_token_ids"),
]


@pytest.fixture(scope="module")
def server(checkpoints):
    served = start_server(
        checkpoints["mistral"], "serve.max_body_mb=0.05", "serve.body_timeout_s=0.5"
    )
    yield served
    served.thread.stop()


def post(url: str, body: dict | bytes, path: str = "/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30, **kw)


def assert_serving(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    r = post(url, OK)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(("body", "status", "param"), ONCE_FATAL)
def test_requests_that_once_stopped_the_engine_are_answered(server, body, status, param):
    r = post(server.url, body)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == param
    assert_serving(server.url)
    assert server.engine.is_healthy


BAD_VALUES = [
    (b'{"model":"mistral","prompt":"w3","temperature":1e400}', "temperature", "finite"),
    (b'{"model":"mistral","prompt":"w3","temperature":NaN}', "temperature", "finite"),
    (b'{"model":"mistral","prompt":"w3","top_p":Infinity}', "top_p", "(0, 1]"),
    ({**OK, "max_tokens": 10**9}, "max_tokens", "leave room for 254"),
    ({**OK, "stop_token_ids": [-1], "min_tokens": 1}, "stop_token_ids", "[-1]"),
    ({**OK, "prompt": [1.5]}, "prompt", "expected one of string, array of integer"),
    ({**OK, "prompt": ["w3"] * 300}, "prompt", "300 prompt(s)"),
    ({**OK, "prompt": "w3 " * 700}, "prompt", "2100 characters"),
    ({**OK, "n": 300}, "n", "n must be"),
]
BAD_CHAT = [
    ({"model": "mistral", "messages": [{"role": "user", "content": 5}]}, "messages",
     "'messages.0.content' (5): expected one of string, array of TextPart"),
    ({"model": "mistral", "messages": [{"role": "user", "content": "w3"}],
      "max_completion_tokens": -1}, "max_completion_tokens", "max_completion_tokens must be"),
    ({"model": "mistral", "messages": [{"role": "user", "content": "w3"}],
      "max_completion_tokens": 10**9}, "max_completion_tokens", "leave room"),
    ({"model": "mistral", "messages": [{"role": "user", "content": "w3 " * 700}]}, "messages",
     "characters"),
    ({"model": "mistral", "messages": [{"role": "user", "content": "w3 " * 300}]}, "messages",
     "as the chat template renders them"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [("/v1/completions", *case) for case in BAD_VALUES]
    + [("/v1/chat/completions", *case) for case in BAD_CHAT],
)
def test_bad_values_get_400_naming_the_right_field(server, path, body, param, words):
    r = post(server.url, body, path)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param, err
    assert words in err["message"], err


def test_bodies_are_bounded_in_size_and_in_time(server):
    big = {**OK, "prompt": "w3 " * 20_000}  # 60 kB > serve.max_body_mb=0.05
    r = post(server.url, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert r.headers["connection"] == "close"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 2000

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413

    def exchange(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as s:
            s.settimeout(20)
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):  # until the server closes the connection
                data += chunk
        return data

    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    answer = exchange(head + b"content-length: 1000000000\r\n\r\n")  # refused unread
    assert answer.startswith(b"HTTP/1.1 413")
    answer = exchange(head + b'content-length: 100\r\n\r\n{"mo')  # then nothing more
    assert answer.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in answer
    assert_serving(server.url)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_preparing_a_request_never_blocks_the_event_loop(server, prompts, route):
    """While one request is being tokenized (or chat-templated), streams go on and /health
    answers: the work is done off the event loop."""
    tok = server.engine.tokenizer
    name = "encode" if route == "completions" else "apply_chat_template"
    original = getattr(tok, name)
    entered, release = threading.Event(), threading.Event()

    def held(text, *args, **kwargs):
        if "w77" in str(text):
            entered.set()
            release.wait(30)
        return original(text, *args, **kwargs)

    setattr(tok, name, held)
    stream = {"model": "mistral", "prompt": prompts[2], "max_tokens": 60, "temperature": 0,
              "ignore_eos": True, "stream": True}  # fmt: skip
    if route == "chat":
        path, body = (
            "/v1/chat/completions",
            {"model": "mistral", "max_tokens": 2, "messages": [{"role": "user", "content": "w77"}]},
        )
    else:
        path, body = "/v1/completions", {**OK, "prompt": "w77 w78"}
    held_request = threading.Thread(target=post, args=(server.url, body, path))
    try:
        with (
            slow_steps(server.engine, 0.01),
            httpx.Client(timeout=10) as http,
            http.stream("POST", f"{server.url}/v1/completions", json=stream) as r,
        ):
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: {")
            held_request.start()
            assert entered.wait(10)
            health = http.get(f"{server.url}/health")  # would time out on a blocked loop
            more = [next(lines) for _ in range(5)]
            release.set()
            rest = list(lines)
        assert health.status_code == 200
        assert all(line.startswith("data: {") for line in more) and rest[-1] == "data: [DONE]"
    finally:
        release.set()
        held_request.join(30)
        delattr(tok, name)


def test_errors_keep_their_headers_and_the_openapi_description_is_complete(server):
    r = httpx.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest")):  # fmt: skip
        op = spec["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}" and model in schemas
        assert {"400", "401", "404", "408", "413", "429", "500", "503"} <= set(op["responses"])
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        err = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert err.endswith("/ErrorResponse")
    assert {"ChatMessage", "TextPart", "StreamOptions", "ErrorDetail"} <= set(schemas)
    seed = schemas["CompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")


def test_repeated_engine_failures_make_health_fail(checkpoints, prompts):
    served = start_server(checkpoints["mistral"], "engine.max_failed_steps=2")
    try:

        def broken(plan, banned):
            raise RuntimeError("injected broken device")

        served.engine.executor.execute = broken
        for _ in range(2):  # each fails alone (500 naming the cause) ...
            r = post(served.url, OK)
            assert r.status_code == 500 and "injected broken device" in r.json()["error"]["message"]
        # ... and two in a row mean the engine is broken: it says so and takes nothing more
        wait_for(lambda: httpx.get(f"{served.url}/health").status_code == 503, timeout=5)
        assert httpx.get(f"{served.url}/health").json()["status"] == "engine failed"
        r = post(served.url, OK)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    finally:
        served.thread.stop()


DRIVER = """
import sys
from modgen.plugins.executors.model import ModelExecutor

def broken(self, plan, banned):
    raise RuntimeError("injected broken device")

ModelExecutor.execute = broken
from modgen.cli import main

main()
"""


def test_a_failed_engine_makes_the_server_exit_non_zero(checkpoints, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "task=serve", f"serve.port={port}", "model=mistral",
        f"model.checkpoint={checkpoints['mistral']}", "+scheduler=splitfuse",
        "engine.max_failed_steps=2", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, log)
        statuses = [post(url, OK).status_code for _ in range(2)]
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert statuses == [500, 500]
    assert code != 0, log.read_text()
    assert "exiting non-zero so that it is restarted" in log.read_text()
