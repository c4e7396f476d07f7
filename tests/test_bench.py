"""Benchmark methodology: metric definitions on hand-made timelines, load modes, workloads,
the OpenAI-URL target, and a tiny multirun that writes its comparison."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import statistics
import subprocess
import sys

import httpx
import pytest

from modgen import registry
from modgen.bench.loadgen import LoadGenerator, arrival_times
from modgen.bench.metrics import (
    GoodputConfig,
    RequestRecord,
    SLAConfig,
    ema_max,
    meets_sla,
    percentile,
    summarize,
)
from modgen.bench.targets import OpenAITarget, Target
from modgen.workload import RequestSpec


def rec(prompt: int, times: list[float], send: float = 0.0) -> RequestRecord:
    return RequestRecord(prompt, len(times), send, list(times), finish_time=times[-1])


def test_request_metrics_on_a_hand_made_timeline():
    r = rec(512, [0.5, 0.6, 0.7, 1.0])
    assert r.ttft == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.5 / 3)
    assert r.itls == pytest.approx([0.1, 0.1, 0.3])
    assert r.e2e == pytest.approx(1.0)
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert math.isnan(percentile([], 50))


def test_fastgen_sla_uses_prompt_rate_and_an_ema_of_token_gaps():
    sla = SLAConfig(prompt_rate=512, gen_rate=4, ema_span=16)  # TTFT <= n/512 s, EMA <= 0.25 s
    alpha = 2 / 17
    assert ema_max([0.1, 0.1, 0.3], 16) == pytest.approx(0.1 + alpha * 0.2)
    assert meets_sla(rec(512, [0.5, 0.6, 0.7, 1.0]), sla)
    assert not meets_sla(rec(512, [1.5, 1.6]), sla)  # TTFT 1.5 s > 512 / 512 s
    spike = [0.2 + 0.1 * i for i in range(10)] + [2.0] + [2.0 + 0.1 * i for i in range(1, 10)]
    assert meets_sla(rec(512, spike), sla)  # one 1.1 s gap: EMA 0.1 + 1.0 * 2/17 < 0.25
    slow = [0.2 + 0.5 * i for i in range(10)]  # every gap 0.5 s: the EMA reaches 0.5
    assert not meets_sla(rec(512, slow), sla)
    failed = rec(512, [0.5])
    failed.error = "boom"
    assert not meets_sla(failed, sla)


def test_run_summary_effective_throughput_and_goodput():
    good = rec(512, [0.5, 0.6, 0.7])
    late = rec(512, [3.0, 3.1, 3.2])
    summary = summarize([good, late], wall_time=4.0, goodput=GoodputConfig(ttft_s=1.0))
    assert summary["completed"] == 2 and summary["output_tokens"] == 6
    assert summary["sla_fraction"] == 0.5
    assert summary["effective_throughput"] == pytest.approx(1 / 4.0)
    assert summary["goodput"] == pytest.approx(1 / 4.0)
    assert summary["ttft_p50_s"] == pytest.approx(1.75)
    assert summary["itl_p99_s"] == pytest.approx(0.1)
    assert summary["request_throughput"] == pytest.approx(0.5)


class SleepTarget(Target):
    """Answers after ``delay`` seconds with ``output_len`` tokens."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def send(self, spec, rec):
        await asyncio.sleep(self.delay)
        loop = asyncio.get_running_loop()
        rec.token_times = [loop.time()] * spec.output_len
        rec.finish_time = rec.send_time + self.delay


def specs(n: int) -> list[RequestSpec]:
    return [RequestSpec([1] * (i + 1), 2) for i in range(n)]


def test_closed_loop_keeps_exactly_n_clients_busy():
    gen = LoadGenerator(SleepTarget(0.01))
    records = asyncio.run(gen.closed_loop(specs(10), clients=3))
    assert gen.max_in_flight == 3
    assert [r.prompt_tokens for r in records] == list(range(1, 11))
    assert all(r.ok and r.output_tokens == 2 for r in records)
    sends = sorted(r.send_time for r in records)
    # a client sends its next request only when the last finished: never more than 3 started
    # before the first finished
    first_finish = min(r.finish_time for r in records)
    assert sum(t < first_finish for t in sends) == 3


def test_open_loop_sends_on_schedule_without_waiting_for_answers():
    times = arrival_times(20, rate=400.0, seed=1)
    gen = LoadGenerator(SleepTarget(0.05))
    records = asyncio.run(gen.open_loop(specs(20), times))
    assert len(records) == 20 and all(r.ok for r in records)
    assert gen.max_in_flight > 3  # it does not wait for answers
    order = sorted(range(20), key=lambda i: records[i].send_time)
    assert order == sorted(range(20), key=lambda i: times[i])


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_statistics_match_rate_and_burstiness(burstiness):
    times = arrival_times(20_000, rate=5.0, burstiness=burstiness, seed=3)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.2, rel=0.05)
    assert statistics.stdev(gaps) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)
    assert arrival_times(3, rate=math.inf) == [0.0, 0.0, 0.0]


def build_workload(**node):
    return registry.build("workload", node)


def test_synthetic_workload_lengths_follow_fastgen():
    w = build_workload(name="synthetic", num_requests=3000, prompt_mean=1000, output_mean=100,
                       max_prompt=1400, seed=5)  # fmt: skip
    reqs = w.requests(vocab_size=50)
    plens = [len(r.prompt) for r in reqs]
    olens = [r.output_len for r in reqs]
    assert statistics.fmean(olens) == pytest.approx(100, rel=0.03)
    assert statistics.stdev(olens) == pytest.approx(30, rel=0.08)
    assert max(plens) == 1400 and min(plens) >= 1  # clipped
    assert all(0 <= t < 50 for r in reqs[:50] for t in r.prompt)
    again = build_workload(name="synthetic", num_requests=3000, prompt_mean=1000,
                           output_mean=100, max_prompt=1400, seed=5).requests(50)  # fmt: skip
    assert [r.prompt for r in again[:20]] == [r.prompt for r in reqs[:20]]


