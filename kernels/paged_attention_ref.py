"""Plain-torch reference for ``paged_attention``: one sequence at a time, obviously right, slow."""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    query_start: torch.Tensor,  # [B + 1]
    context_lens: torch.Tensor,  # [B], KV length including this step's tokens
    block_tables: torch.Tensor,  # [B, max_blocks]
    block_size: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal (optionally sliding-window) attention of each chunk's queries, which sit at the end
    of its sequence, to the sequence's K/V gathered slot by slot through its block table."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(len(context_lens)):
        start, end, ctx = int(query_start[b]), int(query_start[b + 1]), int(context_lens[b])
        kv_pos = torch.arange(ctx, device=q.device)
        slots = block_tables[b, kv_pos // block_size] * block_size + kv_pos % block_size
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        q_pos = ctx - (end - start) + torch.arange(end - start, device=q.device)  # [n]
        seen = kv_pos[None, :] <= q_pos[:, None]  # [n, ctx]
        if window is not None:
            seen &= kv_pos[None, :] > q_pos[:, None] - window
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
