"""SplitFuse's token budget chosen by measurement (``token_budget=0``): the rule, the scheduler's
use of it, and the engine's synthetic steps that feed it."""

from __future__ import annotations

import logging

import pytest
from sim_engine import make_engine, make_scheduler

from modgen import LLM, SamplingParams, calibration
from modgen.engine.async_engine import AsyncEngine
from modgen.engine.probe import StepProbe
from modgen.tasks.results import engine_summary

SIZES = [128, 256, 512, 1024]


def fixed_cost(per_step: float):
    """Step seconds: ``per_step`` whatever the size, plus 0.1 ms a token."""
    return lambda n: per_step + n * 1e-4


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MODGEN_CACHE", str(tmp_path))


def test_choose_size_takes_the_smallest_size_within_the_margin_of_the_best():
    # 1 ms a step: per token 128 -> 0.108 ms, 256 -> 0.104, 512 -> 0.102, 1024 -> 0.101
    assert calibration.choose_size("t", {"c": 1}, fixed_cost(1e-3), SIZES).name == "256"
    # 10 ms a step: only the largest step is within 3% of the best per token
    assert calibration.choose_size("t", {"c": 2}, fixed_cost(1e-2), SIZES).name == "1024"
    # no fixed cost: every size ties, so the smallest
    assert calibration.choose_size("t", {"c": 3}, fixed_cost(0.0), SIZES).name == "128"


def test_choose_size_leaves_out_sizes_that_cannot_run_and_caches_its_choice():
    def capped(n: int) -> float:
        if n > 256:
            raise ValueError("does not fit")
        return 1e-2 + n * 1e-4

    choice = calibration.choose_size("t", {"c": 4}, capped, SIZES)
    assert choice.name == "256" and set(choice.timings) == {"128", "256"}

    def never(n: int) -> float:
        raise AssertionError("a cached decision measures nothing")

    again = calibration.choose_size("t", {"c": 4}, never, SIZES)
    assert again.cached and again.name == "256"
    with pytest.raises(ValueError, match="no t of"):
        calibration.choose_size("t", {"c": 5}, lambda n: 1 / 0, SIZES)


def test_splitfuse_measures_its_budget_only_when_told_to(caplog):
    sched, _ = make_scheduler("splitfuse", token_budget=0)  # measured once an engine asks
    assert sched.token_budget == 2048  # nothing measured yet: the offline default
    sched.calibrate(fixed_cost(1e-3), {"c": 6})
    assert sched.token_budget == 256 and sched.report() == {"token_budget": 256}
    assert sched.schedule().budget == 256

    fixed, _ = make_scheduler("splitfuse", token_budget=300)
    fixed.calibrate(lambda n: 1 / 0, {"c": 7})  # never called
    assert fixed.token_budget == 300

    few, _ = make_scheduler("splitfuse", token_budget=0, budget_candidates=[64, 96])
    few.calibrate(fixed_cost(0.0), {"c": 8})
    assert few.token_budget == 64

    nothing_fits, _ = make_scheduler("splitfuse", token_budget=0)
    with caplog.at_level(logging.WARNING):
        nothing_fits.calibrate(lambda n: 1 / 0, {"c": 9})
    assert nothing_fits.token_budget == 2048 and "follows the usage (512 served" in caplog.text
    nothing_fits.set_online(True)  # ... and the served one once an AsyncEngine drives it
    assert nothing_fits.token_budget == 512 and nothing_fits.schedule().budget == 512


def test_the_default_budget_follows_the_usage():
    """No budget configured: 2048 for an offline batch, 512 once the engine serves a stream;
    a configured budget stays whatever the usage."""
    sched, _ = make_scheduler("splitfuse")
    probed: list[int] = []
    sched.calibrate(lambda n: probed.append(n) or 1e-3, {"c": 10})  # nothing to measure
    assert probed == []
    assert sched.config.token_budget is None and sched.token_budget == 2048
    assert sched.schedule().budget == 2048
    sched.set_online(True)
    assert sched.token_budget == 512 and sched.report() == {"token_budget": 512}
    fixed, _ = make_scheduler("splitfuse_priority", token_budget=64)
    fixed.set_online(True)
    assert fixed.token_budget == 64 and fixed.schedule().budget == 64
    engine = LLM("mistral", overrides=["executor=sim", "+scheduler=splitfuse"]).engine
    assert engine.scheduler.token_budget == 2048
    AsyncEngine(engine)
    assert engine.scheduler.token_budget == 512


def test_a_simulated_engine_chooses_by_its_cost_model():
    """The same rule on a simulated executor's predicted step times (virtual clock): the probe's
    steps cost real KV only while they run."""
    engine = make_engine("splitfuse", num_blocks=20_000, token_budget=0)
    probe = StepProbe(engine.executor, engine.kv, engine.clock, engine.max_model_len)
    per_token = {n: probe(n) / n for n in SIZES}
    best = min(per_token.values())
    expect = min(n for n, t in per_token.items() if t <= best * 1.03)
    assert engine.scheduler.token_budget == expect
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert engine_summary(engine)["scheduler_token_budget"] == expect


def test_the_probe_refuses_a_step_that_cannot_fit():
    engine = make_engine("splitfuse", num_blocks=40, block_size=4, token_budget=8)
    probe = StepProbe(engine.executor, engine.kv, engine.clock, engine.max_model_len)
    assert probe(64) > 0 and engine.kv.num_free_blocks == 40
    with pytest.raises(ValueError, match="does not fit"):
        probe(512)
    assert engine.kv.num_free_blocks == 40


def test_a_real_engine_measures_a_budget_that_fits_and_generates_the_same_tokens(
    checkpoints, prompts
):
    """On the tiny checkpoint (256 positions) only the budgets whose probe step fits are
    measured; the greedy tokens do not depend on the budget SplitFuse runs."""
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ckpt = str(checkpoints["mistral"])
    auto = LLM("mistral", checkpoint=ckpt,
               overrides=["+scheduler=splitfuse", "scheduler.token_budget=0"])  # fmt: skip
    assert auto.engine.scheduler.token_budget in (128, 256)
    assert auto.engine.kv.num_free_blocks == auto.engine.kv.num_blocks
    small = LLM("mistral", checkpoint=ckpt, overrides=["+scheduler=splitfuse",
                                                       "scheduler.token_budget=7"])  # fmt: skip
    assert [o.token_ids for o in auto.generate(prompts, greedy)] == [
        o.token_ids for o in small.generate(prompts, greedy)
    ]
