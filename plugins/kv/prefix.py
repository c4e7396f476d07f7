"""``kv_allocator=prefix``: blocks shared through a hash-chained prefix cache, LRU eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modgen.engine.kv import KVAllocator, KVAllocatorConfig, OutOfBlocksError
from modgen.registry import register

BlockKey = tuple[int, tuple[int, ...]]
"""A full block's identity: the hash of the block before it (chained back to the allocator's
namespace) and its own tokens. Its hash is the next block's parent hash."""


@register("kv_allocator", "prefix")
class PrefixCachingAllocator(KVAllocator):
    """A KV allocator with automatic prefix caching (as vLLM's, or SGLang's radix cache by
    blocks).

    A full block whose KV is computed (``cache_blocks``) is entered in the cache under its key:
    its tokens and the hash of the previous block's key, chained back to ``namespace`` (the
    model). A sequence admitted with ``allocate_sequence`` takes a reference on the cached blocks
    of its longest cached prefix and computes only the rest, always at least its last token (so
    it gets logits; a prompt cached to its end recomputes its last block into a new one). A block
    is written only by the sequence it was handed to fresh, before it is cached, so shared blocks
    are read-only. When its last reference goes (finish, abort or preemption), a cached block
    stays cached and becomes evictable; it is evicted, least recently used first, only when a new
    block is needed and no uncached block is free. ``num_free_blocks`` counts both kinds.
    """

    @dataclass(kw_only=True)
    class Config(KVAllocatorConfig):
        """Prefix-caching allocator settings (capacity only)."""

    def __init__(self, config: KVAllocatorConfig, num_blocks: int) -> None:
        super().__init__(config, num_blocks)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # uncached, unreferenced
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._refs = [0] * num_blocks
        self._block_of: dict[BlockKey, int] = {}
        self._key_of: dict[int, BlockKey] = {}
        self._tables: dict[int, list[int]] = {}
        self._num_cached: dict[int, int] = {}  # seq_id -> leading blocks of its table in the cache
        self._keys: dict[int, list[BlockKey]] = {}  # seq_id -> keys of its full blocks (memo)
        self.num_queried_tokens = 0
        """Tokens looked up at admissions (prompt, or prompt and output after a preemption)."""
        self.num_hit_tokens = 0
        """Of those, tokens found in the cache (not computed: tokens saved)."""

    # state ----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Cached blocks no sequence holds (evictable, counted as free)."""
        return len(self._evictable)

    def ref_count(self, block: int) -> int:
        """Sequences holding ``block``."""
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        """Whether ``block`` is in the prefix cache (its KV is computed and may be shared)."""
        return block in self._key_of

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    # admission ------------------------------------------------------------------------------

    def num_cached_tokens(self, seq_id: int, token_ids: Sequence[int]) -> int:
        return len(self._hits(seq_id, token_ids)) * self.block_size

    def can_allocate_sequence(self, seq_id: int, token_ids: Sequence[int], num_tokens: int) -> bool:
        if self._tables.get(seq_id):
            return self.can_allocate(seq_id, num_tokens)
        hits = self._hits(seq_id, token_ids)
        return self._blocks_to_take(hits, num_tokens) <= self.num_free_blocks

    def allocate_sequence(self, seq_id: int, token_ids: Sequence[int], num_tokens: int) -> int:
        if self._tables.get(seq_id):
            raise ValueError(f"sequence {seq_id} already holds KV blocks")
        hits = self._hits(seq_id, token_ids)
        take = self._blocks_to_take(hits, num_tokens)
        if take > self.num_free_blocks:
            cached = len(hits) * self.block_size
            raise OutOfBlocksError(
                f"sequence {seq_id} needs {take} free blocks for {num_tokens} tokens "
                f"({cached} of its {len(token_ids)} tokens cached, "
                f"{-(-num_tokens // self.block_size) - len(hits)} new blocks); "
                f"{self.num_free_blocks} are free ({len(self._evictable)} of them cached)"
            )
        for block in hits:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        new = max(0, -(-num_tokens // self.block_size) - len(hits))
        self._tables[seq_id] = hits + [self._take() for _ in range(new)]
        self._num_cached[seq_id] = len(hits)
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += len(hits) * self.block_size
        return len(hits) * self.block_size

    def _blocks_to_take(self, hits: list[int], num_tokens: int) -> int:
        """Blocks out of the free pool: new ones, and hits no one holds (evictable)."""
        new = max(0, -(-num_tokens // self.block_size) - len(hits))
        return new + sum(1 for b in hits if self._refs[b] == 0)

    def _hits(self, seq_id: int, token_ids: Sequence[int]) -> list[int]:
        """The cached blocks of the longest cached prefix, leaving at least one token."""
        hits = []
        for i in range((len(token_ids) - 1) // self.block_size):
            block = self._block_of.get(self._key(seq_id, token_ids, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def _key(self, seq_id: int, token_ids: Sequence[int], i: int) -> BlockKey:
        """The key of block ``i`` of ``seq_id``, memoised until ``free(seq_id)``: a sequence's
        tokens only grow, so its full blocks' keys never change."""
        keys = self._keys.setdefault(seq_id, [])
        bs = self.block_size
        while len(keys) <= i:
            n = len(keys)
            parent = hash(keys[-1]) if keys else hash(("modgen-kv", self.namespace))
            keys.append((parent, tuple(token_ids[n * bs : (n + 1) * bs])))
        return keys[i]

    # growth, caching, release -----------------------------------------------------------------

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        need = self.blocks_needed(seq_id, num_tokens)
        if need == 0:
            return
        if need > self.num_free_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id} needs {need} blocks for {num_tokens} tokens; "
                f"{self.num_free_blocks} are free ({len(self._evictable)} of them cached)"
            )
        self._tables.setdefault(seq_id, []).extend(self._take() for _ in range(need))

    def _take(self) -> int:
        """A block for a new reference: an uncached free one, else the least recently used
        cached one, evicted."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def cache_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        table = self._tables.get(seq_id)
        if not table:
            return
        done = self._num_cached.get(seq_id, 0)
        full = min(num_computed // self.block_size, len(table))
        for i in range(done, full):
            key = self._key(seq_id, token_ids, i)
            if key not in self._block_of:  # else an equal block is cached already: keep that
                self._block_of[key] = table[i]
                self._key_of[table[i]] = key
        self._num_cached[seq_id] = max(done, full)

    def free(self, seq_id: int) -> None:
        self._keys.pop(seq_id, None)
        self._num_cached.pop(seq_id, None)
        table = self._tables.pop(seq_id, None)
        for block in reversed(table or []):  # a chain's tail is evicted before its head
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def report(self) -> dict[str, Any]:
        return {
            "prefix_cache_queries": self.num_queried_tokens,
            "prefix_cache_hits": self.num_hit_tokens,
        }
