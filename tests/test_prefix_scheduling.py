"""Schedulers over the prefix-caching allocator, without a model (the real Engine with
executor=sim): only uncached tokens count against the budget, at least one token is computed
per admission, every request finishes under KV pressure (preemption releases references only),
nothing leaks, and the cache is hit."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_engine import make_engine, run

from modgen.engine.sequence import SeqStatus

SCHEDULERS = ["splitfuse", "splitfuse_priority", "splitfuse_spf", "continuous", "static"]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASES = [[7] * 40, list(range(3, 43)), [5, 6] * 20]
# a request: a base prompt's first `shared` tokens, a unique tail, tokens to generate, arrival
requests = st.lists(
    st.tuples(
        st.integers(0, 2), st.integers(0, 40), st.integers(0, 6), st.integers(1, 12),
        st.integers(0, 25),
    ),
    min_size=1, max_size=14,
)  # fmt: skip


def _build(reqs):
    prompts = [BASES[b][:shared] + [900 + i] * tail or [1] for i, (b, shared, tail, *_) in
               enumerate(reqs)]  # fmt: skip
    return [(p, g) for p, (*_, g, _) in zip(prompts, reqs, strict=True)], [a for *_, a in reqs]


def _knobs(name, budget):
    return {"token_budget": budget} if name.startswith("splitfuse") else {}


@SETTINGS
@given(
    reqs=requests,
    name=st.sampled_from(SCHEDULERS),
    budget=st.integers(1, 48),
    block_size=st.integers(1, 8),
    extra=st.integers(0, 12),
)
def test_prefix_cache_under_every_scheduler(reqs, name, budget, block_size, extra):
    reqs_, arrivals = _build(reqs)
    blocks = [-(-(len(p) + g) // block_size) for p, g in reqs_]
    # extra < 12: KV for the largest request and a little more (pressure, preemption); 12: for
    # every request at once, so that nothing but the budget limits a step
    num_blocks = (max(blocks) if extra < 12 else sum(blocks)) + extra
    engine = make_engine(name, num_blocks=num_blocks, block_size=block_size, allocator="prefix",
                         **_knobs(name, budget))  # fmt: skip
    splitfuse = name.startswith("splitfuse")
    limit = budget if splitfuse else engine.scheduler.config.max_num_batched_tokens

    def on_step(plan, before):
        assert plan.num_tokens <= limit
        if splitfuse and extra >= 12:  # ample KV: the budget is filled exactly, by decodes and
            # uncached prompt tokens only
            want = min(budget, before["decodes"] + before["uncached_prompt_tokens"])
            assert plan.num_tokens == want

    seqs = run(engine, reqs_, arrivals, on_step)
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert [s.num_output_tokens for s in seqs] == [g for _, g in reqs_]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    for s in seqs:
        assert 0 <= s.metrics.num_cached_tokens < s.num_prompt_tokens
        assert s.metrics.num_cached_tokens % block_size == 0


@pytest.mark.parametrize("name", SCHEDULERS)
def test_later_requests_skip_the_shared_prefix(name):
    """Requests that arrive after a 64-token system prompt was computed compute only their
    own suffix (with one prefix block recomputed where the prompt is the prefix itself)."""
    engine = make_engine(name, block_size=16, allocator="prefix", **_knobs(name, 512))
    system = list(range(100, 164))
    reqs = [([*system, 7, 8, 9], 4), (system + [1] * 20, 4), (system, 4), (system[:40], 4)]
    computed = {}

    def on_step(plan, before):
        for c in plan.chunks:
            if not c.seq.is_decode:
                computed[c.seq.request_id] = computed.get(c.seq.request_id, 0) + c.num_tokens

    seqs = run(engine, reqs, arrivals=[0, 20, 21, 22], on_step=on_step)
    assert [s.metrics.num_cached_tokens for s in seqs] == [0, 64, 48, 32]
    assert computed == {"0": 67, "1": 20, "2": 16, "3": 8}
    report = engine.kv.report()
    assert report["prefix_cache_hits"] == 64 + 48 + 32
    assert report["prefix_cache_queries"] == 67 + 84 + 64 + 40


def test_preemption_keeps_shared_blocks_for_the_others():
    """A victim that shares its prefix with running sequences releases its references only:
    the others go on reading the shared blocks, and the victim's recompute hits them too."""
    engine = make_engine("splitfuse", num_blocks=14, block_size=4, allocator="prefix",
                         token_budget=64)  # fmt: skip
    system = list(range(10, 26))  # 4 blocks
    reqs = [(system, 24), ([*system, 1], 24), ([*system, 2], 24)]
    seqs = run(engine, reqs, arrivals=[0, 1, 1])
    assert sum(s.metrics.num_preemptions for s in seqs) > 0
    assert all(s.num_output_tokens == 24 for s in seqs)
    assert engine.kv.report()["prefix_cache_hits"] > 2 * 12
    assert engine.kv.num_free_blocks == 14


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_cache_too_small_for_one_request_says_what_it_needs(name):
    from modgen.sampling_params import BadRequestError, SamplingParams

    engine = make_engine(name, num_blocks=5, block_size=4, allocator="prefix")
    with pytest.raises(BadRequestError, match=r"needs 6 blocks of 4 tokens and the cache has 5"):
        engine.add_request([1] * 20, SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()
