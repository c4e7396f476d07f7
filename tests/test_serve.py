"""The OpenAI-compatible server, in-process on a free loopback port, driven by the official
openai client and raw HTTP: outputs equal offline LLM.generate, streaming, errors, metrics,
disconnects, the queue limit, API keys and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import MAX_NEW
from serve_utils import CHAT_TEMPLATE, metric, slow_steps, start_server, wait_for

import modgen
from modgen import LLM, SamplingParams
from modgen.config import compose_config
from modgen.engine.async_engine import AsyncEngine, EngineHooks
from modgen.serve.task import serve_config

GREEDY = {"temperature": 0.0, "max_tokens": MAX_NEW, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(checkpoints):
    served = start_server(checkpoints["mistral"])
    yield served
    served.thread.stop()


@pytest.fixture(scope="module")
def offline(checkpoints):
    return LLM(
        "mistral", checkpoint=str(checkpoints["mistral"]), overrides=["+scheduler=splitfuse"]
    )


def client(url: str, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


def offline_texts(offline, prompts, **params) -> list[str]:
    sp = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, **params)
    return [o.text for o in offline.generate(prompts, sp)]


def chat_ids(offline, messages) -> list[int]:
    tok = offline.tokenizer
    text = tok.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    return tok.encode(text, add_special_tokens=False)


def test_completions_and_chat_match_offline(server, offline, prompts):
    c = client(server.url)
    want = offline_texts(offline, [prompts[3], "w5 w6 w7"])
    r = c.completions.create(model="mistral", prompt=[prompts[3], "w5 w6 w7"], **GREEDY)
    assert [ch.text for ch in r.choices] == want
    assert [ch.finish_reason for ch in r.choices] == ["length", "length"]
    assert r.usage.prompt_tokens == len(prompts[3]) + 3
    assert r.usage.completion_tokens == 2 * MAX_NEW

    messages = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w10 w11"}]
    [chat_want] = offline_texts(offline, [chat_ids(offline, messages)])
    r = c.chat.completions.create(model="mistral", messages=messages, **GREEDY)
    assert r.choices[0].message.content == chat_want and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, MAX_NEW)

    chunks = list(
        c.chat.completions.create(
            model="mistral", messages=messages, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    deltas = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(deltas) == chat_want and len([d for d in deltas if d]) == len(chat_want.split())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == MAX_NEW and not chunks[-1].choices
    models = c.models.list()
    assert [m.id for m in models.data] == ["mistral"]


def test_32_concurrent_streams_equal_offline_greedy(server, offline, prompts):
    batch = (prompts * 4)[:32]
    want = offline_texts(offline, batch)

    async def one(ac: openai.AsyncOpenAI, prompt) -> tuple[str, int, str | None]:
        stream = await ac.completions.create(model="mistral", prompt=prompt, stream=True, **GREEDY)
        pieces, reason = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(pieces), len(pieces), reason

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        async with ac:
            return await asyncio.gather(*(one(ac, p) for p in batch))

    results = asyncio.run(main())
    assert [text for text, _, _ in results] == want
    # an event per token (even one that decodes to no text); the last one says why it ended
    assert all(n == MAX_NEW for _, n, _ in results)
    assert all(reason == "length" for _, _, reason in results)
    assert server.engine.kv.num_used_blocks == 0 and not server.engine.requests


def test_stop_strings_stream_like_offline_and_n_choices_use_seeds(server, offline, prompts):
    c = client(server.url)
    [full] = offline_texts(offline, [prompts[4]])
    stop = " ".join(full.split()[3:5])  # two words in the middle of the greedy output
    [want] = offline_texts(offline, [prompts[4]], stop=[stop])
    assert want == full[: full.index(stop)]
    whole = c.completions.create(model="mistral", prompt=prompts[4], stop=stop, **GREEDY)
    streamed = c.completions.create(
        model="mistral", prompt=prompts[4], stop=stop, stream=True, **GREEDY
    )
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "stop"
    assert "".join(ch.choices[0].text for ch in streamed) == want

    r = c.completions.create(
        model="mistral", prompt=prompts[5], n=3, seed=7, temperature=1.0, max_tokens=MAX_NEW
    )
    seeded = [SamplingParams(max_tokens=MAX_NEW, temperature=1.0, seed=7 + i) for i in range(3)]
    outs = offline.generate([prompts[5]] * 3, seeded)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.text for ch in r.choices] == [o.text for o in outs]
    assert r.usage.prompt_tokens == len(prompts[5])
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in outs)


BAD = [
    (b"{not json", None, "malformed JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"prompt": "w3"}, "model", "missing"),
    ({"model": "mistral"}, "prompt", "missing"),
    ({"model": "mistral", "prompt": "w3", "max_tokens": "ten"}, "max_tokens", "integer"),
    ({"model": "mistral", "prompt": 3}, "prompt", "expected one of"),
    ({"model": "mistral", "prompt": "w3", "temprature": 0}, "temprature", "Unrecognized"),
    ({"model": "mistral", "prompt": "w3", "temperature": -1}, "temperature", ">= 0"),
    ({"model": "mistral", "prompt": "w3", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"model": "mistral", "prompt": "w3", "top_k": -5}, "top_k", "top_k"),
    ({"model": "mistral", "prompt": "w3", "n": 0}, "n", "n must be"),
    ({"model": "mistral", "prompt": "w3", "max_tokens": 0}, "max_tokens", ">= 1"),
    (
        {"model": "mistral", "prompt": "w3", "min_tokens": 20, "max_tokens": 5},
        "min_tokens",
        "exceed",
    ),
    ({"model": "mistral", "prompt": "w3", "stop": [""]}, "stop", "non-empty"),
    ({"model": "mistral", "prompt": "w3 " * 300}, "prompt", "context is 256"),
    ({"model": "mistral", "prompt": [5, 9999]}, "prompt", "vocabulary"),
    ({"model": "mistral", "prompt": ["w3", [1000]]}, "prompt", "prompt 1:"),
    ({"model": "mistral", "prompt": "w3", "logprobs": 2}, "logprobs", "not supported"),
    ({"model": "mistral", "prompt": "w3", "priority": "high"}, "priority", "integer"),
    ({"model": "mistral", "prompt": "w3", "priority": 1.5}, "priority", "integer"),
]
BAD_CHAT = [
    ({"model": "mistral", "messages": [{"role": "wizard", "content": "w3"}]}, "messages", "role"),
    ({"model": "mistral", "messages": []}, "messages", "empty"),
    ({"model": "mistral", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages", "messages.0.content"),
]  # fmt: skip


def test_bad_requests_get_openai_errors_naming_the_field(server):
    with httpx.Client(base_url=server.url) as http:
        for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
            for body, param, words in cases:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = http.post(path, content=content, headers={"content-type": "application/json"})
                err = r.json()["error"]
                assert r.status_code == 400, (body, r.text)
                assert err["param"] == param and err["type"] == "invalid_request_error", err
                assert words in err["message"], err
        r = http.post("/v1/completions", json={"model": "gpt-4", "prompt": "w3"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
        metrics = http.get("/metrics").text
    assert metric(metrics, "modgen_requests_rejected_total", 'reason="bad_request"') >= len(BAD)
    r = client(server.url).completions.create(model="mistral", prompt="w3 w4", **GREEDY)
    assert r.usage.completion_tokens == MAX_NEW and r.choices[0].text  # still serving


def test_priority_reaches_the_engine(server, monkeypatch):
    seen = []
    add = server.engine.add_request

    def spy(*args, **kwargs):
        seq = add(*args, **kwargs)
        seen.append(seq.priority)
        return seq

    monkeypatch.setattr(server.engine, "add_request", spy)
    c = client(server.url)
    c.completions.create(model="mistral", prompt="w3", **{**GREEDY, "extra_body": {
        "ignore_eos": True, "priority": -2}})  # fmt: skip
    c.completions.create(model="mistral", prompt="w3", **GREEDY)
    assert seen == [-2, 0]


def test_metrics_count_tokens_and_latencies(server, prompts):
    def scrape() -> str:
        return httpx.get(f"{server.url}/metrics").text

    before = scrape()
    c = client(server.url)
    for p in prompts[:3]:
        c.completions.create(model="mistral", prompt=p, **GREEDY)
    after = scrape()

    def grew(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    assert grew("modgen_prompt_tokens_total") == sum(len(p) for p in prompts[:3])
    assert grew("modgen_generation_tokens_total") == 3 * MAX_NEW
    assert grew("modgen_time_to_first_token_seconds_count") == 3
    assert grew("modgen_inter_token_latency_seconds_count") == 3 * (MAX_NEW - 1)
    assert grew("modgen_e2e_request_latency_seconds_count") == 3
    assert grew("modgen_requests_finished_total", 'finish_reason="length"') == 3
    assert grew("modgen_engine_steps_total") >= MAX_NEW
    for name in ("modgen_num_requests_running", "modgen_num_requests_waiting",
                 "modgen_kv_cache_usage_ratio", "modgen_num_preemptions_total"):  # fmt: skip
        assert f"\n{name} " in after


def test_a_disconnected_stream_is_aborted_and_frees_its_blocks(server, prompts):
    def scrape(name: str, labels: str = "") -> float:
        return metric(httpx.get(f"{server.url}/metrics").text, name, labels)

    aborted = scrape("modgen_requests_finished_total", 'finish_reason="abort"')
    body = {"model": "mistral", "prompt": prompts[7], "max_tokens": 150, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with slow_steps(server.engine, 0.02):  # 150 tokens would take > 3 s
        with (
            httpx.Client(timeout=10) as http,
            http.stream("POST", f"{server.url}/v1/completions", json=body) as r,
        ):
            events = r.iter_lines()
            got = [line for line, _ in zip(events, range(5), strict=False) if line]
            assert got and all(line.startswith("data: {") for line in got)
            assert scrape("modgen_kv_cache_used_blocks") > 0
            assert scrape("modgen_num_requests_running") == 1
            t0 = time.monotonic()
        # the connection is closed here
        wait_for(lambda: scrape("modgen_kv_cache_used_blocks") == 0, timeout=2.0)
        freed_after = time.monotonic() - t0
    assert scrape("modgen_num_requests_running") == 0
    assert scrape("modgen_requests_finished_total", 'finish_reason="abort"') == aborted + 1
    assert freed_after < 1.0 and server.engine.kv.num_used_blocks == 0


def test_a_request_failing_in_the_engine_fails_alone(server, offline, prompts, monkeypatch):
    engine = server.engine
    stop_reason = engine._stop_reason

    def fail_on_marker(seq, token):
        if seq.prompt_token_ids[:2] == [1, 1]:  # the marker of the request to fail
            raise RuntimeError("injected failure")
        return stop_reason(seq, token)

    monkeypatch.setattr(engine, "_stop_reason", fail_on_marker)
    want = offline_texts(offline, prompts[:4])

    async def main():
        ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

        async def good(p):
            return (
                (await ac.completions.create(model="mistral", prompt=p, **GREEDY)).choices[0].text
            )

        async def bad(stream: bool):
            r = await ac.completions.create(
                model="mistral", prompt=[1, 1, 5, 6], stream=stream, **GREEDY
            )
            if stream:
                async for _ in r:
                    pass

        async with ac:
            return await asyncio.gather(
                *(good(p) for p in prompts[:4]), bad(False), bad(True), return_exceptions=True
            )

    *texts, plain, streamed = asyncio.run(main())
    assert texts == want
    assert isinstance(plain, openai.InternalServerError) and "injected failure" in str(plain)
    assert isinstance(streamed, openai.APIError) and "injected failure" in str(streamed)
    assert engine.kv.num_used_blocks == 0 and not engine.requests


def test_queue_limit_gives_429_with_a_clear_body(checkpoints, prompts):
    served = start_server(checkpoints["mistral"], "serve.max_queued=2")
    body = {"model": "mistral", "prompt": prompts[2], "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    try:
        with slow_steps(served.engine, 0.02), httpx.Client(timeout=20) as http:
            with (
                http.stream("POST", f"{served.url}/v1/completions", json=body) as a,
                http.stream("POST", f"{served.url}/v1/completions", json=body) as b,
            ):
                assert a.status_code == b.status_code == 200
                full = http.post(f"{served.url}/v1/completions", json={**body, "stream": False})
                many = client(served.url).completions
                with pytest.raises(openai.RateLimitError, match="limit 2"):
                    many.create(model="mistral", prompt="w3", max_tokens=2)
                texts = [list(a.iter_lines()), list(b.iter_lines())]
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            err = full.json()["error"]
            assert err["code"] == "queue_full" and "limit 2" in err["message"]
            assert all(t[-2] == "data: [DONE]" for t in texts)
            ok = http.post(f"{served.url}/v1/completions", json={**body, "stream": False, "n": 2})
            assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
            r = http.post(f"{served.url}/v1/completions", json={**body, "stream": False, "n": 3})
            assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # can never fit
    finally:
        served.thread.stop()


def test_api_keys_guard_every_v1_route(checkpoints):
    served = start_server(checkpoints["mistral"], "serve.api_keys=[sekrit,other]")
    try:
        with httpx.Client(base_url=served.url) as http:
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions")):  # fmt: skip
                for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekrit"}):
                    r = http.request(method, path, json={}, headers=headers)
                    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(served.url, key="wrong").models.list()
        r = client(served.url, key="other").completions.create(
            model="mistral", prompt="w3", **GREEDY
        )
        assert r.choices[0].finish_reason == "length"
    finally:
        served.thread.stop()


def test_binding_beyond_loopback_is_an_explicit_choice():
    cfg = compose_config(["task=serve", "serve.host=0.0.0.0"])
    with pytest.raises(Exception, match="allow_remote"):
        serve_config(cfg)
    cfg = compose_config(["task=serve", "serve.host=0.0.0.0", "serve.allow_remote=true"])
    assert serve_config(cfg).host == "0.0.0.0"
    assert serve_config(compose_config(["task=serve"])).host == "127.0.0.1"


def test_drain_finishes_short_requests_and_aborts_long_ones(checkpoints, prompts):
    served = start_server(checkpoints["mistral"], "serve.grace_period_s=1.0")
    url = f"{served.url}/v1/completions"

    def body(n):
        return {"model": "mistral", "prompt": prompts[1], "max_tokens": n, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip

    with slow_steps(served.engine, 0.02), httpx.Client(timeout=20) as http:
        with (
            http.stream("POST", url, json=body(20)) as short,
            http.stream("POST", url, json=body(200)) as long,
        ):
            short_lines, long_lines = short.iter_lines(), long.iter_lines()
            first = [next(short_lines), next(long_lines)]
            t0 = time.monotonic()
            served.thread.drain()  # what SIGTERM does
            wait_for(lambda: not served.state.healthy, timeout=1.0)
            short_events = [line for line in short_lines if line]
            long_events = [line for line in long_lines if line]
        served.thread.stop(timeout=10)
        stopped_after = time.monotonic() - t0
    assert all(f.startswith("data: {") for f in first)
    assert short_events[-1] == "data: [DONE]" and '"finish_reason":"length"' in short_events[-2]
    assert long_events[-1] == "data: [DONE]" and '"code":"aborted"' in long_events[-2]
    assert stopped_after < 1.0 + 3.0
    assert not served.thread.is_alive and served.engine.kv.num_used_blocks == 0
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json=body(2))


def test_pipeline_returns_responses_like_llm_generate(checkpoints, offline, prompts):
    pipe = modgen.pipeline("mistral", checkpoint=str(checkpoints["mistral"]))
    responses = pipe(
        [prompts[0], "w5 w6"], max_new_tokens=MAX_NEW, do_sample=False, ignore_eos=True
    )
    want = offline.generate(
        [prompts[0], "w5 w6"], SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    )
    assert [r.generated_text for r in responses] == [o.text for o in want]
    assert [r.token_ids for r in responses] == [o.token_ids for o in want]
    assert [(r.prompt_length, r.generated_length) for r in responses] == [
        (len(prompts[0]), MAX_NEW), (2, MAX_NEW)
    ]  # fmt: skip
    assert responses[1].finish_reason == "length" and str(responses[0]) == want[0].text
    full = pipe("w5 w6", max_new_tokens=3, do_sample=False, return_full_text=True)[0]
    assert full.generated_text.startswith("w5 w6") and full.generated_length == 3
    with pytest.raises(TypeError, match="max_new_token"):
        pipe("w5", max_new_token=3)


def test_async_engine_hooks_see_every_step_and_finish_and_stats_stay_bounded(offline, prompts):
    class Recorder(EngineHooks):
        def __init__(self):
            self.steps, self.finished = 0, []

        def on_step(self, stats):
            self.steps += 1

        def on_finish(self, output):
            self.finished.append(output.finish_reason)

    engine, hooks = offline.engine, Recorder()
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)

    async def main():
        aengine = AsyncEngine(engine, hooks=hooks, max_step_stats=3)
        steps_before = len(engine.stats)

        async def collect(prompt):
            return [o async for o in aengine.generate(prompt, params)]

        outs = await asyncio.gather(*(collect(p) for p in prompts[:2]))
        await aengine.shutdown()
        return outs, steps_before

    (a, b), steps_before = asyncio.run(main())
    assert a[-1].finished and b[-1].finished
    assert hooks.finished == ["length", "length"]
    assert hooks.steps >= MAX_NEW and len(engine.stats) == 3 <= steps_before + hooks.steps
