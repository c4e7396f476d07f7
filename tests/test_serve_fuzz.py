"""Fuzzing the server in-process (its ASGI app, no sockets): random JSON bodies built from the
request schemas, with extreme values (huge integers, infinities, NaN, empty and nested lists,
wrong types, out-of-range token ids) in any field. After every single request: no 5xx, an
OpenAI-shaped error naming a field for a 4xx, and a normal request still succeeds. Then
Schemathesis checks the server against its own OpenAPI description."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from serve_utils import CHAT_TEMPLATE, start_server
from starlette.testclient import TestClient

from modgen.config import compose_config
from modgen.engine import Engine
from modgen.serve.app import create_app
from modgen.serve.protocol import ChatCompletionRequest, CompletionRequest
from modgen.serve.task import serve_config

ROUTES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
NORMAL = {"model": "mistral", "prompt": "w3 w4", "max_tokens": 2, "temperature": 0}
SAMPLING = ["max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "stop_token_ids", "n", "ignore_eos", "stream"]  # fmt: skip
VALID = {  # min_tokens: stop and EOS ids are banned in the sampler for the first token
    "/v1/completions": {"model": "mistral", "prompt": [5, 6, 7], "max_tokens": 3, "min_tokens": 1},
    "/v1/chat/completions": {"model": "mistral", "messages": [{"role": "user", "content": "w5"}]},
}
# small settings keep a valid request short: chat defaults to 4 tokens, the context to 64
SETTINGS = ["serve.default_max_tokens=4", "engine.max_model_len=64"]


def mostly(usual: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``usual`` four times in five."""
    return st.integers(0, 4).flatmap(lambda i: rare if i == 0 else usual)


HUGE = [2**63, 2**63 - 1, 2**64, 2**64 - 1, -(2**63) - 1, 10**30, -(10**30), 2**31]
INTS = st.integers(0, 5) | st.sampled_from(HUGE) | st.sampled_from([-2, -1, 95, 96, 97, 2**31])
EXTREME_FLOATS = [float("inf"), float("-inf"), float("nan"), 1e308, -1e308, 1e-320, -0.0]
NUMBERS = st.sampled_from(EXTREME_FLOATS) | st.floats(-3, 3) | INTS
TEXTS = st.sampled_from(["mistral", "w3 w4 w5", "", "w77", "text", "user"]) | st.text(max_size=6)
JUNK = st.recursive(
    st.none() | st.booleans() | INTS | NUMBERS | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=2),
    max_leaves=6,
)

SIMPLE = {"integer": INTS, "number": NUMBERS, "string": TEXTS, "boolean": st.booleans(),
          "null": st.none(), "object": st.dictionaries(TEXTS, JUNK, max_size=2)}  # fmt: skip


