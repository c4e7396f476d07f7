"""Faults injected into a running engine stay with their requests: a sampler, stop check or
detokenizer that raises fails its request alone; a forward pass that raises fails the requests
of its step; KV is freed either way and the engine goes on. Only steps failing in a row make it
unhealthy, and then the asyncio front stops and says why."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MAX_NEW

from modgen import LLM, SamplingParams
from modgen.engine.async_engine import AsyncEngine, EngineDeadError

GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
MARK = [1, 1]  # prompts starting with this are the ones the injected faults pick


@pytest.fixture
def engine(checkpoints):
    llm = LLM("mistral", checkpoint=str(checkpoints["mistral"]), overrides=["+scheduler=splitfuse"])
    return llm.engine


def run(engine, seqs):
    while not all(s.is_finished for s in seqs):
        engine.step()


def assert_clean(engine):
    assert engine.kv.num_used_blocks == 0 and not engine.has_unfinished()


def test_a_sampler_failing_on_one_row_fails_that_request_alone(engine, prompts, hf_reference):
    sample = engine.executor.sampler.sample
    calls = []

    def faulty(logits, seqs, banned):
        calls.append(len(seqs))
        if any(s.prompt_token_ids[:2] == MARK for s in seqs):
            raise RuntimeError("injected sampler fault")
        return sample(logits, seqs, banned)

    engine.executor.sampler.sample = faulty
    good = [engine.add_request(p, GREEDY) for p in prompts[:3]]
    bad = engine.add_request([*MARK, 5, 6], GREEDY)
    run(engine, [*good, bad])
    assert [s.output_token_ids for s in good] == [ref for ref, _ in hf_reference["mistral"][:3]]
    assert bad.finish_reason.value == "error" and "injected sampler fault" in bad.error
    assert max(calls) == 4 and 1 in calls  # the batch failed, then each row alone
    assert engine.is_healthy and engine.num_failed_steps == 0
    assert_clean(engine)


def test_a_failing_forward_pass_fails_its_step_and_the_engine_goes_on(
    engine, prompts, hf_reference
):
    execute = engine.executor.execute

    def faulty(plan, banned):
        if any(c.seq.prompt_token_ids[:2] == MARK for c in plan.chunks):
            raise RuntimeError("injected forward fault")
        return execute(plan, banned)

    engine.executor.execute = faulty
    first = [engine.add_request(p, GREEDY) for p in prompts[:2]]
    engine.step()
    engine.step()  # both are decoding now
    assert engine.kv.num_used_blocks > 0
    bad = engine.add_request([*MARK, 7], GREEDY)
    updated = engine.step()  # the step that holds the marked request fails whole
    assert {s.request_id for s in updated} == {s.request_id for s in [*first, bad]}
    for seq in [*first, bad]:
        assert seq.finish_reason.value == "error" and "injected forward fault" in seq.error
    assert_clean(engine)
    assert engine.is_healthy and engine.num_failed_steps == 1
    later = [engine.add_request(p, GREEDY) for p in prompts[2:5]]
    run(engine, later)
    assert [s.output_token_ids for s in later] == [ref for ref, _ in hf_reference["mistral"][2:5]]
    assert engine.num_failed_steps == 0
    assert_clean(engine)


def test_stop_checks_and_detokenizing_that_raise_fail_one_request(engine, prompts):
    stop_reason, detokenize = engine._stop_reason, engine._detokenize

    def faulty_stop(seq, token):
        if seq.prompt_token_ids[:2] == MARK:
            raise ValueError("injected stop-check fault")
        return stop_reason(seq, token)

    def faulty_detokenize(ids):
        if ids and ids[0] == 99:
            raise UnicodeError("injected detokenizer fault")
        return detokenize(ids)

    engine._stop_reason, engine._detokenize = faulty_stop, faulty_detokenize
    good = engine.add_request(prompts[3], GREEDY)
    bad_stop = engine.add_request([*MARK, 9], GREEDY)
    run(engine, [good, bad_stop])
    assert good.finish_reason.value == "length" and good.text
    assert bad_stop.finish_reason.value == "error" and "injected stop-check" in bad_stop.error
    engine._detokenize = lambda ids: faulty_detokenize([99])  # the final text fails
    bad_text = engine.add_request(prompts[0], GREEDY)
    run(engine, [bad_text])
    assert bad_text.finish_reason.value == "error" and "UnicodeError" in bad_text.error
    engine._detokenize = detokenize
    other = engine.add_request(prompts[1], SamplingParams(max_tokens=3, temperature=0))
    run(engine, [other])
    assert other.finish_reason.value in ("length", "stop") and engine.is_healthy
    assert_clean(engine)


def test_only_failures_in_a_row_make_the_engine_unhealthy(engine, prompts):
    engine.config.max_failed_steps = 2
    execute = engine.executor.execute
    broken = {"on": True}

    def faulty(plan, banned):
        if broken["on"]:
            raise RuntimeError("injected broken device")
        return execute(plan, banned)

    engine.executor.execute = faulty
    a = engine.add_request(prompts[0], GREEDY)
    engine.step()
    assert a.finish_reason.value == "error" and engine.is_healthy
    broken["on"] = False  # a good step in between resets the count
    b = engine.add_request(prompts[1], GREEDY)
    run(engine, [b])
    assert b.finish_reason.value == "length" and engine.num_failed_steps == 0
    broken["on"] = True
    for p in prompts[2:4]:
        engine.add_request(p, GREEDY)
        engine.step()
    assert not engine.is_healthy and engine.last_error == "RuntimeError: injected broken device"
    assert_clean(engine)


def test_async_engine_stops_when_the_engine_is_unhealthy(engine, prompts):
    engine.config.max_failed_steps = 2

    def broken(plan, banned):
        raise RuntimeError("injected broken device")

    engine.executor.execute = broken
    failures = []

    async def main():
        aengine = AsyncEngine(engine, on_failure=failures.append)
        first = [o async for o in aengine.generate(prompts[0], GREEDY)]
        assert aengine.is_accepting  # one failed step: the engine goes on
        second = [o async for o in aengine.generate(prompts[1], GREEDY)]
        for _ in range(100):
            if not aengine.is_running:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineDeadError, match="shutting down or has stopped"):
            aengine.submit(prompts[2], GREEDY, None)
        accepting = aengine.is_accepting
        await aengine.shutdown()
        return first, second, accepting

    first, second, accepting = asyncio.run(main())
    for outs in (first, second):
        assert outs[-1].finish_reason == "error" and "injected broken device" in outs[-1].error
    assert not accepting and len(failures) == 1
    assert isinstance(failures[0], EngineDeadError) and "2 steps in a row" in str(failures[0])
    assert_clean(engine)
