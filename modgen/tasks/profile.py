"""``task=profile``: measure this machine's step times for the configured model, dtype and
attention backend, for ``cost_model=profiled`` (see ``modgen.profiling``)."""

from __future__ import annotations

import itertools
import logging
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from modgen import registry
from modgen.bench.loadgen import LoadGenerator
from modgen.bench.targets import EngineTarget
from modgen.engine import Engine
from modgen.engine.async_engine import AsyncEngine
from modgen.engine.executor import step_features
from modgen.engine.probe import synthetic_sequence
from modgen.engine.scheduling import StepPlan
from modgen.engine.sequence import Sequence
from modgen.profiling import Profile, ProfileFit, features_of
from modgen.registry import register
from modgen.task import Task, TaskConfig

log = logging.getLogger(__name__)


@register("task", "profile")
class ProfileTask(Task):
    """Times the real executor on steps over a grid (prompt chunks x context, decode batches x
    context, mixed steps at the token budget), then the engine loop between steps in a short
    closed-loop run; writes the profile to its default path (where ``cost_model=profiled``
    looks for it) and a copy into the run directory."""

    @dataclass(kw_only=True)
    class Config(TaskConfig):
        """The grid; points that do not fit the KV cache or the context are skipped."""

        token_budget: int = 512
        """Largest prompt chunk, and the size of the mixed steps."""
        chunks: list[int] = field(default_factory=lambda: [16, 64, 128, 256, 384, 512])
        """Prompt-chunk sizes."""
        starts: list[int] = field(default_factory=lambda: [0, 512, 1024, 2048])
        """Tokens already cached before a prompt chunk."""
        decode_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
        """Decode batch sizes."""
        contexts: list[int] = field(default_factory=lambda: [128, 512, 1024, 2048])
        """Decode contexts."""
        mixed_decodes: list[int] = field(default_factory=lambda: [8, 32, 64])
        """Decodes in a mixed step (a prompt chunk fills the rest of the budget)."""
        repeats: int = 3
        """Timed runs per grid point (the median is kept), after one warm-up."""
        loop_requests: int = 24
        """Requests of the closed-loop run that measures the engine loop."""
        loop_clients: int = 8
        """Clients of that run."""
        output: str | None = None
        """Profile file to write; None: the default path for this model on this machine."""

    config: Config

    def run(self, root: DictConfig, output_dir: Path) -> dict[str, Any]:
        engine = Engine.from_config(root)
        if engine.clock.virtual:
            raise ValueError("task=profile measures a real executor; it cannot run executor=sim")
        attention = root.attention.get("name", "auto")
        spec = engine.spec
        profile = Profile(
            model=asdict(spec),
            attention=attention,
            attention_chosen=engine.executor.describe(),
            token_budget=self.config.token_budget,
        )
        profile.grid = self._grid(engine)
        profile.loop = self._loop(engine)
        path = Path(self.config.output) if self.config.output else None
        path = profile.save(path or Profile.default_path(spec, attention))
        shutil.copy(path, output_dir / "profile.json")
        fit = ProfileFit(profile)
        errors = [
            abs(fit.executor_time(features_of(g)) - g["seconds"]) / g["seconds"]
            for g in profile.grid
        ]
        summary = {
            "profile": str(path),
            "grid_points": len(profile.grid),
            "loop_steps": len(profile.loop),
            "fit_error_median": statistics.median(errors),
            "fit_error_max": max(errors),
        }
        print(
            f"profile: {path}\n{len(profile.grid)} grid points, {len(profile.loop)} loop steps; "
            f"fit error on the grid: median {summary['fit_error_median']:.1%}, "
            f"max {summary['fit_error_max']:.1%}"
        )
        return summary

    def _points(self, engine: Engine) -> list[tuple[list[tuple[int, int]], tuple[int, int] | None]]:
        """Grid points as (decodes as (count, context), prompt chunk as (start, tokens))."""
        c, budget = self.config, self.config.token_budget
        max_len, capacity = engine.max_model_len, engine.kv.capacity_tokens * 0.9
        points: list[tuple[list[tuple[int, int]], tuple[int, int] | None]] = []
        for n, start in itertools.product(c.chunks, c.starts):
            if n <= budget and start + n < max_len:
                points.append(([], (start, n)))
        for b, ctx in itertools.product(c.decode_batches, c.contexts):
            if ctx < max_len and b * (ctx + 1) <= capacity:
                points.append(([(b, ctx)], None))
        for b, start in itertools.product(c.mixed_decodes, c.starts[:2]):
            ctx = min(1024, max_len - 2)
            if b < budget and start + budget - b < max_len:
                points.append(([(b, ctx)], (start, budget - b)))
        return [p for p in points if _tokens_held(p) <= capacity]

    def _grid(self, engine: Engine) -> list[dict[str, Any]]:
        samples = []
        ids = itertools.count()
        for decodes, chunk in tqdm(self._points(engine), desc="profile", file=sys.stdout):
            seqs: list[tuple[Sequence, int]] = []
            for count, ctx in decodes:
                for _ in range(count):
                    seq = synthetic_sequence(next(ids), ctx, 1)
                    seq.token_ids.append(0)  # one output token: the next step decodes it
                    seqs.append((seq, 1))
            if chunk is not None:
                start, n = chunk
                seqs.append((synthetic_sequence(next(ids), start + n, 0, computed=start), n))
            plan = StepPlan()
            for seq, n in seqs:
                engine.kv.allocate(seq.seq_id, seq.num_computed + n)
                plan.add(seq, n)
            banned: list[list[int]] = [[] for c in plan.chunks if c.completes]
            times = []
            for _ in range(self.config.repeats + 1):
                t0 = engine.clock.now()
                engine.executor.execute(plan, banned)
                times.append(engine.clock.now() - t0)
            for seq, _ in seqs:
                engine.kv.free(seq.seq_id)
            f = step_features(plan, engine.spec.sliding_window)
            samples.append({**asdict(f), "seconds": statistics.median(times[1:])})
        return samples

    def _loop(self, engine: Engine) -> list[dict[str, Any]]:
        """Per-step features and the time to the next step's start, from a closed-loop run of
        mixed lengths through the streaming engine (as a server or the bench drives it)."""
        c = self.config
        spec_node = {"name": "uniform", "num_requests": c.loop_requests, "seed": 7,
                     "prompt_len": [32, min(1024, engine.max_model_len // 2)],
                     "output_len": [16, 64]}  # fmt: skip
        specs = registry.build("workload", spec_node).requests(engine.spec.vocab_size)
        engine.stats.clear()
        plans: list[dict[str, Any]] = []
        schedule = engine.scheduler.schedule

        def recording() -> StepPlan:
            plan = schedule()
            plans.append(asdict(step_features(plan, engine.spec.sliding_window)))
            return plan

        engine.scheduler.schedule = recording  # type: ignore[method-assign]
        try:
            target = EngineTarget(AsyncEngine(engine), clock=engine.clock)
            gen = LoadGenerator(target, clock=engine.clock)
            engine.clock.run(_drive(gen, specs, c.loop_clients))
        finally:
            engine.scheduler.schedule = schedule  # type: ignore[method-assign]
        starts = [s.start for s in engine.stats]
        return [
            {**f, "interval": later - start}
            for f, start, later in zip(plans, starts, starts[1:], strict=False)
            if f["num_tokens"] > 0
        ]


async def _drive(gen: LoadGenerator, specs: list, clients: int) -> None:
    try:
        await gen.closed_loop(specs, clients)
    finally:
        await gen.target.close()


def _tokens_held(point: tuple[list[tuple[int, int]], tuple[int, int] | None]) -> int:
    decodes, chunk = point
    return sum(b * (ctx + 1) for b, ctx in decodes) + (sum(chunk) if chunk else 0)
