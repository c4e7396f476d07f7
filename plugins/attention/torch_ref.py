"""``attention=torch``: the reference backend, plain torch, runs anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modgen.attention import AttentionBackend, AttentionConfig
from modgen.engine.batch import RaggedBatch
from modgen.registry import register


@dataclass
class _Group:
    """Chunks attended together, padded to one query length and a whole number of KV blocks."""

    q_index: torch.Tensor  # [b, max_q] flat token row of each query (0 where padded)
    q_valid: torch.Tensor  # [b, max_q] bool
    blocks: torch.Tensor  # [b * n_blocks] cache blocks holding each sequence's context, in order
    q_pos: torch.Tensor  # [b, max_q] position of each query
    causal: torch.Tensor  # [b, max_q, n_blocks * block_size] bool: valid and causal
    out_rows: torch.Tensor  # [n_valid] flat rows of the valid queries
    masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None, group: int) -> torch.Tensor:
        """[b, 1, max_q * group, kv]: each query row repeated for the ``group`` query heads that
        share a KV head."""
        key = (window, group)
        if key not in self.masks:
            m = self.causal
            if window is not None:
                kv_pos = torch.arange(m.shape[-1], device=m.device)
                m = m & (kv_pos[None, None, :] > self.q_pos[:, :, None] - window)
            m = m.clone()
            m[:, :, 0] |= ~self.q_valid  # padded queries see one slot: no NaN rows
            self.masks[key] = m.repeat_interleave(group, dim=1)[:, None]
        return self.masks[key]


def _group(batch: RaggedBatch, chunks: torch.Tensor) -> _Group:
    q_lens = batch.query_lens[chunks]
    ctx = batch.context_lens[chunks]
    max_q, bs = int(q_lens.max()), batch.block_size
    n_blocks = -(-int(ctx.max()) // bs)
    dev = q_lens.device
    ar_q = torch.arange(max_q, device=dev)
    q_valid = ar_q[None, :] < q_lens[:, None]
    q_index = torch.where(q_valid, batch.query_start[chunks][:, None] + ar_q, 0)
    q_pos = (ctx - q_lens)[:, None] + ar_q  # [b, max_q]
    kv_pos = torch.arange(n_blocks * bs, device=dev)
    kv_valid = kv_pos[None, :] < ctx[:, None]
    causal = kv_valid[:, None, :] & (kv_pos[None, None, :] <= q_pos[:, :, None])
    blocks = batch.block_tables[chunks][:, :n_blocks].reshape(-1)
    return _Group(q_index, q_valid, blocks, q_pos, causal, q_index[q_valid])


def _buckets(batch: RaggedBatch, chunks: torch.Tensor, slack: float = 1.5) -> list[torch.Tensor]:
    """Split ``chunks`` into groups whose padded attention work (chunks x longest query x longest
    context) stays within ``slack`` times their real work, longest contexts first; a short
    prompt tail then no longer pads to a long neighbour's shape."""
    if chunks.numel() == 0:
        return []
    ctx, order = batch.context_lens[chunks].sort(descending=True)
    q_lens = batch.query_lens[chunks][order].tolist()
    ctx_list = ctx.tolist()
    groups, start, real, max_q = [], 0, 0, 0
    for i, (q, c) in enumerate(zip(q_lens, ctx_list, strict=True)):
        new_max_q, new_real = max(max_q, q), real + q * c
        if i > start and (i - start + 1) * new_max_q * ctx_list[start] > slack * new_real:
            groups.append(chunks[order[start:i]])
            start, new_max_q, new_real = i, q, q * c
        max_q, real = new_max_q, new_real
    groups.append(chunks[order[start:]])
    return groups


@register("attention", "torch")
class TorchAttention(AttentionBackend):
    """Writes new K/V by slot, gathers each sequence's context block by block through its block
    table, and runs scaled-dot-product attention with a causal (and sliding-window) mask. The
    query heads sharing a KV head are folded into the query rows, so K/V are never repeated.
    Decodes and prompt chunks are padded in separate groups, bucketed by size so padding stays
    small."""

    @dataclass(kw_only=True)
    class Config(AttentionConfig):
        """The torch reference backend has no settings."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        # gather buffers kept across layers and steps: a fresh multi-MB tensor per call costs
        # more in page faults than the copy itself
        self._scratch: dict[str, torch.Tensor] = {}

    def _gather(self, blocks: torch.Tensor, index: torch.Tensor, key: str) -> torch.Tensor:
        """``blocks[index]`` into a reused buffer."""
        numel = index.numel() * blocks[0].numel()
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != blocks.dtype:
            buf = self._scratch[key] = torch.empty(numel, dtype=blocks.dtype, device=blocks.device)
        out = buf[:numel].view(index.numel(), *blocks.shape[1:])
        return torch.index_select(blocks, 0, index, out=out)

    def prepare(self, batch: RaggedBatch) -> list[_Group]:
        is_decode = batch.query_lens == 1
        groups = []
        for sel in (is_decode, ~is_decode):
            for chunks in _buckets(batch, sel.nonzero().flatten()):
                groups.append(_group(batch, chunks))
        return groups

    def forward(self, q, k, v, kv_cache, batch, meta, scale, sliding_window, rope=None):
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, batch.slot_mapping, k)
        v_cache.index_copy_(0, batch.slot_mapping, v)
        _, hq, d = q.shape
        hkv = k.shape[1]
        g_size = hq // hkv
        bs = batch.block_size
        k_blocks = k_cache.view(-1, bs, hkv, d)
        v_blocks = v_cache.view(-1, bs, hkv, d)
        out = torch.empty_like(q)
        for g in meta:  # one group's K/V buffers are used up before the next group's gather
            b, max_q = g.q_index.shape
            # [b, max_q, Hq, D] -> [b, Hkv, max_q * G, D]: rows are (query, head in group)
            qg = q[g.q_index].view(b, max_q, hkv, g_size, d).transpose(1, 2)
            qg = qg.reshape(b, hkv, max_q * g_size, d)
            kg = self._gather(k_blocks, g.blocks, "k").view(b, -1, hkv, d).transpose(1, 2)
            vg = self._gather(v_blocks, g.blocks, "v").view(b, -1, hkv, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask(sliding_window, g_size), scale=scale
            )  # [b, Hkv, max_q * G, D]
            o = o.view(b, hkv, max_q, g_size, d).transpose(1, 2).reshape(b, max_q, hq, d)
            out[g.out_rows] = o[g.q_valid]
        return out
