"""Load generation: closed loop (FastGen: N clients, each sends its next request when the last
finishes) and open loop (vLLM ``bench serve``: Poisson or gamma arrivals at a rate)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable

from modgen.bench.metrics import RequestRecord
from modgen.bench.targets import Target
from modgen.engine.clock import Clock
from modgen.workload import RequestSpec


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests at ``rate`` per second on average.

    Gaps are gamma-distributed with shape ``burstiness`` (1 is Poisson; lower is burstier);
    ``rate`` of inf sends everything at once.
    """
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, theta)
    return times


class LoadGenerator:
    """Drives a Target with a list of requests and returns one record per request, in order.

    Times come from ``clock`` (the target's by default): on a virtual clock's event loop the
    same closed and open loops run in simulated time."""

    def __init__(
        self,
        target: Target,
        on_done: Callable[[RequestRecord], None] | None = None,
        clock: Clock | None = None,
    ):
        self.target = target
        self.on_done = on_done
        self.clock = clock or target.clock
        self.in_flight = 0
        self.max_in_flight = 0

    async def _one(self, spec: RequestSpec, rec: RequestRecord, due: float | None = None) -> None:
        """Send now; ``due`` is when the request was meant to arrive (an open loop's schedule):
        its latencies count from then, even if the event loop was busy."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        rec.send_time = self.clock.now() if due is None else due
        try:
            await self.target.send(spec, rec)
        finally:
            self.in_flight -= 1
            if self.on_done:
                self.on_done(rec)

    @staticmethod
    def _records(specs: list[RequestSpec]) -> list[RequestRecord]:
        return [RequestRecord(len(s.prompt), s.output_len, send_time=math.nan) for s in specs]

    async def closed_loop(self, specs: list[RequestSpec], clients: int) -> list[RequestRecord]:
        """``clients`` concurrent clients work through ``specs`` in order."""
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        records = self._records(specs)
        queue = list(zip(specs, records, strict=True))[::-1]

        async def client() -> None:
            while queue:
                spec, rec = queue.pop()
                await self._one(spec, rec)

        await asyncio.gather(*(client() for _ in range(min(clients, len(specs)))))
        return records

    async def open_loop(self, specs: list[RequestSpec], times: list[float]) -> list[RequestRecord]:
        """Send ``specs[i]`` at ``times[i]`` seconds after the start, whatever is in flight."""
        records = self._records(specs)
        start = self.clock.now()

        async def at(delay: float, spec: RequestSpec, rec: RequestRecord) -> None:
            wait = start + delay - self.clock.now()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._one(spec, rec, due=start + delay)

        await asyncio.gather(*(at(t, s, r) for t, s, r in zip(times, specs, records, strict=True)))
        return records
