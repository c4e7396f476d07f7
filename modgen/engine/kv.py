"""KV allocator interface: fixed-size blocks of KV slots handed to sequences."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class OutOfBlocksError(RuntimeError):
    """An allocation was asked for more blocks than are free (ask ``can_allocate`` first)."""


@dataclass(kw_only=True)
class KVAllocatorConfig:
    """Capacity settings shared by KV allocators."""

    block_size: int = 16
    """KV slots (tokens) per block."""
    num_blocks: int | None = None
    """Blocks in the cache; when None, derived from memory_gb."""
    memory_gb: float = 1.0
    """KV-cache memory budget in GiB, used when num_blocks is None."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"kv_allocator.block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"kv_allocator.num_blocks must be >= 1, got {self.num_blocks}")
        if self.memory_gb <= 0:
            raise ValueError(f"kv_allocator.memory_gb must be > 0, got {self.memory_gb}")

    def resolve_num_blocks(self, bytes_per_token: int) -> int:
        """Blocks that fit the budget, given the KV bytes one token takes over all layers."""
        if self.num_blocks is not None:
            return self.num_blocks
        n = int(self.memory_gb * 2**30) // (bytes_per_token * self.block_size)
        if n < 1:
            raise ValueError(
                f"kv_allocator.memory_gb={self.memory_gb} holds no block of {self.block_size} "
                f"tokens at {bytes_per_token} bytes per token"
            )
        return n


class KVAllocator(ABC):
    """Hands out KV blocks to sequences and takes them back.

    A sequence holds a list of blocks (its block table); ``allocate(seq_id, n)`` grows it to hold
    at least ``n`` token slots. Implementations never leak a block, and never give a block to two
    sequences unless it is a cached block whose KV both share (a prefix cache).

    A sequence that holds no blocks is admitted with ``allocate_sequence``, given its token ids:
    an allocator with a prefix cache hands it the cached blocks of its leading tokens and says how
    many tokens they hold, and after each step ``cache_blocks`` tells it which tokens' KV is now
    computed. The defaults of those methods make an allocator without a cache (one written
    against ``allocate`` alone keeps working).
    """

    Config = KVAllocatorConfig
    namespace: str = ""
    """What, besides the token ids, determines a block's KV (the model; the engine sets it): a
    prefix cache mixes it into every block's hash."""

    def __init__(self, config: KVAllocatorConfig, num_blocks: int) -> None:
        self.config = config
        self.block_size = config.block_size
        self.num_blocks = num_blocks

    @property
    @abstractmethod
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""

    @abstractmethod
    def block_table(self, seq_id: int) -> list[int]:
        """The blocks ``seq_id`` holds, in token order (empty if none)."""

    @abstractmethod
    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Grow ``seq_id``'s blocks to hold ``num_tokens`` slots.

        Raises OutOfBlocksError when too few blocks are free."""

    @abstractmethod
    def free(self, seq_id: int) -> None:
        """Return all of ``seq_id``'s blocks (a no-op for a sequence that holds none)."""

    # admission given token ids (a prefix cache overrides these) ------------------------------

    def num_cached_tokens(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Leading tokens of ``token_ids`` whose KV is cached (a look-up that changes nothing).

        A multiple of the block size, and always less than ``len(token_ids)``: at least the last
        token is computed, for its logits. 0 without a cache."""
        return 0

    def can_allocate_sequence(self, seq_id: int, token_ids: Sequence[int], num_tokens: int) -> bool:
        """Whether ``allocate_sequence`` would succeed now."""
        return self.can_allocate(seq_id, num_tokens)

    def allocate_sequence(self, seq_id: int, token_ids: Sequence[int], num_tokens: int) -> int:
        """Give ``seq_id`` (which holds no blocks) ``num_tokens`` slots for ``token_ids`` and what
        follows; returns how many leading tokens are cached (their KV need not be computed, see
        ``num_cached_tokens``). Raises OutOfBlocksError when too few blocks are free."""
        self.allocate(seq_id, num_tokens)
        return 0

    def cache_blocks(  # noqa: B027 (optional hook)
        self, seq_id: int, token_ids: Sequence[int], num_computed: int
    ) -> None:
        """The KV of ``seq_id``'s first ``num_computed`` tokens (of ``token_ids``) is now in its
        blocks: a prefix cache makes the full ones shareable. Nothing to do without a cache."""

    def report(self) -> dict[str, Any]:
        """Figures for the run's results (a prefix cache's hits); empty by default."""
        return {}

    # capacity --------------------------------------------------------------------------------

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """New blocks ``seq_id`` needs to hold ``num_tokens`` slots."""
        have = len(self.block_table(seq_id))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Whether ``allocate(seq_id, num_tokens)`` would succeed now."""
        return self.blocks_needed(seq_id, num_tokens) <= self.num_free_blocks

    def max_tokens(self, seq_id: int) -> int:
        """The most tokens ``seq_id`` could hold if it took every free block."""
        return (len(self.block_table(seq_id)) + self.num_free_blocks) * self.block_size

    @property
    def capacity_tokens(self) -> int:
        """Token slots in the whole cache."""
        return self.num_blocks * self.block_size

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by sequences."""
        return self.num_blocks - self.num_free_blocks
