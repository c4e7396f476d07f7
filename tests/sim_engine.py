"""Scheduler-test helpers: a scheduler over a fresh allocator, a lone sequence, and the real
Engine with executor=sim (no model) driving requests to completion while every step is checked
against the allocator's invariants."""

from __future__ import annotations

from collections.abc import Callable

import torch

from modgen import registry
from modgen.engine import Engine
from modgen.engine.executor import ExecutorContext
from modgen.engine.kv import KVAllocator
from modgen.engine.scheduling import Scheduler, StepPlan
from modgen.engine.sequence import SeqStatus, Sequence
from modgen.model import ModelSpec
from modgen.sampling_params import SamplingParams

SPEC = ModelSpec(
    family="test", vocab_size=1000, max_position_embeddings=1_000_000, eos_token_ids=(2,),
    num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
    head_dim=16, sliding_window=None, dtype="float32",
)  # fmt: skip
COST = {"name": "roofline", "peak_tflops": 1.0, "bandwidth_gbps": 100.0}


def make_scheduler(
    name: str, *, num_blocks: int = 10_000, block_size: int = 4, allocator: str = "blocked",
    **knobs,
) -> tuple[Scheduler, KVAllocator]:  # fmt: skip
    """A scheduler of registry ``name`` over a fresh allocator (``blocked`` by default)."""
    kv_cfg = registry.to_config("kv_allocator", {"name": allocator, "block_size": block_size})
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


def make_engine(
    name: str, *, num_blocks: int = 10_000, block_size: int = 4, allocator: str = "blocked",
    **knobs,
) -> Engine:  # fmt: skip
    """The real Engine over scheduler ``name`` with ``executor=sim`` (a roofline cost model)."""
    sched, kv = make_scheduler(
        name, num_blocks=num_blocks, block_size=block_size, allocator=allocator, **knobs
    )
    ctx = ExecutorContext(spec=SPEC, kv=kv, model=None, attention=None, cost_model=COST,
                          device=torch.device("cpu"))  # fmt: skip
    return Engine(SPEC, kv, sched, registry.build("executor", {"name": "sim"}, ctx))


def check_kv(kv: KVAllocator, seqs: list[Sequence]) -> None:
    """No block is held twice (unless the allocator shares cached blocks), none is lost, and
    only running sequences hold any."""
    held = [b for s in seqs for b in kv.block_table(s.seq_id)]
    if kv.registry_name == "blocked":
        assert len(held) == len(set(held)), "a block is held by two sequences"
    assert len(set(held)) + kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    for s in seqs:
        if s.status is not SeqStatus.RUNNING:
            assert not kv.block_table(s.seq_id), f"seq {s.seq_id} holds KV while {s.status}"


def run(
    engine: Engine,
    requests: list[tuple[int | list[int], int]],
    arrivals: list[int] | None = None,
    on_step: Callable[[StepPlan, dict], None] | None = None,
    max_steps: int = 100_000,
) -> list[Sequence]:
    """Drive ``requests`` (prompt length or prompt token ids, tokens to generate), arriving at
    the given step numbers, through ``engine`` to completion; returns their sequences in order.

    ``on_step(plan, before)`` sees each plan and a snapshot of the queues taken before it."""
    sched, kv = engine.scheduler, engine.kv
    schedule = sched.schedule

    def checked() -> StepPlan:
        before = {
            "decodes": sum(s.is_decode for s in sched.running),
            "prompt_tokens": sum(s.num_pending for s in sched.running if not s.is_decode)
            + sum(s.num_pending for s in sched.waiting),
            "running": len(sched.running),
            "decode_seqs": [s for s in sched.running if s.is_decode],
            "uncached_prompt_tokens": sum(s.num_pending for s in sched.running if not s.is_decode)
            + sum(sched.num_uncached(s) for s in sched.waiting),
        }
        plan = schedule()
        assert len({id(c.seq) for c in plan.chunks}) == len(plan.chunks), "a sequence twice"
        for c in plan.chunks:
            assert 1 <= c.num_tokens <= c.seq.num_pending
            have = len(kv.block_table(c.seq.seq_id)) * kv.block_size
            assert have >= c.seq.num_computed + c.num_tokens, "chunk without KV slots"
        if on_step:
            on_step(plan, before)
        return plan

    sched.schedule = checked  # type: ignore[method-assign]
    arrivals = arrivals or [0] * len(requests)
    pending = sorted(zip(arrivals, range(len(requests)), strict=True))
    seqs: list[Sequence | None] = [None] * len(requests)
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            i = pending.pop(0)[1]
            prompt, max_tokens = requests[i]
            prompt = [1] * prompt if isinstance(prompt, int) else prompt
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            seqs[i] = engine.add_request(prompt, params, request_id=str(i))
        if engine.has_unfinished():
            engine.step()
            check_kv(kv, [s for s in seqs if s is not None])
        step += 1
        assert step < max_steps, "livelock"
    return [s for s in seqs if s is not None]
