"""Ragged paged attention in one launch: prompt chunks at any offset and single-token decodes,
K/V read through the block table, grouped-query heads, causal, optional sliding window, and a
split-KV (flash-decoding) path for long contexts with few sequences.

Reference: ``paged_attention_ref`` in ``paged_attention_ref.py``.

A program takes a tile of one sequence's query tokens times the ``GROUP`` query heads that share
one KV head (rows token-major, head-minor, so decodes of a GQA model still fill the tile), and
one split of the KV positions that tile can see. A head dim that is not a power of two is
padded to one (HEAD_PAD lanes, those past HEAD_DIM masked: loaded as zeros, never stored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .launch import Tunable, check_runnable, config, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _attend(
    q, pos, kv_lo, kv_hi, seq, kv_head, k_cache_ptr, v_cache_ptr, block_tables_ptr,
    stride_ct, stride_ch, stride_bt, block_size, window, scale_log2,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of queries ``q`` [M, DP] at positions ``pos`` [M] over KV positions
    [kv_lo, kv_hi) of ``seq``, read through its block table: (acc [M, DP], max, sum) in log2."""
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)  # [N]
        kv_ok = kpos < kv_hi
        blk = tl.load(block_tables_ptr + seq * stride_bt + kpos // block_size, mask=kv_ok, other=0)
        slot = blk.to(tl.int64) * block_size + kpos % block_size
        kv_off = slot[:, None] * stride_ct + kv_head * stride_ch + d[None, :]
        kv_mask = kv_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [N, DP]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [M, N]
        seen = kv_ok[None, :] & (kpos[None, :] <= pos[:, None])
        if HAS_WINDOW:
            seen = seen & (kpos[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    tile_seq_ptr, tile_start_ptr, query_start_ptr, context_lens_ptr, block_tables_ptr,
    stride_qt, stride_qh, stride_ct, stride_ch, stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt, stride_bt,
    num_splits, block_size, window, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (query tile, KV head, split): the tile's rows are its tokens x the GROUP query
    heads of the KV head. Writes normalized outputs (and, when SPLIT, each row's log2-sum-exp
    into ``lse`` and the output into split slice ``split`` of ``out``)."""
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = tl.load(tile_seq_ptr + tile)
    t0 = tl.load(tile_start_ptr + tile).to(tl.int32)
    q_begin = tl.load(query_start_ptr + seq).to(tl.int32)
    q_end = tl.load(query_start_ptr + seq + 1).to(tl.int32)
    first_pos = tl.load(context_lens_ptr + seq).to(tl.int32) - (q_end - q_begin)
    TILE_Q: tl.constexpr = BLOCK_M // GROUP
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // GROUP  # [M] flat token row
    head = kv_head * GROUP + rows % GROUP  # [M] query head
    row_ok = (rows < TILE_Q * GROUP) & (tok < q_end)
    d = tl.arange(0, HEAD_PAD)
    lane_ok = row_ok[:, None] & (d < HEAD_DIM)[None, :]  # [M, DP]
    q_off = tok.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=lane_ok, other=0.0)  # [M, DP]

    # KV positions the tile sees: causal end, window start, then this split's share
    kv_hi = first_pos + tl.minimum(t0 + TILE_Q, q_end) - q_begin
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(first_pos + t0 - q_begin - window + 1, 0)
    if SPLIT:
        per = tl.cdiv(tl.cdiv(kv_hi - kv_lo, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = kv_lo + split * per
        kv_hi = tl.minimum(kv_hi, kv_lo + per)
    acc, m_i, l_i = _attend(
        q, first_pos + tok - q_begin, kv_lo, kv_hi, seq, kv_head, k_cache_ptr, v_cache_ptr,
        block_tables_ptr, stride_ct, stride_ch, stride_bt, block_size, window, scale_log2,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, HAS_WINDOW, PRECISION,
    )  # fmt: skip

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_off = split * stride_os + tok.to(tl.int64) * stride_ot + head * stride_oh
    o = acc / l_safe[:, None]
    tl.store(out_ptr + o_off[:, None] + d[None, :], o.to(out_ptr.dtype.element_ty), lane_ok)
    if SPLIT:  # log2-sum-exp of the scores this split saw; -inf if none
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + split * stride_ls + tok * stride_lt + head, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits, num_heads, stride_ps, stride_ls,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS: tl.constexpr, HEADS: tl.constexpr,
):  # fmt: skip
    """Program (token, head tile): weight each split's normalized output by its share of the
    softmax mass."""
    tok = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SPLITS)  # [S]
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # [H]
    d = tl.arange(0, HEAD_PAD)  # [DP]
    d_ok = d < HEAD_DIM
    row = tok * num_heads + h  # [H] flat (token, head) row
    ok = (s[:, None] < num_splits) & (h[None, :] < num_heads)  # [S, H]
    lse = tl.load(lse_ptr + s[:, None] * stride_ls + row[None, :], mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)  # [H]
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top)[None, :])  # [S, H]
    p_off = s[:, None, None] * stride_ps + row[None, :, None] * HEAD_DIM + d[None, None, :]
    part = tl.load(part_ptr + p_off, mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)
    mass = tl.where(h < num_heads, tl.sum(w, 0), 1.0)  # [H]
    o = tl.sum(part * w[:, :, None], 0) / mass[:, None]  # [H, D]
    o_off = row[:, None] * HEAD_DIM + d[None, :]
    o_ok = (h < num_heads)[:, None] & d_ok[None, :]
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=o_ok)


def hopper_configs() -> list:
    """Autotune space (KV tile, warps, stages) for Hopper-class GPUs; the first is the default."""
    return [
        config(BLOCK_N=32, num_warps=4, num_stages=2),
        config(BLOCK_N=64, num_warps=4, num_stages=2),
        config(BLOCK_N=64, num_warps=4, num_stages=3),
        config(BLOCK_N=64, num_warps=8, num_stages=3),
        config(BLOCK_N=128, num_warps=8, num_stages=2),
        config(BLOCK_N=128, num_warps=8, num_stages=3),
    ]


ATTENTION = Tunable(
    _attn_kernel,
    hopper_configs(),
    key=["GROUP", "HEAD_DIM", "HEAD_PAD", "BLOCK_M", "SPLIT", "HAS_WINDOW"],
)
COMBINE = Tunable(
    _combine_kernel, [config(num_warps=4)], key=["HEAD_DIM", "HEAD_PAD", "SPLITS", "HEADS"]
)


def choose_num_splits(
    num_programs: int, max_context_len: int, num_sms: int, max_splits: int, min_split_len: int
) -> int:
    """Split-KV pieces so that few long sequences still fill about two waves of SMs."""
    if num_programs >= num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, num_programs)
    return max(1, min(max_splits, wanted, max_context_len // min_split_len))


def cut_tiles(query_start: torch.Tensor, tile_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each chunk into tiles of ``tile_q`` tokens: (sequence [P], first flat row [P])."""
    q_lens = query_start[1:] - query_start[:-1]  # [B]
    n_tiles = (q_lens + tile_q - 1) // tile_q  # [B]
    tile_seq = torch.repeat_interleave(torch.arange(len(q_lens), device=q_lens.device), n_tiles)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles  # [B]
    index = torch.arange(len(tile_seq), device=q_lens.device) - first_tile[tile_seq]  # [P]
    return tile_seq, query_start[tile_seq] + index * tile_q


@dataclass
class AttentionPlan:
    """Launch metadata of one step, shared by every layer: which sequence and first query row
    each tile has, and how many KV splits (tiles are cut on first use, per GQA group). Made
    from the step's plain tensors (the engine's batch holds them under the same names)."""

    query_start: torch.Tensor  # [B + 1]
    context_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, max_blocks]
    block_size: int
    max_query_len: int
    max_context_len: int
    block_m: int = 64  # most rows per tile (tokens x grouped heads)
    num_splits: int | None = 1  # None: choose by occupancy (CUDA), see choose_num_splits
    max_splits: int = 16
    min_split_len: int = 256
    _cache: dict = field(default_factory=dict, repr=False)

    def tiles(self, group: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(tile_seq [P], tile_start [P], BLOCK_M, num_splits) for ``group`` heads per KV head."""
        key = ("tiles", group, num_kv_heads)
        if key not in self._cache:
            rows = next_pow2(self.max_query_len * group)  # what the longest chunk fills
            block_m = max(16, next_pow2(group), min(self.block_m, rows))
            tile_seq, tile_start = cut_tiles(self.query_start, block_m // group)
            splits = self._splits(len(tile_seq) * num_kv_heads)
            self._cache[key] = (tile_seq, tile_start, block_m, splits)
        return self._cache[key]

    def _splits(self, num_programs: int) -> int:
        if self.num_splits is not None:
            return self.num_splits
        if self.query_start.device.type != "cuda":
            return 1
        sms = torch.cuda.get_device_properties(self.query_start.device).multi_processor_count
        return choose_num_splits(
            num_programs, self.max_context_len, sms, self.max_splits, self.min_split_len
        )

    def scratch(self, splits: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Split-KV partial outputs [S, T, Hq, D] and log-sum-exps [S, T, Hq], made once a step."""
        key = ("scratch", splits, tuple(shape))
        if key not in self._cache:
            dev = self.query_start.device
            part = torch.empty((splits, *shape), dtype=torch.float32, device=dev)
            self._cache[key] = (part, torch.empty(part.shape[:-1], dtype=torch.float32, device=dev))
        return self._cache[key]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    plan: AttentionPlan,
    scale: float,
    window: int | None = None,
    cfg: triton.Config | None = None,
    autotune: bool = False,
) -> torch.Tensor:  # [T, Hq, D]
    """Attend each query row to its sequence's cached K/V (this step's K/V already written).

    ``cfg`` sets the KV tile, warps and stages (default: the first Hopper config); ``autotune``
    picks them on a GPU.
    """
    check_runnable(_attn_kernel, q)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if q.stride(-1) != 1 or not k_cache.is_contiguous() or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_attention needs unit-stride q rows and contiguous K/V caches")
    tile_seq, tile_start, block_m, splits = plan.tiles(num_heads // num_kv_heads, num_kv_heads)
    head_pad = max(16, next_pow2(head_dim))  # tl.dot needs 16 lanes at least
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    part, lse = plan.scratch(splits, out.shape) if splits > 1 else (out[None], out[None, ..., 0])
    ATTENTION(
        lambda meta: (len(tile_seq), num_kv_heads, splits),
        cfg,
        autotune,
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, out_ptr=part, lse_ptr=lse,
        tile_seq_ptr=tile_seq, tile_start_ptr=tile_start, query_start_ptr=plan.query_start,
        context_lens_ptr=plan.context_lens, block_tables_ptr=plan.block_tables,
        stride_qt=q.stride(0), stride_qh=q.stride(1),
        stride_ct=k_cache.stride(0), stride_ch=k_cache.stride(1),
        stride_os=part.stride(0), stride_ot=part.stride(1), stride_oh=part.stride(2),
        stride_ls=lse.stride(0), stride_lt=lse.stride(1), stride_bt=plan.block_tables.stride(0),
        num_splits=splits, block_size=plan.block_size, window=window or 0,
        scale_log2=scale * LOG2E,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_PAD=head_pad, BLOCK_M=block_m,
        SPLIT=splits > 1, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    if splits > 1:  # heads per program: keep the [splits, heads, D] tile near 4K values
        heads = min(next_pow2(num_heads), max(1, 4096 // (next_pow2(splits) * head_pad)))
        COMBINE(
            lambda meta: (num_tokens, triton.cdiv(num_heads, heads)),
            part_ptr=part, lse_ptr=lse, out_ptr=out, num_splits=splits, num_heads=num_heads,
            stride_ps=part.stride(0), stride_ls=lse.stride(0),
            HEAD_DIM=head_dim, HEAD_PAD=head_pad, SPLITS=next_pow2(splits), HEADS=heads,
        )  # fmt: skip
    return out
