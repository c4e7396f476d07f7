"""Random inputs shared by the interpreter tests and the GPU check: a ragged step over shuffled
KV blocks, and the padded batch torch's scaled_dot_product_attention needs for the same step."""

from __future__ import annotations

import torch

from modgen.engine.batch import RaggedBatch, ragged_batch


def random_batch(
    q_lens: list[int],
    ctx_lens: list[int],
    block_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    spare_blocks: int = 3,
) -> tuple[RaggedBatch, int]:
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
    batch = ragged_batch(
        input_ids=torch.zeros(int(q_len.sum()), dtype=torch.int64),
        starts=ctx - q_len,
        lens=q_len,
        block_tables=tables,
        completes=torch.ones(len(q_lens), dtype=torch.bool),
        block_size=block_size,
    )
    fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()}
    return RaggedBatch(**fields), num_blocks * block_size


def padded_batch(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,
    batch: RaggedBatch,
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
