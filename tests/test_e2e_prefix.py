"""The oracle with a prefix cache: greedy outputs with ``kv_allocator=prefix`` are identical to
Hugging Face transformers (and so to ``kv_allocator=blocked``) on prompts that share prefixes of
every alignment relative to the block size (shorter than a block, exactly one block, a block
plus one token, a whole prompt, a whole prompt that ends on a block boundary, a conversation
that resends an answer), under every scheduler, with and without preemption."""

from __future__ import annotations

import random

import pytest
from conftest import MAX_NEW

from modgen import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
BLOCK = 4


def shared_prompts(base: list[int], answer: list[int], bs: int) -> list[list[int]]:
    """Prompts sharing prefixes of ``base`` (computed first) at every alignment to ``bs``."""
    rng = random.Random(7)

    def tail() -> list[int]:
        return [rng.randrange(3, 96) for _ in range(5)]

    return [
        base[: bs - 1] + tail() if bs > 1 else tail(),  # shorter than one block
        base[:bs] + tail(),  # exactly one block
        base[: bs + 1] + tail(),  # a block plus one token
        list(base),  # the whole prompt
        base[: 2 * bs],  # a whole prompt ending on a block boundary: its last block is redone
        base + tail(),  # a whole prompt, then more
        base + answer + tail(),  # the next turn of a conversation: history and a new message
    ]


@pytest.fixture(scope="module")
def cases(checkpoints):
    """Per model: the base prompt, the shared-prefix prompts (block size 4) and HF's outputs."""
    from checkpoints import hf_greedy, hf_model

    rng = random.Random(3)
    base = [rng.randrange(3, 96) for _ in range(26)]
    out = {}
    for kind in ("llama", "mistral"):
        hf = hf_model(checkpoints[kind])
        answer = hf_greedy(hf, base, MAX_NEW)[0]
        prompts = shared_prompts(base, answer, BLOCK)
        out[kind] = base, prompts, [hf_greedy(hf, p, MAX_NEW)[0] for p in prompts]
    return out


def run(checkpoints, kind, base, prompts, overrides, priority=None):
    llm = LLM(kind, checkpoint=str(checkpoints[kind]), overrides=overrides)
    llm.generate([base], GREEDY)  # computes and caches the base prompt (and its answer)
    outs = llm.generate(prompts, GREEDY, priority=priority)
    return llm, outs


SCHEDULES = {
    "splitfuse-7": ["+scheduler=splitfuse", "scheduler.token_budget=7"],
    "continuous": ["+scheduler=continuous"],
    "static-3": ["+scheduler=static", "scheduler.max_num_seqs=3"],
    "priority-7": ["+scheduler=splitfuse_priority", "scheduler.token_budget=7"],
    "spf-7": ["+scheduler=splitfuse_spf", "scheduler.token_budget=7", "scheduler.max_passes=2"],
}


@pytest.mark.parametrize("pressure", [False, True], ids=["ample-kv", "preempting"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_prefix_cache_outputs_match_transformers(checkpoints, cases, schedule, pressure):
    base, prompts, ref = cases["llama"]
    blocks = 16 if pressure else 256  # 64 slots: the longest request needs 52
    overrides = [*SCHEDULES[schedule], "kv_allocator=prefix", f"kv_allocator.block_size={BLOCK}",
                 f"kv_allocator.num_blocks={blocks}"]  # fmt: skip
    priority = [i % 3 for i in range(len(prompts))] if schedule.startswith("priority") else None
    llm, outs = run(checkpoints, "llama", base, prompts, overrides, priority)
    for i, (out, want) in enumerate(zip(outs, ref, strict=True)):
        assert out.token_ids == want, f"prompt {i} (len {len(prompts[i])}) diverged"
    assert llm.engine.kv.report()["prefix_cache_hits"] > 0
    if pressure and not schedule.startswith("static"):  # static reserves whole requests
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    if not pressure and schedule != "static-3":  # the cache held everything: exact hits
        cached = [o.metrics.num_cached_tokens for o in outs]
        assert cached == [0, 4, 4, 24, 4, 24, 32]
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("allocator", ["prefix", "blocked"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_prefix_and_blocked_agree_with_transformers(
    checkpoints, cases, kind, allocator, block_size
):
    """Other block sizes (every token a block; blocks longer than most shared prefixes), and the
    sliding-window model, whose window (8) is shorter than the cached prefixes."""
    base, prompts, ref = cases[kind]
    overrides = [
        "+scheduler=splitfuse", "scheduler.token_budget=9", f"kv_allocator={allocator}",
        f"kv_allocator.block_size={block_size}", "kv_allocator.num_blocks=999",
    ]  # fmt: skip
    llm, outs = run(checkpoints, kind, base, prompts, overrides)
    assert [o.token_ids for o in outs] == ref
    hits = llm.engine.kv.report().get("prefix_cache_hits", 0)
    assert (hits > 0) == (allocator == "prefix")
