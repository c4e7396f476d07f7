"""The scheduler API for variants (no model): SplitFuse's phases keep the budget, decodes that do
not fit the budget rotate fairly, a preempted sequence is not preempted again ahead of others
that hold more KV, and ``max_passes`` lets small prompts pass a blocked large one without
starving it. Every SplitFuse variant passes the same properties."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sim_engine import make_engine, make_scheduler, make_seq, run

from modgen.engine.async_engine import AsyncEngine
from modgen.engine.scheduling import StepPlan
from modgen.engine.sequence import SeqStatus

SPLITFUSE_LIKE = ["splitfuse", "splitfuse_priority", "splitfuse_spf"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
requests = st.lists(
    st.tuples(st.integers(1, 60), st.integers(1, 30), st.integers(0, 20)), min_size=1, max_size=24
)


def watch_preemptions(engine) -> list[tuple]:
    """Record, at each preemption, the victim's earlier preemptions and the KV blocks of every
    other running sequence but the oldest."""
    sched, events = engine.scheduler, []
    preempt = sched.preempt

    def spy(victim, plan):
        others = [
            len(engine.kv.block_table(s.seq_id)) for s in sched.running[1:] if s is not victim
        ]
        mine = len(engine.kv.block_table(victim.seq_id))
        events.append((victim.metrics.num_preemptions, mine, others))
        preempt(victim, plan)

    sched.preempt = spy
    return events


def check_fair_decodes(budget: int):
    """An on_step callback: no running decode goes unserved for ceil(running / budget) steps in
    a row (running counted from the step that last served it)."""
    gap: dict[int, int] = {}
    window: dict[int, int] = {}

    def on_step(plan: StepPlan, before: dict) -> None:
        served = {id(c.seq) for c in plan.chunks}
        for seq in before["decode_seqs"]:
            key = id(seq)
            window[key] = max(window.get(key, 0), before["running"])
            if key in served or seq.status is not SeqStatus.RUNNING:
                gap[key], window[key] = 0, before["running"]
                continue
            gap[key] = gap.get(key, 0) + 1
            assert gap[key] < math.ceil(window[key] / budget), (
                f"decode {seq.seq_id} unserved {gap[key]} steps with {window[key]} running"
            )
        for c in plan.chunks:  # a prompt chunk stamps its sequence too
            window[id(c.seq)] = before["running"]

    return on_step


@SETTINGS
@given(
    reqs=requests,
    name=st.sampled_from(SPLITFUSE_LIKE),
    budget=st.integers(1, 12),
    block_size=st.integers(1, 8),
    extra=st.integers(0, 30),
)
def test_phases_keep_budget_rotate_decodes_and_never_ping_pong(
    reqs, name, budget, block_size, extra
):
    num_blocks = max(-(-(p + g) // block_size) for p, g, _ in reqs) + extra
    engine = make_engine(name, num_blocks=num_blocks, block_size=block_size, token_budget=budget)
    events = watch_preemptions(engine)
    fair = check_fair_decodes(budget)

    def on_step(plan, before):
        assert plan.num_tokens <= budget
        assert plan.num_tokens == sum(c.num_tokens for c in plan.chunks)
        fair(plan, before)

    seqs = run(engine, [(p, g) for p, g, _ in reqs], [a for *_, a in reqs], on_step)
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert [s.num_output_tokens for s in seqs] == [g for _, g, _ in reqs]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    for earlier, mine, others in events:
        if earlier:  # a sequence preempted before is chosen only if none holds more KV
            assert all(o <= mine for o in others), (mine, others)


def test_decodes_that_do_not_fit_the_budget_take_turns():
    """12 running decodes, budget 5: each is served within ceil(12 / 5) = 3 steps (the same
    seven were skipped at every step before)."""
    sched, _ = make_scheduler("splitfuse", token_budget=5)
    seqs = [make_seq(i, 3, 100) for i in range(12)]
    for seq in seqs:
        sched.add(seq)
        assert sched.admit(seq, 4)
        seq.token_ids.append(5)
        seq.num_computed = 3
    served = []
    for _ in range(9):
        plan = sched.schedule()
        assert plan.num_tokens == 5 and all(c.seq.is_decode for c in plan.chunks)
        served.append({c.seq.seq_id for c in plan.chunks})
        for c in plan.chunks:
            c.seq.num_computed += 1
            c.seq.token_ids.append(5)
    for i in range(len(served) - 2):
        assert set().union(*served[i : i + 3]) == set(range(12))


def test_a_readmitted_victim_is_not_preempted_again_ahead_of_larger_ones():
    sched, kv = make_scheduler("splitfuse", num_blocks=9, block_size=4, token_budget=64)
    a, b, c = make_seq(0, 8, 20), make_seq(1, 8, 20), make_seq(2, 3, 20)
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()  # all three admitted: 2 + 2 + 1 blocks
    sched.preempt(c, StepPlan())  # c is preempted once, and admitted again (1 block)
    assert sched.admit(c, c.num_tokens) and sched.running == [a, b, c]
    for s, n in ((a, 20), (b, 12)):  # a grows to 5 blocks, b to 3: none is free
        s.token_ids += [5] * (n - s.num_tokens)
        s.num_computed = n - 1
        kv.allocate(s.seq_id, n)
    assert kv.num_free_blocks == 0
    b.token_ids.append(5)  # b's next decode needs a fourth block
    b.num_computed = b.num_tokens - 1
    plan = StepPlan()
    assert not sched.reserve_or_preempt(b, b.num_tokens, plan)
    # LIFO would preempt c again; b holds more KV and was never preempted: b goes
    assert plan.preempted == [b] and sched.running == [a, c]
    assert kv.num_free_blocks == 3


def test_max_passes_lets_small_prompts_pass_a_blocked_one_without_starving_it():
    def first_admissions(max_passes: int) -> list[int]:
        engine = make_engine(
            "splitfuse", num_blocks=12, block_size=4, token_budget=16, max_passes=max_passes
        )
        order: list[int] = []

        def on_step(plan, before):
            order.extend(int(c.seq.request_id) for c in plan.chunks if c.seq.num_computed == 0)

        # a long runner holds 6 blocks; a 40-token prompt (10 blocks) waits behind it; then
        # small prompts that fit beside the runner
        run(engine, [(20, 12), (40, 2), (4, 2), (4, 2), (4, 2), (4, 2)], [0, 1, 2, 2, 2, 2],
            on_step=on_step)  # fmt: skip
        return list(dict.fromkeys(order))

    assert first_admissions(0) == [0, 1, 2, 3, 4, 5]  # FastGen: strict order
    passing = first_admissions(2)
    assert passing.index(2) < passing.index(1)  # small prompts went past the blocked one
    assert passing.index(1) < passing.index(5)  # ... twice at most


def test_priority_variant_admits_and_preempts_by_priority():
    sched, kv = make_scheduler("splitfuse_priority", num_blocks=6, block_size=4, token_budget=8)
    low, high, mid = make_seq(0, 8, 9), make_seq(1, 8, 9), make_seq(2, 4, 9)
    low.priority, high.priority, mid.priority = 5, -1, 0
    for s in (low, high, mid):
        sched.add(s)
    plan = sched.schedule()  # high goes first (and fills the budget)
    assert [c.seq for c in plan.chunks] == [high]
    assert [s.seq_id for s in sched.admission_order()] == [2, 0]
    high.num_computed = 8
    high.token_ids.append(5)
    plan = sched.schedule()  # high decodes (a third block); mid before low, which gets the rest
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.chunks] == [(1, 1), (2, 4), (0, 3)]
    assert kv.num_free_blocks == 0
    assert sched.running == [high, mid, low]
    assert sched.pick_victim(high) is low  # the lowest priority goes first, whatever its age
    mid.priority = 9
    assert sched.pick_victim(high) is mid  # not the last admitted


def test_a_high_priority_prompt_goes_before_a_low_priority_remainder():
    sched, _ = make_scheduler("splitfuse_priority", token_budget=10)
    long_, short = make_seq(0, 40, 2), make_seq(1, 6, 2)
    long_.priority = 1
    sched.add(long_)
    plan = sched.schedule()
    long_.num_computed += plan.chunks[0].num_tokens
    sched.add(short)
    plan = sched.schedule()  # plain SplitFuse: the remainder first, [(0, 10)]
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.chunks] == [(1, 6), (0, 4)]


def test_shortest_prompt_first_with_aging():
    sched, _ = make_scheduler("splitfuse_spf", token_budget=4, max_passes=2)
    long_ = make_seq(0, 30, 2)
    sched.add(long_)
    shorts = [make_seq(i, 2, 2) for i in range(1, 6)]
    for s in shorts:
        sched.add(s)
    admitted = []
    for _ in range(4):
        plan = sched.schedule()
        admitted += [c.seq.seq_id for c in plan.chunks if c.seq.num_computed == 0]
        for c in plan.chunks:
            c.seq.num_computed += c.num_tokens
    # two short prompts go first; then the long one, passed twice, takes its turn
    assert admitted[:3] == [1, 2, 0]


def test_the_streaming_engine_tells_its_scheduler_it_is_online():
    """``AsyncEngine`` (the server, the bench's clients) marks the scheduler online; an engine
    driven directly (offline batches) leaves it offline."""
    engine = make_engine("continuous")
    assert engine.scheduler.online is False
    AsyncEngine(engine)
    assert engine.scheduler.online is True
