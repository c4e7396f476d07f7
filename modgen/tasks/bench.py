"""``task=bench``: FastGen's benchmark methodology. Closed-loop clients or open-loop arrivals
drive the in-process engine (through the streaming interface a server uses) or any
OpenAI-compatible URL, and the run reports TTFT / TPOT / ITL / E2E percentiles, throughput,
FastGen's effective throughput and vLLM-style goodput."""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from modgen import registry
from modgen.bench.loadgen import LoadGenerator, arrival_times
from modgen.bench.metrics import (
    GoodputConfig,
    RequestRecord,
    SLAConfig,
    prefix_cache_summary,
    summarize,
    summary_table,
)
from modgen.bench.targets import EngineTarget, OpenAITarget, Target
from modgen.engine import Engine
from modgen.engine.async_engine import AsyncEngine
from modgen.model import describe_model
from modgen.registry import register
from modgen.task import Task, TaskConfig
from modgen.tasks.results import engine_summary, roofline_summary, scheduler_name, write_results
from modgen.workload import RequestSpec

log = logging.getLogger(__name__)
MODES = ("closed", "open", "trace")


@register("task", "bench")
class BenchTask(Task):
    """Serve the workload under load and measure it."""

    @dataclass(kw_only=True)
    class Config(TaskConfig):
        """Load generation and metric settings."""

        mode: str = "closed"
        """closed: N clients, each sends its next request when the last finishes; open: arrivals
        at ``rate`` per second; trace: the workload's own arrival times."""
        clients: int = 8
        """Concurrent clients (closed loop)."""
        rate: float = 4.0
        """Requests per second (open loop); .inf sends all at once."""
        burstiness: float = 1.0
        """Gamma shape of inter-arrival gaps (1 is Poisson, lower is burstier)."""
        warmup: int = 1
        """Requests sent one by one before measuring (not counted)."""
        url: str | None = None
        """OpenAI-compatible server to measure instead of the in-process engine."""
        served_model: str | None = None
        """``model`` field sent to that server."""
        api_key: str | None = None
        """Bearer token for that server."""
        reuse_connections: bool = True
        """Keep HTTP connections alive (some servers close streamed ones)."""
        temperature: float = 0.0
        """Sampling temperature (0 is greedy)."""
        seed: int = 0
        """Seed of the arrival times."""
        sla: SLAConfig = field(default_factory=SLAConfig)
        """FastGen's SLA for effective throughput."""
        goodput: GoodputConfig = field(default_factory=GoodputConfig)
        """Limits for goodput (unset: not reported)."""
        short_prompt: int = 1024
        """Requests with at most this many prompt tokens count as short: their TTFT is also
        reported alone (``ttft_short_*``), e.g. to see what long prompts cost short ones."""

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise ValueError(f"task.mode must be one of {MODES}, got {self.mode!r}")
            if self.clients < 1:
                raise ValueError(f"task.clients must be >= 1, got {self.clients}")

    config: Config

    def run(self, root: DictConfig, output_dir: Path) -> dict[str, Any]:
        c = self.config
        engine = None
        if c.url:
            if root.executor.name != "model":
                raise ValueError(
                    f"task.url measures a real server; executor={root.executor.name} drives the "
                    "in-process engine only (drop task.url)"
                )
            vocab = describe_model(root.model).vocab_size  # the checkpoint's, if one is named
            target: Target = OpenAITarget(
                c.url, c.served_model, c.api_key, c.temperature, c.reuse_connections
            )
        else:
            engine = Engine.from_config(root)
            vocab = engine.spec.vocab_size
            target = EngineTarget(AsyncEngine(engine), c.temperature)
        specs = registry.build("workload", root.workload).requests(vocab)
        records, wall, cache = target.clock.run(self._drive(target, specs, engine, vocab))
        summary = summarize(records, wall, c.sla, c.goodput, c.short_prompt)
        steps = engine.stats if engine else None
        summary.update(roofline_summary(root, records, len(steps or []), wall, engine))
        if engine:
            summary.update(engine_summary(engine))
        summary.update(cache)  # the prefix cache's hits in the measured run
        summary.update(
            scheduler=scheduler_name(root) if engine else "external",
            target=c.url or "in-process",
            mode=c.mode,
            clients=c.clients if c.mode == "closed" else None,
            rate=c.rate if c.mode == "open" else None,
        )
        load = f"{c.clients} clients" if c.mode == "closed" else f"{c.mode} loop"
        title = f"bench: {summary['scheduler']} @ {summary['target']}, {load}"
        print(summary_table(summary, title))
        write_results(output_dir, root, summary, records, steps)
        return summary

    async def _drive(
        self, target: Target, specs: list[RequestSpec], engine: Engine | None, vocab: int
    ) -> tuple[list[RequestRecord], float, dict[str, Any]]:
        c = self.config
        try:
            if c.warmup:  # prompts of the workload's lengths, none of its tokens: a prefix
                # cache starts the measured run cold
                rng = random.Random(c.seed + 1)
                warm = [
                    RequestSpec([rng.randrange(vocab) for _ in s.prompt], s.output_len)
                    for s in specs[: c.warmup]
                ]
                await LoadGenerator(target).closed_loop(warm, clients=1)
            if engine is not None:
                engine.stats.clear()
            cache_before = await target.cache_counters()
            total = sum(s.output_len for s in specs)
            with tqdm(total=total, desc="bench", unit="tok", disable=None, file=sys.stdout) as bar:
                gen = LoadGenerator(target, on_done=lambda r: bar.update(r.output_tokens))
                start = gen.clock.now()
                if c.mode == "closed":
                    records = await gen.closed_loop(specs, c.clients)
                else:
                    times = (
                        [s.arrival or 0.0 for s in specs]
                        if c.mode == "trace"
                        else arrival_times(len(specs), c.rate, c.burstiness, c.seed)
                    )
                    records = await gen.open_loop(specs, times)
                wall = gen.clock.now() - start
            log.info("max requests in flight: %d", gen.max_in_flight)
            cache = prefix_cache_summary(await target.cache_counters(), cache_before)
            return records, wall, cache
        finally:
            await target.close()
