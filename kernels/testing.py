"""Random inputs shared by the kernel tests and the GPU check: a ragged step over shuffled KV
blocks (as plain tensors, named as the engine's batch names them), its launch plan, and the
padded batch torch's scaled_dot_product_attention needs for the same step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PagedBatch:
    """One step's chunks over a paged KV cache. T = tokens, B = chunks."""

    query_start: torch.Tensor  # [B + 1] int64, offsets of each chunk's tokens
    query_lens: torch.Tensor  # [B] int64
    context_lens: torch.Tensor  # [B] int64, KV length once the step has run
    block_tables: torch.Tensor  # [B, max_blocks] int64
    slot_mapping: torch.Tensor  # [T] int64, KV slot of each new token
    positions: torch.Tensor  # [T] int64
    seq_index: torch.Tensor  # [T] int64, the chunk of each token
    block_size: int
    max_query_len: int
    max_context_len: int

    @property
    def num_tokens(self) -> int:
        """T."""
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        """B."""
        return self.query_lens.shape[0]


def random_batch(
    q_lens: list[int],
    ctx_lens: list[int],
    block_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    spare_blocks: int = 3,
) -> tuple[PagedBatch, int]:
    """A ragged step whose chunk b holds the last ``q_lens[b]`` of ``ctx_lens[b]`` positions,
    its blocks drawn at random from the cache (a few spare); and the number of cache slots."""
    gen = torch.Generator().manual_seed(seed)
    q_len, ctx = torch.tensor(q_lens), torch.tensor(ctx_lens)  # [B]
    n_blocks = (ctx + block_size - 1) // block_size
    num_blocks = int(n_blocks.sum()) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen)
    col = torch.arange(int(n_blocks.max()))
    used = col[None, :] < n_blocks[:, None]  # [B, max_blocks]
    tables = torch.zeros(used.shape, dtype=torch.int64)
    tables[used] = order[: int(n_blocks.sum())]
    query_start = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
    torch.cumsum(q_len, 0, out=query_start[1:])
    seq_index = torch.repeat_interleave(torch.arange(len(q_lens)), q_len)  # [T]
    positions = (ctx - q_len)[seq_index] + torch.arange(len(seq_index)) - query_start[seq_index]
    slots = tables[seq_index, positions // block_size] * block_size + positions % block_size
    batch = PagedBatch(
        query_start=query_start.to(device), query_lens=q_len.to(device),
        context_lens=ctx.to(device), block_tables=tables.to(device),
        slot_mapping=slots.to(device), positions=positions.to(device),
        seq_index=seq_index.to(device), block_size=block_size,
        max_query_len=int(q_len.max()), max_context_len=int(ctx.max()),
    )  # fmt: skip
    return batch, num_blocks * block_size


def plan_for(batch: PagedBatch, **knobs: Any) -> Any:
    """The Triton kernels' launch plan of ``batch`` (``knobs``: block_m, num_splits, ...)."""
    from .paged_attention import AttentionPlan

    return AttentionPlan(
        query_start=batch.query_start, context_lens=batch.context_lens,
        block_tables=batch.block_tables, block_size=batch.block_size,
        max_query_len=batch.max_query_len, max_context_len=batch.max_context_len, **knobs,
    )  # fmt: skip


def padded_batch(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,
    batch: PagedBatch,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same step as one padded batch: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (gathered from
    the cache) and a bool mask [B, 1, Lq, Lk] (causal, window, padding), for SDPA."""
    dev, bs = q.device, batch.block_size
    num_seqs, max_q = batch.num_seqs, batch.max_query_len
    max_kv = -(-batch.max_context_len // 16) * 16  # aligned for the fused SDPA kernels
    offset = torch.arange(batch.num_tokens, device=dev) - batch.query_start[batch.seq_index]
    qp = q.new_zeros(num_seqs, max_q, *q.shape[1:])
    qp[batch.seq_index, offset] = q
    kv_pos = torch.arange(max_kv, device=dev)
    kv_ok = kv_pos[None, :] < batch.context_lens[:, None]  # [B, Lk]
    block = batch.block_tables[:, (kv_pos // bs).clamp(max=batch.block_tables.shape[1] - 1)]
    slots = torch.where(kv_ok, block * bs + kv_pos % bs, 0)  # [B, Lk]
    q_pos = (batch.context_lens - batch.query_lens)[:, None] + torch.arange(max_q, device=dev)
    mask = kv_ok[:, None, :] & (kv_pos[None, None, :] <= q_pos[:, :, None])  # [B, Lq, Lk]
    if window is not None:
        mask &= kv_pos[None, None, :] > q_pos[:, :, None] - window
    mask[:, :, 0] |= ~mask.any(-1)  # padded query rows see one slot: no NaN
    k, v = (c[slots].transpose(1, 2) for c in (k_cache, v_cache))  # [B, Hkv, Lk, D]
    return qp.transpose(1, 2), k, v, mask[:, None]
