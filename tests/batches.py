"""Random ragged steps for the attention tests, as the engine's RaggedBatch."""

from __future__ import annotations

import torch

from modgen.engine.batch import RaggedBatch
from modgen.kernels.testing import PagedBatch, random_batch


def as_ragged(batch: PagedBatch) -> RaggedBatch:
    """The engine's batch of the same step (token ids zero; every chunk's last row sampled)."""
    return RaggedBatch(
        input_ids=torch.zeros_like(batch.positions),
        logits_indices=batch.query_start[1:] - 1,
        **vars(batch),
    )


def random_step(q_lens, ctx_lens, block_size, seed=0, device="cpu") -> tuple[RaggedBatch, int]:
    """``kernels.testing.random_batch`` as a RaggedBatch, and the number of cache slots."""
    batch, num_slots = random_batch(q_lens, ctx_lens, block_size, seed, device)
    return as_ragged(batch), num_slots