def test_uniform_fixed_and_trace_workloads(tmp_path):
    u = build_workload(name="uniform", num_requests=200, prompt_len=[3, 7], output_len=[2, 2])
    assert {len(r.prompt) for r in u.requests(10)} == {3, 4, 5, 6, 7}
    f = build_workload(name="fixed", num_requests=4, prompt_len=9, output_len=3).requests(10)
    assert [(len(r.prompt), r.output_len) for r in f] == [(9, 3)] * 4
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        '{"arrival": 10.0, "prompt_len": 4, "output_len": 2}\n'
        '{"timestamp": 12.0, "prompt": [5, 6, 7], "output_tokens": 5}\n'
    )
    t = build_workload(name="trace", path=str(trace), time_scale=0.5).requests(100)
    assert [(len(r.prompt), r.output_len, r.arrival) for r in t] == [(4, 2, 0.0), (3, 5, 1.0)]
    assert t[1].prompt == [5, 6, 7]
    trace.write_text('{"arrival": 1, "prompt_len": 4}\n')
    with pytest.raises(ValueError, match=r"trace\.jsonl:1"):
        build_workload(name="trace", path=str(trace)).requests(100)
    with pytest.raises(ValueError, match="prompt_len"):
        build_workload(name="uniform", prompt_len=[5, 2])


def test_mixed_workload_has_its_share_of_long_prompts():
    reqs = build_workload(name="mixed", num_requests=2000, seed=3).requests(100)
    long = [len(r.prompt) for r in reqs if len(r.prompt) >= 2000]
    short = [len(r.prompt) for r in reqs if len(r.prompt) < 2000]
    assert 0.12 < len(long) / len(reqs) < 0.18
    assert max(long) <= 3000 and min(short) >= 64 and max(short) <= 256
    assert {32, 128} >= {min(r.output_len for r in reqs), max(r.output_len for r in reqs)}
    with pytest.raises(ValueError, match="long_fraction must be in"):
        build_workload(name="mixed", long_fraction=1.5)


def sse(events: list[dict]) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def test_openai_target_counts_streamed_tokens_and_reports_errors():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.update(body)
        if body["max_tokens"] == 99:
            return httpx.Response(429, json={"error": {"message": "queue full"}})
        events = [{"choices": [{"text": f" w{i}", "finish_reason": None}]} for i in range(3)]
        events.append({"choices": [{"text": "", "finish_reason": "length"}]})  # llama.cpp style
        if body["max_tokens"] == 4:  # a last token that decodes to no text: usage counts it
            events.append({"choices": [{"text": "", "finish_reason": "length"}]})
        events.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        return httpx.Response(200, content=sse(events))

    target = OpenAITarget("http://127.0.0.1:1", "m", transport=httpx.MockTransport(handler))

    async def main():
        ok = RequestRecord(3, 3, 0.0)
        await target.send(RequestSpec([1, 2, 3], 3), ok)
        bad = RequestRecord(3, 99, 0.0)
        await target.send(RequestSpec([1, 2, 3], 99), bad)
        silent_last = RequestRecord(3, 4, 0.0)
        await target.send(RequestSpec([1, 2, 3], 4), silent_last)
        await target.close()
        return ok, bad, silent_last

    ok, bad, silent_last = asyncio.run(main())
    assert ok.ok and ok.output_tokens == 3
    assert silent_last.ok and silent_last.output_tokens == 4
    assert seen["prompt"] == [1, 2, 3] and seen["ignore_eos"] is True and seen["stream"] is True
    assert not bad.ok and "HTTP 429" in bad.error and "queue full" in bad.error


def test_tiny_bench_multirun_writes_comparison_and_plots(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "modgen", "-m", "task=bench", "+scheduler=splitfuse,continuous",
         "task.clients=2", "workload=fixed", "workload.num_requests=4", "workload.prompt_len=24",
         "workload.output_len=4", "model.num_hidden_layers=1", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert len(list(tmp_path.glob("*/results.json"))) == 2
    rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert len(rows) == 3 and "effective_throughput" in rows[0]
    assert {"scheduler=splitfuse", "scheduler=continuous"} <= {r.split(",")[1] for r in rows[1:]}
    for name in ("latency_vs_throughput", "effective_throughput", "ttft_cdf", "itl_cdf"):
        png = tmp_path / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    res = subprocess.run(
        [sys.executable, "-m", "modgen.report", str(tmp_path)], capture_output=True, text=True
    )
    assert res.returncode == 0 and "comparison.csv" in res.stdout


def test_named_runs_are_labelled_by_directory(tmp_path):
    """Runs side by side under names (as experiments/peers/run.py writes them) are labelled by
    their directory, whatever their overrides; a sweep's numbered jobs by what varies."""
    from modgen.report import load_runs

    for name, sched in [("vllm-cpu", "x"), ("modgen-splitfuse", "splitfuse"), ("0", "a")]:
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- +scheduler={sched}\n- task.clients=4\n")
        (run / "results.json").write_text('{"summary": {"scheduler": "s"}, "requests": []}')
    labels = {r["dir"].name: (r["label"], r["group"]) for r in load_runs(tmp_path)}
    assert labels["vllm-cpu"] == ("vllm-cpu", "vllm-cpu")
    assert labels["modgen-splitfuse"] == ("modgen-splitfuse", "modgen-splitfuse")
    assert labels["0"] == ("scheduler=a", "scheduler=a")
