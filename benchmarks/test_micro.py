"""Per-step overheads: scheduling, KV allocation, one attention call, one engine step."""

from __future__ import annotations

import pytest
import torch
from sim_engine import make_scheduler, make_seq

from modgen import LLM, SamplingParams, registry
from modgen.engine.batch import build_ragged_batch
from modgen.engine.scheduling import StepPlan


def scheduler_with(name: str, num_running: int, num_waiting: int, **knobs):
    """A scheduler holding ``num_running`` decoding and ``num_waiting`` waiting sequences."""
    sched, kv = make_scheduler(name, num_blocks=200_000, block_size=16, **knobs)
    for i in range(num_running):
        seq = make_seq(i, 100, 50)
        sched.add(seq)
    while sched.waiting:  # admit and prefill everyone, then give each an output token
        plan = sched.schedule()
        for c in plan.chunks:
            c.seq.num_computed += c.num_tokens
            if c.seq.num_pending == 0:
                c.seq.token_ids.append(0)
    for i in range(num_waiting):
        sched.add(make_seq(num_running + i, 300, 50))
    return sched, kv


@pytest.mark.parametrize("name", ["splitfuse", "continuous"])
def test_scheduler_step_1000_running_1000_waiting(benchmark, name):
    knobs = {"token_budget": 2048} if name == "splitfuse" else {}

    def setup():
        sched, _ = scheduler_with(name, 1000, 1000, max_num_seqs=1024, **knobs)
        return (sched,), {}

    plan = benchmark.pedantic(lambda s: s.schedule(), setup=setup, rounds=10)
    assert plan.chunks


def test_allocator_allocate_free_1000_sequences(benchmark):
    cfg = registry.to_config("kv_allocator", {"name": "blocked", "block_size": 16})
    kv = registry.build("kv_allocator", cfg, 100_000)

    def cycle():
        for i in range(1000):
            kv.allocate(i, 1000)
        for i in range(1000):
            kv.free(i)

    benchmark(cycle)
    assert kv.num_free_blocks == 100_000


def test_prefix_allocator_admit_free_1000_sequences_sharing_a_prefix(benchmark):
    """Each admission looks up a cached 1024-token system prompt (64 blocks) and takes 5 new
    blocks for its own 64 tokens; then every sequence is freed."""
    cfg = registry.to_config("kv_allocator", {"name": "prefix", "block_size": 16})
    kv = registry.build("kv_allocator", cfg, 100_000)
    system = list(range(1024))
    kv.allocate_sequence(0, system, 1024)
    kv.cache_blocks(0, system, 1024)
    prompts = [[*system, *([i + 5000] * 64)] for i in range(1000)]

    def cycle():
        for i, tokens in enumerate(prompts, start=1):
            kv.allocate_sequence(i, tokens, len(tokens))
        for i in range(1, 1001):
            kv.free(i)

    benchmark(cycle)
    assert kv.report()["prefix_cache_hits"] >= 1000 * 1024


def _attention_case(num_decodes: int, ctx: int, prefill: int):
    """A batch of ``num_decodes`` decodes at context ``ctx`` plus one ``prefill``-token chunk."""
    _, kv = make_scheduler("splitfuse", num_blocks=20_000, block_size=16)
    plan = StepPlan()
    for i in range(num_decodes):
        seq = make_seq(i, ctx, 4)
        seq.token_ids.append(0)
        seq.num_computed = ctx
        kv.allocate(i, ctx + 1)
        plan.add(seq, 1)
    if prefill:
        seq = make_seq(num_decodes, prefill, 4)
        kv.allocate(num_decodes, prefill)
        plan.add(seq, prefill)
    batch = build_ragged_batch(plan, kv, torch.device("cpu"))
    num_slots = kv.num_blocks * kv.block_size
    cache = (torch.randn(num_slots, 2, 64), torch.randn(num_slots, 2, 64))
    t = batch.num_tokens
    qkv = torch.randn(t, 8, 64), torch.randn(t, 2, 64), torch.randn(t, 2, 64)
    return batch, cache, qkv


@pytest.mark.parametrize(
    ("decodes", "ctx", "prefill"),
    [(64, 512, 0), (256, 1024, 0), (0, 0, 512), (32, 1024, 480)],
    ids=["64dec@512", "256dec@1024", "prefill512", "mixed32dec+480"],
)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_attention_one_layer(benchmark, backend, decodes, ctx, prefill):
    attn = registry.build("attention", {"name": backend})
    batch, cache, (q, k, v) = _attention_case(decodes, ctx, prefill)

    def step():  # q/k arrive rotated: the cpu kernel's RoPE is not timed here
        meta = attn.prepare(batch)
        return attn.forward(q, k, v, cache, batch, meta, 0.125, None)

    out = benchmark(step)
    assert out.shape == q.shape


def test_engine_step_small_preset(benchmark):
    """One SplitFuse step (budget 512) of the small mistral preset with 32 decodes running."""
    llm = LLM("mistral", overrides=["+scheduler=splitfuse", "kv_allocator.memory_gb=0.25"])
    engine = llm.engine
    params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
    for i in range(32):
        engine.add_request([(7 * i + j) % 32000 for j in range(200)], params)
    while any(not s.is_decode for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for i in range(8):  # waiting prompts so every step is a full mixed 512-token step
        engine.add_request([(3 * i + j) % 32000 for j in range(4000)], params)
    benchmark.pedantic(engine.step, rounds=15, warmup_rounds=2)
    assert engine.stats[-1].num_tokens == 512


def test_simulated_steps_per_second(benchmark):
    """executor=sim at FastGen's scale: Llama-2-70B on 4 simulated A100s, 256 requests of
    FastGen's benchmark (prompts ~2600, outputs ~60) offline; reports steps simulated a second."""
    sim = ["executor=sim", "cost_model=a100-80gb", "engine.tensor_parallel=4",
           "kv_allocator.memory_gb=160", "+scheduler=splitfuse"]  # fmt: skip
    specs = registry.build(
        "workload",
        {
            "name": "synthetic",
            "num_requests": 256,
            "prompt_mean": 2600,
            "output_mean": 60,
            "max_prompt": 3900,
            "max_output": 190,
        },
    ).requests(32000)

    def simulate():
        engine = LLM("llama-2-70b", overrides=sim).engine
        for s in specs:
            params = SamplingParams(max_tokens=s.output_len, ignore_eos=True, temperature=0)
            engine.add_request(s.prompt, params)
        while engine.has_unfinished():
            engine.step()
        return len(engine.stats)

    steps = benchmark.pedantic(simulate, rounds=3)
    benchmark.extra_info["steps_per_second"] = steps / benchmark.stats.stats.median
    assert steps > 1000
