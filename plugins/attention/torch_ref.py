"""``attention=torch``: the reference backend, plain torch, runs anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modgen.attention import AttentionBackend, AttentionConfig
from modgen.batch import RaggedBatch
from modgen.registry import register


@dataclass
class _Group:
    """Chunks attended together, padded to one query and one context length."""

    q_index: torch.Tensor  # [b, max_q] flat token row of each query (0 where padded)
    q_valid: torch.Tensor  # [b, max_q] bool
    kv_slots: torch.Tensor  # [b, max_kv] cache slot of each context position (0 where padded)
    q_pos: torch.Tensor  # [b, max_q] position of each query
    causal: torch.Tensor  # [b, max_q, max_kv] bool: valid and causal
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # window -> [b,1,q,kv]
    out_rows: torch.Tensor | None = None  # [n_valid] flat rows of the valid queries

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self.masks:
            m = self.causal
            if window is not None:
                kv_pos = torch.arange(m.shape[-1], device=m.device)
                m = m & (kv_pos[None, None, :] > self.q_pos[:, :, None] - window)
            m = m.clone()
            m[:, :, 0] |= ~self.q_valid  # padded queries see one slot: no NaN rows
            self.masks[window] = m[:, None]
        return self.masks[window]


def _group(batch: RaggedBatch, chunks: torch.Tensor) -> _Group:
    q_lens = batch.query_lens[chunks]
    ctx = batch.context_lens[chunks]
    max_q, max_kv = int(q_lens.max()), int(ctx.max())
    dev = q_lens.device
    ar_q = torch.arange(max_q, device=dev)
    q_valid = ar_q[None, :] < q_lens[:, None]
    q_index = torch.where(q_valid, batch.query_start[chunks][:, None] + ar_q, 0)
    q_pos = (ctx - q_lens)[:, None] + ar_q  # [b, max_q]
    kv_pos = torch.arange(max_kv, device=dev)
    bs = batch.block_size
    tables = batch.block_tables[chunks]
    kv_slots = tables[:, kv_pos // bs] * bs + kv_pos % bs  # [b, max_kv]
    kv_valid = kv_pos[None, :] < ctx[:, None]
    kv_slots = torch.where(kv_valid, kv_slots, 0)
    causal = kv_valid[:, None, :] & (kv_pos[None, None, :] <= q_pos[:, :, None])
    return _Group(q_index, q_valid, kv_slots, q_pos, causal, out_rows=q_index[q_valid])


@register("attention", "torch")
class TorchAttention(AttentionBackend):
    """Writes new K/V by slot, gathers each sequence's context through its block table, and runs
    scaled-dot-product attention with a causal (and sliding-window) mask. Decodes and prompt
    chunks form two padded groups, so padding stays small when both are in one step."""

    @dataclass(kw_only=True)
    class Config(AttentionConfig):
        """The torch reference backend has no settings."""

    def prepare(self, batch: RaggedBatch) -> list[_Group]:
        is_decode = batch.query_lens == 1
        groups = []
        for sel in (is_decode, ~is_decode):
            chunks = sel.nonzero().flatten()
            if chunks.numel():
                groups.append(_group(batch, chunks))
        return groups

    def forward(self, q, k, v, kv_cache, batch, meta, scale, sliding_window):
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, batch.slot_mapping, k)
        v_cache.index_copy_(0, batch.slot_mapping, v)
        out = torch.empty_like(q)
        for g in meta:
            qg = q[g.q_index].transpose(1, 2)  # [b, Hq, max_q, D]
            kg = k_cache[g.kv_slots].transpose(1, 2)  # [b, Hkv, max_kv, D]
            vg = v_cache[g.kv_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.mask(sliding_window), scale=scale, enable_gqa=True
            )
            out[g.out_rows] = o.transpose(1, 2)[g.q_valid]
        return out
