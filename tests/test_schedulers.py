"""Scheduler properties without a model (hypothesis): budgets hold, decodes come first, SplitFuse
fills its budget exactly, every request finishes under KV pressure, no block leaks."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_engine import make_engine, make_scheduler, make_seq, run

from modgen.engine.sequence import SeqStatus
from modgen.sampling_params import BadRequestError

requests = st.lists(
    st.tuples(st.integers(1, 80), st.integers(1, 20), st.integers(0, 30)), min_size=1, max_size=12
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _requests(reqs):
    return [(p, g) for p, g, _ in reqs], [a for *_, a in reqs]


def _tight_blocks(reqs, block_size, extra):
    """Just enough blocks for the largest request alone, plus ``extra``."""
    return max(-(-(p + g) // block_size) for p, g, _ in reqs) + extra


def decodes_first(plan) -> bool:
    kinds = [c.seq.is_decode for c in plan.chunks]
    return kinds == sorted(kinds, reverse=True)


SPLITFUSE_LIKE = ["splitfuse", "splitfuse_priority", "splitfuse_spf"]  # the variants pass too


@SETTINGS
@given(
    reqs=requests,
    name=st.sampled_from(SPLITFUSE_LIKE),
    budget=st.integers(1, 64),
    block_size=st.integers(1, 16),
)
def test_splitfuse_fills_budget_exactly_with_decodes_first(reqs, name, budget, block_size):
    engine = make_engine(name, block_size=block_size, token_budget=budget)
    requests, arrivals = _requests(reqs)

    def on_step(plan, before):
        assert plan.num_tokens <= budget
        assert decodes_first(plan)
        # ample KV and no sequence cap: decodes, then prompt chunks up to the exact budget
        assert plan.num_tokens == min(budget, before["decodes"] + before["prompt_tokens"])
        assert plan.num_decode_tokens == min(budget, before["decodes"])

    seqs = run(engine, requests, arrivals, on_step)
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert [s.num_output_tokens for s in seqs] == [g for _, g, _ in reqs]


@SETTINGS
@given(
    reqs=requests,
    name=st.sampled_from([*SPLITFUSE_LIKE, "continuous", "static"]),
    budget=st.integers(1, 64),
    block_size=st.integers(1, 8),
    extra=st.integers(0, 6),
)
def test_every_request_finishes_under_kv_pressure(reqs, name, budget, block_size, extra):
    num_blocks = _tight_blocks(reqs, block_size, extra)
    splitfuse = name in SPLITFUSE_LIKE
    knobs = {"token_budget": budget} if splitfuse else {}
    engine = make_engine(name, num_blocks=num_blocks, block_size=block_size, **knobs)
    requests, arrivals = _requests(reqs)
    limit = budget if splitfuse else engine.scheduler.config.max_num_batched_tokens

    def on_step(plan, before):
        assert plan.num_tokens <= limit
        assert decodes_first(plan)
        if not splitfuse:  # no chunking: a step is all prefills or all decodes
            assert plan.num_decode_tokens in (0, plan.num_tokens)
        if name == "static" and plan.num_prefill_tokens:
            assert before["running"] == 0 or not any(c.seq.num_computed for c in plan.chunks)

    seqs = run(engine, requests, arrivals, on_step)
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert [s.num_output_tokens for s in seqs] == [g for _, g, _ in reqs]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_preemption_happens_and_recomputes_prompt_plus_output():
    engine = make_engine("splitfuse", num_blocks=6, block_size=4, token_budget=64)
    recomputed = []

    def on_step(plan, before):
        for c in plan.chunks:
            if c.seq.metrics.num_preemptions and c.seq.num_computed == 0:
                recomputed.append(c.seq.num_pending)

    seqs = run(engine, [(8, 12)] * 3, on_step=on_step)  # each needs 5 blocks at the end
    assert sum(s.metrics.num_preemptions for s in seqs) > 0
    assert any(n > 8 for n in recomputed), "a preempted sequence recomputes its output too"


def test_split_prompt_remainder_goes_first():
    sched, _kv = make_scheduler("splitfuse", token_budget=10)
    a, b = make_seq(0, 25, 2), make_seq(1, 5, 2)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.chunks] == [(0, 10)]
    a.num_computed += 10
    plan = sched.schedule()
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.chunks] == [(0, 10)]
    a.num_computed += 10
    plan = sched.schedule()  # a's last 5 tokens, then b fills the budget exactly
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.chunks] == [(0, 5), (1, 5)]


def test_prompt_admitted_only_when_whole_remainder_fits():
    sched, kv = make_scheduler("splitfuse", num_blocks=5, block_size=4, token_budget=4)
    big = make_seq(0, 24, 1)  # needs 6 blocks > 5: never fits alone either
    with pytest.raises(BadRequestError, match="exceeds the KV cache"):
        sched.check(big)
    a, b = make_seq(1, 12, 1), make_seq(2, 12, 1)  # 3 blocks each
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [c.seq.seq_id for c in plan.chunks] == [1]  # b does not fit beside a
    assert kv.num_free_blocks == 2
    assert list(sched.waiting) == [b]


def test_max_num_seqs_caps_running_sequences():
    engine = make_engine("splitfuse", token_budget=100, max_num_seqs=2)

    def on_step(plan, before):
        assert len(plan) <= 2
        assert len(engine.scheduler.running) <= 2

    run(engine, [(3, 4)] * 5, on_step=on_step)


def test_continuous_rejects_requests_longer_than_its_batch():
    sched, _ = make_scheduler("continuous", max_num_batched_tokens=16)
    with pytest.raises(BadRequestError, match="max_num_batched_tokens"):
        sched.check(make_seq(0, 10, 10))


def test_admit_takes_the_sequence_it_is_given():
    """A variant that picks another waiting sequence than the head admits that one."""
    sched, kv = make_scheduler("splitfuse", block_size=4)
    a, b, c = make_seq(0, 8, 1), make_seq(1, 5, 1), make_seq(2, 3, 1)
    for s in (a, b, c):
        sched.add(s)
    assert sched.admit(b, b.num_tokens)
    assert list(sched.waiting) == [a, c]
    assert sched.running == [b]
    assert b.status is SeqStatus.RUNNING and len(kv.block_table(b.seq_id)) == 2
    assert not kv.block_table(a.seq_id)
