"""A model-free driver for scheduler tests: sequences advance as if a model ran (the token
sampled is always 0) while every step is checked against the allocator's invariants."""

from __future__ import annotations

from collections.abc import Callable

from modgen import registry
from modgen.kv import KVAllocator
from modgen.sampling_params import SamplingParams
from modgen.scheduling import Scheduler, StepPlan
from modgen.sequence import FinishReason, SeqStatus, Sequence


def make_scheduler(
    name: str, *, num_blocks: int = 10_000, block_size: int = 4, **knobs
) -> tuple[Scheduler, KVAllocator]:
    """A scheduler of registry ``name`` over a fresh blocked allocator."""
    kv_cfg = registry.to_config("kv_allocator", {"name": "blocked", "block_size": block_size})
    kv = registry.build("kv_allocator", kv_cfg, num_blocks)
    return registry.build("scheduler", {"name": name, **knobs}, kv), kv


def make_seq(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    """A sequence with a prompt of ``prompt_len`` tokens that generates ``max_tokens``."""
    return Sequence(
        seq_id=seq_id,
        request_id=str(seq_id),
        prompt_token_ids=[1] * prompt_len,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        max_total_tokens=prompt_len + max_tokens,
    )


def check_kv(kv: KVAllocator, seqs: list[Sequence]) -> None:
    """No block is held twice, none is lost, and only running sequences hold any."""
    held = [b for s in seqs for b in kv.block_table(s.seq_id)]
    assert len(held) == len(set(held)), "a block is held by two sequences"
    assert len(held) + kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    for s in seqs:
        if s.status is not SeqStatus.RUNNING:
            assert not kv.block_table(s.seq_id), f"seq {s.seq_id} holds KV while {s.status}"


def run(
    sched: Scheduler,
    kv: KVAllocator,
    seqs: list[Sequence],
    arrivals: list[int] | None = None,
    on_step: Callable[[StepPlan, dict], None] | None = None,
    max_steps: int = 100_000,
) -> int:
    """Drive ``seqs`` (arriving at the given step numbers) to completion; returns steps taken.

    ``on_step(plan, before)`` sees each plan and a snapshot of the queues taken before it.
    """
    arrivals = arrivals or [0] * len(seqs)
    pending = sorted(zip(arrivals, range(len(seqs)), strict=True))
    step = 0
    while pending or sched.has_work():
        while pending and pending[0][0] <= step:
            sched.add(seqs[pending.pop(0)[1]])
        if not sched.has_work():
            step += 1
            continue
        before = {
            "decodes": sum(s.is_decode for s in sched.running),
            "prompt_tokens": sum(s.num_pending for s in sched.running if not s.is_decode)
            + sum(s.num_pending for s in sched.waiting),
            "running": len(sched.running),
        }
        plan = sched.schedule()
        assert plan.chunks, "no progress while sequences wait"
        assert len({id(c.seq) for c in plan.chunks}) == len(plan.chunks), "a sequence twice"
        for c in plan.chunks:
            assert 1 <= c.num_tokens <= c.seq.num_pending
            have = len(kv.block_table(c.seq.seq_id)) * kv.block_size
            assert have >= c.seq.num_computed + c.num_tokens, "chunk without KV slots"
        if on_step:
            on_step(plan, before)
        for c in plan.chunks:
            completes = c.completes
            c.seq.num_computed += c.num_tokens
            if completes:
                c.seq.token_ids.append(0)
                if c.seq.num_tokens >= c.seq.max_total_tokens:
                    c.seq.status, c.seq.finish_reason = SeqStatus.FINISHED, FinishReason.LENGTH
                    kv.free(c.seq.seq_id)
                    sched.remove(c.seq)
        check_kv(kv, seqs)
        step += 1
        assert step < max_steps, "livelock"
    return step
