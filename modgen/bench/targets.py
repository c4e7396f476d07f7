"""Where load goes: the in-process engine, or any OpenAI-compatible ``/v1/completions`` URL.

Both stream, and both record client-side token arrival times, so modgen and other engines are
measured by the same harness.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from typing import Any

from modgen.bench.metrics import RequestRecord
from modgen.engine.async_engine import AsyncEngine
from modgen.engine.clock import Clock, WallClock
from modgen.sampling_params import SamplingParams
from modgen.workload import RequestSpec


class Target(ABC):
    """Sends one request and fills in its record as tokens arrive, by its ``clock``."""

    clock: Clock = WallClock()

    @abstractmethod
    async def send(self, spec: RequestSpec, rec: RequestRecord) -> None:
        """Stream ``spec``; set ``rec.token_times``, ``finish_time`` and ``error``.
        ``rec.send_time`` is when the request was due (its arrival)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections or the engine loop."""

    async def cache_counters(self) -> dict[str, Any]:
        """The target's prefix-cache counters now (``prefix_cache_queries`` and
        ``prefix_cache_hits``, in tokens); empty if it has no prefix cache or does not say."""
        return {}


class EngineTarget(Target):
    """The in-process engine, through the same streaming interface a server uses; times come
    from the engine's clock (virtual in a simulation)."""

    def __init__(
        self, engine: AsyncEngine, temperature: float = 0.0, clock: Clock | None = None
    ) -> None:
        self.engine = engine
        self.temperature = temperature
        self.clock = clock or engine.engine.clock

    async def send(self, spec: RequestSpec, rec: RequestRecord) -> None:
        params = SamplingParams(
            max_tokens=spec.output_len,
            min_tokens=spec.output_len,
            temperature=self.temperature,
            ignore_eos=True,
        )
        seen = 0
        try:
            stream = self.engine.generate(
                spec.prompt, params, arrival_time=rec.send_time, priority=spec.priority
            )
            async for out in stream:
                now = self.clock.now()
                new = len(out.token_ids) - seen
                rec.token_times.extend([now] * new)
                seen += new
                if out.finished and out.error:
                    rec.error = out.error
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        rec.finish_time = self.clock.now()

    async def close(self) -> None:
        await self.engine.shutdown()

    async def cache_counters(self) -> dict[str, Any]:
        return self.engine.engine.kv.report()


class OpenAITarget(Target):
    """A server speaking OpenAI's completions API with streaming (modgen, vLLM, llama.cpp...).

    Prompts go as token-id lists with ``ignore_eos``; an event counts as a token when it carries
    text or has no finish reason (llama.cpp sends one empty event with the finish reason).
    """

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None = None,
        temperature: float = 0.0,
        reuse_connections: bool = True,
        timeout_s: float = 600.0,
        transport=None,
    ) -> None:
        import httpx

        self.base = url.rstrip("/")
        self.url = self.base + "/v1/completions"
        self.model = model
        self.temperature = temperature
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = None if reuse_connections else httpx.Limits(max_keepalive_connections=0)
        kwargs = {"limits": limits} if limits else {}
        self.client = httpx.AsyncClient(timeout=timeout_s, transport=transport, **kwargs)

    def body(self, spec: RequestSpec) -> dict:
        """The JSON request body for ``spec``."""
        body = {
            "prompt": spec.prompt,
            "max_tokens": spec.output_len,
            "min_tokens": spec.output_len,
            "temperature": self.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.model:
            body["model"] = self.model
        if spec.priority:  # vLLM refuses a priority unless it schedules by priority
            body["priority"] = spec.priority
        return body

    async def send(self, spec: RequestSpec, rec: RequestRecord) -> None:
        try:
            async with self.client.stream(
                "POST", self.url, json=self.body(spec), headers=self.headers
            ) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:500]
                    rec.error = f"HTTP {resp.status_code}: {text}"
                else:
                    await self._read_events(resp, rec)
        except Exception as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
        rec.finish_time = time.perf_counter()

    @staticmethod
    async def _read_events(resp, rec: RequestRecord) -> None:
        usage = None
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                rec.error = str(event["error"])
                return
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if choice.get("text") or choice.get("finish_reason") is None:
                    rec.token_times.append(time.perf_counter())
        # a last token that decoded to no text still counts, as the server's usage says
        missing = (usage or {}).get("completion_tokens", 0) - len(rec.token_times)
        if missing > 0 and rec.token_times:
            rec.token_times.extend([time.perf_counter()] * missing)

    async def close(self) -> None:
        await self.client.aclose()

    async def cache_counters(self) -> dict[str, Any]:
        """Read from the server's Prometheus ``/metrics`` (vLLM's or modgen's counter names)."""
        try:
            resp = await self.client.get(self.base + "/metrics", headers=self.headers)
            resp.raise_for_status()
        except Exception:
            return {}
        return parse_cache_counters(resp.text)


CACHE_COUNTERS = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "modgen_prefix_cache_queries"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "modgen_prefix_cache_hits"),
}


def parse_cache_counters(text: str) -> dict[str, Any]:
    """Prefix-cache counters from a Prometheus exposition (summed over labels); empty if the
    server exports none."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for key, names in CACHE_COUNTERS.items():
            if family.name in names:
                value = sum(s.value for s in family.samples if s.name.endswith("_total"))
                totals[key] = totals.get(key, 0) + value
    return {k: int(v) for k, v in totals.items()} if len(totals) == len(CACHE_COUNTERS) else {}
