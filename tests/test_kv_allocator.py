"""The blocked allocator never leaks a block nor hands one to two sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modgen import registry
from modgen.engine.kv import OutOfBlocksError


def make(num_blocks: int, block_size: int):
    cfg = registry.to_config("kv_allocator", {"name": "blocked", "block_size": block_size})
    return registry.build("kv_allocator", cfg, num_blocks)


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 5), st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 12), block_size=st.integers(1, 8))
def test_random_operations_keep_blocks_disjoint_and_counted(ops, num_blocks, block_size):
    kv = make(num_blocks, block_size)
    slots: dict[int, int] = {}  # seq -> slots it asked for
    for op, seq, n in ops:
        if op == "free":
            kv.free(seq)
            slots.pop(seq, None)
            continue
        need = kv.blocks_needed(seq, n)
        assert kv.can_allocate(seq, n) == (need <= kv.num_free_blocks)
        if kv.can_allocate(seq, n):
            kv.allocate(seq, n)
            slots[seq] = max(slots.get(seq, 0), n)
        else:
            free_before = kv.num_free_blocks
            with pytest.raises(OutOfBlocksError):
                kv.allocate(seq, n)
            assert kv.num_free_blocks == free_before
        held = [b for s in range(6) for b in kv.block_table(s)]
        assert len(held) == len(set(held))
        assert len(held) + kv.num_free_blocks == num_blocks
        assert all(0 <= b < num_blocks for b in held)
        for s, n_slots in slots.items():
            assert len(kv.block_table(s)) * block_size >= n_slots
    for s in range(6):
        kv.free(s)
    assert kv.num_free_blocks == num_blocks


def test_allocation_grows_by_whole_blocks_and_reports_capacity():
    kv = make(4, 5)
    assert kv.capacity_tokens == 20
    kv.allocate(7, 6)
    assert len(kv.block_table(7)) == 2
    assert kv.max_tokens(7) == 20
    kv.allocate(7, 10)  # still fits in two blocks
    assert len(kv.block_table(7)) == 2
    assert kv.blocks_needed(7, 11) == 1
    kv.free(7)
    kv.free(7)  # freeing twice is harmless and frees nothing twice
    assert kv.num_free_blocks == 4


def test_capacity_from_memory_budget():
    cfg = registry.to_config(
        "kv_allocator", {"name": "blocked", "block_size": 16, "memory_gb": 1.0}
    )
    assert cfg.resolve_num_blocks(bytes_per_token=8192) == 2**30 // (8192 * 16)
    with pytest.raises(ValueError, match="memory_gb"):
        registry.to_config("kv_allocator", {"name": "blocked", "memory_gb": -1})
