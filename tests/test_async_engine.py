"""The asyncio front: concurrent streams equal offline greedy outputs; aborts free KV at once;
the queue limit refuses excess load; a bad request fails alone."""

from __future__ import annotations

import asyncio

import pytest
from conftest import MAX_NEW

from modgen import LLM, BadRequestError, SamplingParams
from modgen.engine.async_engine import AsyncEngine, QueueFullError

GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(checkpoints):
    llm = LLM("mistral", checkpoint=str(checkpoints["mistral"]), overrides=["+scheduler=splitfuse"])
    return llm.engine


async def collect(aengine, prompt, params=GREEDY):
    outs = [o async for o in aengine.generate(prompt, params)]
    return outs


def test_concurrent_streams_match_hf_and_grow_monotonically(engine, prompts, hf_reference):
    async def main():
        aengine = AsyncEngine(engine)
        results = await asyncio.gather(*(collect(aengine, p) for p in prompts * 4))
        await aengine.shutdown()
        return results

    results = asyncio.run(main())
    refs = [ref for ref, _ in hf_reference["mistral"]] * 4
    for outs, ref in zip(results, refs, strict=True):
        assert outs[-1].token_ids == ref and outs[-1].finish_reason == "length"
        lengths = [len(o.token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[0] >= 1
        assert not any(o.finished for o in outs[:-1])
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not engine.requests


def test_a_consumer_that_stops_aborts_and_frees_kv(engine, prompts, hf_reference):
    async def main():
        aengine = AsyncEngine(engine)
        long = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)
        gen = aengine.generate(prompts[7], long)
        first = await gen.__anext__()
        assert engine.kv.num_used_blocks > 0
        other = asyncio.create_task(collect(aengine, prompts[2]))
        await gen.aclose()  # the client went away
        for _ in range(100):
            await asyncio.sleep(0.01)
            if aengine.num_unfinished <= 1:
                break
        done = await other
        await aengine.shutdown()
        return first, done

    first, done = asyncio.run(main())
    assert len(first.token_ids) >= 1
    assert done[-1].token_ids == hf_reference["mistral"][2][0]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_queue_limit_and_bad_requests_fail_alone(engine, prompts, hf_reference):
    async def main():
        aengine = AsyncEngine(engine, max_queued=2)
        a = asyncio.create_task(collect(aengine, prompts[0]))
        await asyncio.sleep(0)
        with pytest.raises(BadRequestError, match="vocabulary"):
            await collect(aengine, [1, 10_000])
        b = asyncio.create_task(collect(aengine, prompts[1]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="limit 2"):
            await collect(aengine, prompts[2])
        res = await asyncio.gather(a, b)
        await aengine.shutdown()
        return res

    a, b = asyncio.run(main())
    assert a[-1].token_ids == hf_reference["mistral"][0][0]
    assert b[-1].token_ids == hf_reference["mistral"][1][0]


def test_steps_run_on_one_thread_of_their_own(engine, prompts):
    """Every step runs on the same worker thread (one OpenMP thread pool), never on the event
    loop's; the thread that starts the loop has given its OpenMP threads back, and torch still
    computes right after that."""
    import threading

    import torch

    threads = set()
    step = engine.step

    def spy():
        threads.add(threading.get_ident())
        return step()

    engine.step = spy

    async def main():
        aengine = AsyncEngine(engine)
        await asyncio.gather(*(collect(aengine, p) for p in prompts[:3]))
        await aengine.shutdown()

    asyncio.run(main())
    assert len(threads) == 1 and threading.get_ident() not in threads
    a = torch.randn(256, 256)
    torch.testing.assert_close(a @ a, (a.double() @ a.double()).float(), rtol=1e-4, atol=1e-3)
