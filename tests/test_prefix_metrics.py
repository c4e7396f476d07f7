"""Prefix-cache hits are reported: Prometheus ``/metrics`` of a server with
``kv_allocator=prefix``, the bench's view of any server's counters (vLLM's names or modgen's),
and the hit rate and tokens saved in a run's summary table and results.json."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from serve_utils import metric, start_server

from modgen.bench.metrics import prefix_cache_summary, summary_table
from modgen.bench.targets import OpenAITarget, parse_cache_counters

VLLM_METRICS = """# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1200.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 300.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 960.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 0.0
"""


@pytest.fixture(scope="module")
def prefix_server(checkpoints):
    served = start_server(checkpoints["mistral"], "kv_allocator=prefix")
    yield served
    served.thread.stop()


def test_server_metrics_count_prefix_hits_and_outputs_stay_the_same(prefix_server):
    url = prefix_server.url
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    prompt = [3 + i % 90 for i in range(50)]  # three full blocks of 16, then two tokens
    params = {"temperature": 0.0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    before = httpx.get(f"{url}/metrics").text
    first = c.completions.create(model="mistral", prompt=prompt, **params)
    second = c.completions.create(model="mistral", prompt=prompt, **params)
    after = httpx.get(f"{url}/metrics").text
    assert first.choices[0].text == second.choices[0].text

    def grew(name: str) -> float:
        return metric(after, name) - metric(before, name)

    assert grew("modgen_prefix_cache_queries_total") == 100
    assert grew("modgen_prefix_cache_hits_total") == 48  # the second request's three blocks
    target = OpenAITarget(url, "mistral")
    counters = asyncio.run(target.cache_counters())
    assert counters == {
        "prefix_cache_queries": metric(after, "modgen_prefix_cache_queries_total"),
        "prefix_cache_hits": metric(after, "modgen_prefix_cache_hits_total"),
    }


def test_vllm_counters_are_read_and_summarised():
    now = parse_cache_counters(VLLM_METRICS)
    assert now == {"prefix_cache_queries": 1500, "prefix_cache_hits": 960}
    summary = prefix_cache_summary(now, {"prefix_cache_queries": 500, "prefix_cache_hits": 160})
    assert summary == {
        "prefix_cache_queried_tokens": 1000,
        "prefix_cache_hit_tokens": 800,
        "prefix_cache_hit_rate": 0.8,
    }
    assert parse_cache_counters("# nothing here\n") == {}
    assert prefix_cache_summary({}) == {}


def test_bench_reports_hit_rate_in_its_table_and_results(tmp_path, capsys):
    """A simulated bench of a shared-prefix workload: most prompt tokens are hits."""
    from modgen import registry
    from modgen.config import compose_config

    cfg = compose_config(
        ["executor=sim", "model=mistral", "+scheduler=splitfuse", "kv_allocator=prefix",
         "task=bench", "task.clients=4", "workload=shared_prefix", "workload.num_requests=24",
         "workload.num_prefixes=2", "workload.prefix_len=256"]
    )  # fmt: skip
    summary = registry.build("task", cfg.task).run(cfg, tmp_path)
    table = capsys.readouterr().out
    assert "prefix cache hit rate / tokens saved" in table
    assert summary["prefix_cache_hit_rate"] > 0.5
    results = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert results["prefix_cache_hit_tokens"] == summary["prefix_cache_hit_tokens"] > 0
    line = summary_table(summary, "x").splitlines()
    assert any(row.startswith("prefix cache hit rate") for row in line)
