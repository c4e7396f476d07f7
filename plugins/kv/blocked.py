"""``kv_allocator=blocked``: a free list of fixed-size blocks."""

from __future__ import annotations

from dataclasses import dataclass

from modgen.engine.kv import KVAllocator, KVAllocatorConfig, OutOfBlocksError
from modgen.registry import register


@register("kv_allocator", "blocked")
class BlockedAllocator(KVAllocator):
    """Blocks come from a LIFO free list (recently freed blocks are reused first)."""

    @dataclass(kw_only=True)
    class Config(KVAllocatorConfig):
        """Blocked allocator settings (capacity only)."""

    def __init__(self, config: KVAllocatorConfig, num_blocks: int) -> None:
        super().__init__(config, num_blocks)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        need = self.blocks_needed(seq_id, num_tokens)
        if need == 0:
            return
        if need > len(self._free):
            raise OutOfBlocksError(
                f"sequence {seq_id} needs {need} blocks for {num_tokens} tokens; "
                f"{len(self._free)} are free"
            )
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free[-need:][::-1])
        del self._free[-need:]

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))
