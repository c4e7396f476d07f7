"""Steps sized by time: the engine tells the scheduler what each step held and took
(``Scheduler.observe``)."""

from __future__ import annotations

import pytest
from sim_engine import make_engine, run

from modgen.engine.costs import StepFeatures


def test_the_engine_tells_the_scheduler_each_step_and_its_executor_time():
    engine = make_engine("splitfuse", token_budget=64)
    seen: list[tuple[StepFeatures, float]] = []
    engine.scheduler.observe = lambda f, s: seen.append((f, s))  # type: ignore[method-assign]
    run(engine, [(100, 5), (30, 8), (7, 3)], arrivals=[0, 2, 4])
    assert len(seen) == len(engine.stats) > 3
    for (f, seconds), stats in zip(seen, engine.stats, strict=True):
        assert f.num_tokens == stats.num_tokens
        assert f.prefill_tokens == stats.num_prefill_tokens
        assert f.decode_seqs == stats.num_decode_tokens
        assert seconds == pytest.approx(stats.duration)  # simulated: the step is the executor