def from_schema(schema: dict, defs: dict, junk: bool) -> st.SearchStrategy:
    """Values of a JSON schema's types, extremes included (not only valid ones); with ``junk``,
    sometimes of another type, and objects sometimes miss a field or have an unknown one."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs, junk)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs, junk) for s in schema["anyOf"]])
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        typed = st.sampled_from(schema.get("enum", [schema.get("const")]))
    elif kind == "array":
        typed = st.lists(from_schema(schema.get("items", {}), defs, junk), max_size=3)
    elif kind == "object" and "properties" in schema:
        typed = bodies(schema, defs, junk)
    else:
        typed = SIMPLE.get(kind, JUNK)
    return mostly(typed, JUNK) if junk else typed


def bodies(schema: dict, defs: dict, junk: bool) -> st.SearchStrategy:
    """Objects of ``schema``: its required fields and any optional ones; with ``junk``, each
    required field only usually there and sometimes an unknown one."""
    props = schema["properties"]
    values = {k: from_schema(v, defs, junk) for k, v in props.items()}
    if "model" in values:
        values["model"] = mostly(st.just("mistral"), values["model"])
    required = schema.get("required", [])

    @st.composite
    def build(draw):
        body = {}
        for name in required:
            if not junk or draw(st.integers(0, 9)):
                body[name] = draw(values[name])
        for name in draw(st.lists(st.sampled_from(sorted(props)), max_size=4, unique=True)):
            body[name] = draw(values[name])
        if junk and not draw(st.integers(0, 9)):
            body[draw(TEXTS)] = draw(JUNK)
        return body

    return build()


def encoded(body: dict, data) -> bytes:
    text = json.dumps(body)  # NaN and Infinity as JavaScript spells them; pydantic reads them
    if data.draw(st.booleans(), label="1e400 for Infinity"):
        text = text.replace("-Infinity", "-1e400").replace("Infinity", "1e400")
    return text.encode()


@pytest.fixture(scope="module")
def app(checkpoints):
    cfg = compose_config(
        ["model=mistral", f"model.checkpoint={checkpoints['mistral']}", "+scheduler=splitfuse",
         "task=serve", f"serve.chat_template='{CHAT_TEMPLATE}'", *SETTINGS]
    )  # fmt: skip
    engine = Engine.from_config(cfg)
    with TestClient(create_app(engine, serve_config(cfg), "mistral")) as client:
        yield client, engine


def check_answer(r, body: dict, required: set[str]) -> None:
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert isinstance(err["param"], str), (body, err)
        assert err["param"] in body or err["param"] in required, (body, err)
    elif body.get("stream") is True:
        events = [line for line in r.text.split("\n") if line]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events
    else:
        assert r.json()["choices"], r.text


@settings(
    max_examples=400, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(path=st.sampled_from(sorted(ROUTES)), data=st.data())
def test_random_bodies_never_break_the_server(app, path, data):
    client, engine = app
    schema = ROUTES[path].model_json_schema()
    defs = schema.get("$defs", {})
    mode = data.draw(st.sampled_from(["junk", "typed", "few fields", "few fields"]), label="mode")
    if mode == "few fields":  # a valid request but for one to three fields: reaches the engine
        body = dict(VALID[path])
        names = st.lists(st.sampled_from(SAMPLING), min_size=1, max_size=3, unique=True)
        for name in data.draw(names, label="fields"):
            body[name] = data.draw(from_schema(schema["properties"][name], defs, False), label=name)
    else:
        body = data.draw(bodies(schema, defs, junk=mode == "junk"), label="body")
    r = client.post(path, content=encoded(body, data), headers={"content-type": "application/json"})
    check_answer(r, body, set(schema["required"]))
    event(f"{mode} {path} {r.status_code}")  # see --hypothesis-show-statistics
    ok = client.post("/v1/completions", json=NORMAL)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2, ok.text
    assert engine.is_healthy


EXTREMES = [
    *HUGE, -2, -1, 0, 1, 95, 96, 2**31, *EXTREME_FLOATS, True, None, "", "w3", "\x00", [], {},
    [[]], [1.5], [-1], [96], [2**63], [2**64], [0, 95], [float("nan")], [""], [None], {"": None},
]  # fmt: skip


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_every_field_with_every_extreme_value(app, path):
    """Each field of a valid request set, one at a time, to each extreme value (where the
    random search above may not land): the same checks, a normal request after each field."""
    client, engine = app
    schema = ROUTES[path].model_json_schema()
    for name in schema["properties"]:
        for value in EXTREMES:
            body = {**VALID[path], name: value}
            content = json.dumps(body).encode()
            r = client.post(path, content=content, headers={"content-type": "application/json"})
            check_answer(r, body, set(schema["required"]))
        assert client.post("/v1/completions", json=NORMAL).status_code == 200
        assert engine.is_healthy


def test_after_fuzzing_nothing_is_left_behind(app):
    client, engine = app
    assert client.get("/health").status_code == 200
    assert engine.kv.num_used_blocks == 0 and not engine.has_unfinished()


SCHEMATHESIS_TOML = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_nothing(checkpoints, tmp_path):
    """``schemathesis run`` against /openapi.json with every check, 25 examples an operation."""
    pytest.importorskip("schemathesis")
    served = start_server(checkpoints["mistral"], *SETTINGS)
    try:
        cmd = [
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(SCHEMATHESIS_TOML), "run", f"{served.url}/openapi.json",
            "--checks", "all", "--max-examples", "25", "--seed", "1", "--workers", "1",
        ]  # fmt: skip
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        served.thread.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert served.engine.kv.num_used_blocks == 0
