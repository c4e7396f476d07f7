"""The prefix-caching allocator, as a hypothesis state machine against a model of the KV it
holds: every slot's content is the token written there, so a cache hit that hands out the wrong
block, or a write into a block someone else reads, shows up as a sequence whose computed tokens
no longer read back. Reference counts never go negative, every block is free, cached or held,
eviction happens under pressure, and nothing leaks after any mix of finish, abort and
preemption."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from modgen import registry
from modgen.engine.kv import OutOfBlocksError


def make(num_blocks: int, block_size: int):
    cfg = registry.to_config("kv_allocator", {"name": "prefix", "block_size": block_size})
    return registry.build("kv_allocator", cfg, num_blocks)


# a few shared prompt prefixes over a tiny vocabulary, so that blocks repeat across sequences
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 9, 9], [4, 4, 4, 4, 4, 4, 4, 4], []]


def _event(what: str) -> None:
    if currently_in_test_context():
        event(what)


class PrefixAllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv = None

    @initialize(num_blocks=st.integers(2, 12), block_size=st.integers(1, 4))
    def setup(self, num_blocks, block_size):
        self.kv = make(num_blocks, block_size)
        self.bs = block_size
        self.tokens: dict[int, list[int]] = {}  # live sequences (holding blocks or not)
        self.computed: dict[int, int] = {}  # tokens whose KV each holder has written or shared
        self.content: dict[int, int] = {}  # slot -> token written there
        self.next_id = 0
        self.evicted_under_pressure = False

    def _slot(self, seq_id: int, pos: int) -> int:
        return self.kv.block_table(seq_id)[pos // self.bs] * self.bs + pos % self.bs

    def _pick(self, i: int, holding: bool | None = None) -> int | None:
        """The i-th live sequence (negative: from the newest), of those that hold KV or not."""
        ids = [s for s in self.tokens if holding is None or (s in self.computed) == holding]
        return ids[i % len(ids)] if ids else None

    @precondition(lambda self: self.kv is not None)
    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 3), max_size=4),
        run=st.booleans(),
    )
    def arrive(self, prefix, suffix, run=False):
        """A new sequence; with ``run``, admitted and computed to its end at once."""
        tokens = prefix + suffix or [0]
        self.tokens[self.next_id] = tokens
        self.next_id += 1
        if run:
            self.admit(-1, 0)  # the newest waiting sequence
            if self.next_id - 1 in self.computed:
                self.compute(-1, 99)

    @precondition(lambda self: self.kv is not None)
    @rule(i=st.integers(0, 99), extra=st.integers(0, 3))
    def admit(self, i, extra):
        seq = self._pick(i, holding=False)
        if seq is None:
            return
        tokens, kv = self.tokens[seq], self.kv
        looked_up = kv.num_cached_tokens(seq, tokens)
        if not kv.can_allocate_sequence(seq, tokens, len(tokens) + extra):
            with pytest.raises(OutOfBlocksError, match="needs"):
                kv.allocate_sequence(seq, tokens, len(tokens) + extra)
            return
        free_uncached = kv.num_free_blocks - kv.num_cached_blocks
        cached = kv.allocate_sequence(seq, tokens, len(tokens) + extra)
        assert cached == looked_up
        assert cached % self.bs == 0 and 0 <= cached < len(tokens)
        if len(kv.block_table(seq)) - cached // self.bs > free_uncached:
            self.evicted_under_pressure = True
            _event("cached blocks evicted")
        if cached:
            _event("prefix hit")
        self.computed[seq] = cached  # the hit blocks must read back as this sequence's tokens

    @precondition(lambda self: self.kv is not None)
    @rule(i=st.integers(0, 99), n=st.integers(1, 12))
    def compute(self, i, n):
        """A step writes the KV of ``n`` more of a sequence's tokens into its own blocks."""
        seq = self._pick(i, holding=True)
        if seq is None:
            return
        tokens, done = self.tokens[seq], self.computed[seq]
        if done == len(tokens):
            return
        end = min(len(tokens), done + n)
        if not self.kv.can_allocate(seq, end):
            return
        self.kv.allocate(seq, end)
        holders = [s for s in self.computed if s != seq]
        for pos in range(done, end):
            block = self.kv.block_table(seq)[pos // self.bs]
            assert not self.kv.is_cached(block), "a cached block is written"
            assert all(block not in self.kv.block_table(s) for s in holders), "a shared write"
            self.content[self._slot(seq, pos)] = tokens[pos]
        self.computed[seq] = end
        self.kv.cache_blocks(seq, tokens, end)

    @precondition(lambda self: self.kv is not None)
    @rule(i=st.integers(0, 99), token=st.integers(0, 3))
    def decode(self, i, token):
        """Sampling appends a token once every token is computed."""
        seq = self._pick(i, holding=True)
        if seq is not None and self.computed[seq] == len(self.tokens[seq]):
            self.tokens[seq].append(token)

    @precondition(lambda self: self.kv is not None)
    @rule(i=st.integers(0, 99))
    def finish_or_abort(self, i):
        seq = self._pick(i)
        if seq is not None:
            self.kv.free(seq)
            del self.tokens[seq]
            self.computed.pop(seq, None)

    @precondition(lambda self: self.kv is not None)
    @rule(i=st.integers(0, 99))
    def preempt(self, i):
        """Free the KV; the sequence stays, to be admitted again with prompt and output."""
        seq = self._pick(i, holding=True)
        if seq is not None:
            self.kv.free(seq)
            del self.computed[seq]

    @invariant()
    def computed_tokens_read_back(self):
        for seq, done in self.computed.items() if self.kv else ():
            for pos in range(done):
                assert self.content.get(self._slot(seq, pos)) == self.tokens[seq][pos]

    @invariant()
    def every_block_is_free_cached_or_held(self):
        kv = self.kv
        if kv is None:
            return
        held: dict[int, int] = {}
        for seq in self.tokens:
            for block in kv.block_table(seq):
                held[block] = held.get(block, 0) + 1
        for block in range(kv.num_blocks):
            assert kv.ref_count(block) >= 0
            assert kv.ref_count(block) == held.get(block, 0)
        assert len(held) + kv.num_free_blocks == kv.num_blocks
        cached_free = [b for b in range(kv.num_blocks) if kv.is_cached(b) and b not in held]
        assert len(cached_free) == kv.num_cached_blocks
        if not self.tokens:
            assert kv.num_free_blocks == kv.num_blocks

    def teardown(self):
        if self.kv is None:
            return
        for seq in list(self.tokens):
            self.kv.free(seq)
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert all(self.kv.ref_count(b) == 0 for b in range(self.kv.num_blocks))


PrefixAllocatorMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_prefix_allocator_state_machine = PrefixAllocatorMachine.TestCase


def test_the_machine_evicts_under_pressure():
    """The model-checked path through eviction, taken for sure: three blocks, one sequence at
    a time, each finishing with its full blocks cached."""
    m = PrefixAllocatorMachine()
    m.setup(num_blocks=3, block_size=4)
    for prefix in PREFIXES[:3] * 2:
        m.arrive(prefix, [0])
        m.admit(0, 0)  # the only sequence
        m.compute(0, 20)
        m.computed_tokens_read_back()
        m.every_block_is_free_cached_or_held()
        m.finish_or_abort(0)
    assert m.evicted_under_pressure
    m.teardown()


def test_shared_prefix_is_found_and_counted():
    kv = make(10, 4)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # two full blocks and one token
    assert kv.allocate_sequence(0, a, len(a)) == 0
    kv.cache_blocks(0, a, 6)  # only the first block is computed and full yet
    assert kv.num_cached_tokens(1, a) == 4
    kv.cache_blocks(0, a, 9)
    assert kv.num_cached_tokens(1, a) == 8
    assert kv.num_cached_tokens(2, a[:8]) == 4  # at least the last token is computed
    assert kv.num_cached_tokens(3, [1, 2, 3, 4, 5, 6, 7, 0, 9]) == 4  # the chain breaks
    assert kv.num_cached_tokens(4, [9, 2, 3, 4, 5, 6, 7, 8, 9]) == 0  # block 0 differs
    free = kv.num_free_blocks
    assert kv.allocate_sequence(1, [*a, 3], 12) == 8
    assert kv.block_table(1)[:2] == kv.block_table(0)[:2]
    assert kv.num_free_blocks == free - 1  # one new block: the shared ones are not taken again
    kv.free(0)  # the shared blocks stay held by sequence 1
    assert [kv.ref_count(b) for b in kv.block_table(1)] == [1, 1, 1]
    kv.free(1)
    assert kv.num_free_blocks == 10 and kv.num_cached_blocks == 2
    assert kv.report() == {"prefix_cache_queries": 19, "prefix_cache_hits": 8}


def test_least_recently_used_cached_block_is_evicted_first():
    kv = make(4, 2)
    for seq, tokens in enumerate([[1, 1, 0], [2, 2, 0], [3, 3, 0]]):
        kv.allocate_sequence(seq, tokens, 3)
        kv.cache_blocks(seq, tokens, 3)
        kv.free(seq)  # cached: [1,1] then [2,2] then [3,3] (the partial blocks go free)
    assert kv.num_cached_blocks == 3
    assert kv.allocate_sequence(3, [1, 1, 5], 3) == 2  # [1,1] used again: now the most recent
    kv.free(3)
    kv.allocate(4, 6)  # three blocks: the one uncached free block, then [2,2] and [3,3] go
    assert kv.num_cached_tokens(5, [1, 1, 0]) == 2
    assert kv.num_cached_tokens(6, [2, 2, 0]) == 0
    assert kv.num_cached_tokens(7, [3, 3, 0]) == 0


def test_namespace_separates_models():
    kv = make(8, 2)
    tokens = [1, 2, 3]
    kv.allocate_sequence(0, tokens, 3)
    kv.cache_blocks(0, tokens, 3)
    assert kv.num_cached_tokens(1, tokens) == 2
    kv.namespace = "another model"  # the same tokens' KV under another model is another KV
    assert kv.num_cached_tokens(2, tokens) == 0
