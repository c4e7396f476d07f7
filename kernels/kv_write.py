"""KV write with rotary embedding fused: one launch rotates this step's queries and keys, and
writes the keys with the values into their paged-cache slots. Reference: ``rope_kv_write_ref``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Tunable, check_runnable, config, next_pow2


@triton.jit
def _rotate_copy(
    src_ptr, src_off, dst_ptr, dst_off, ok, cos, sin,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr,
    ROPE: tl.constexpr,
):  # fmt: skip
    """Copy rows ``src_off`` [BT, 1] of ``src`` to rows ``dst_off`` of ``dst``. With ROPE the
    first 2 * HALF dims rotate in halves by ``cos``/``sin`` [BT, HALF_PAD]; the dims after them
    (all of them without ROPE) are copied as they are. Lanes past a size are masked."""
    if ROPE:
        d = tl.arange(0, HALF_PAD)[None, :]
        m = ok & (d < HALF)
        x1 = tl.load(src_ptr + src_off + d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src_ptr + src_off + HALF + d, mask=m, other=0.0).to(tl.float32)
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        tl.store(dst_ptr + dst_off + d, y1.to(dst_ptr.dtype.element_ty), mask=m)
        tl.store(dst_ptr + dst_off + HALF + d, y2.to(dst_ptr.dtype.element_ty), mask=m)
    p = 2 * HALF + tl.arange(0, PASS_PAD)[None, :]  # HALF is 0 without ROPE
    pm = ok & (p < HEAD_DIM)
    tl.store(dst_ptr + dst_off + p, tl.load(src_ptr + src_off + p, mask=pm), mask=pm)


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_tokens, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_rt,
    stride_ot, stride_oh, stride_ct, stride_ch,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    HALF_PAD: tl.constexpr, PASS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    """Program (token tile, head): heads below NUM_Q_HEADS rotate queries into ``q_out``; the
    others rotate one KV head's keys and write them and the values into their cache slots.
    RoPE rotates the first 2 * HALF head dims (all of them, or fewer: partial rotary)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]  # [BT, 1]
    head = tl.program_id(1)
    ok = t < num_tokens
    d = tl.arange(0, HALF_PAD)[None, :]
    rot_ok = ok & (d < HALF)
    cos = tl.load(cos_ptr + t * stride_rt + d, mask=rot_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_rt + d, mask=rot_ok, other=0.0).to(tl.float32)
    if head < NUM_Q_HEADS:
        q_src, q_dst = t * stride_qt + head * stride_qh, t * stride_ot + head * stride_oh
        _rotate_copy(q_ptr, q_src, q_out_ptr, q_dst, ok, cos, sin, HEAD_DIM, HALF, HALF_PAD,
                     PASS_PAD, ROPE)  # fmt: skip
    else:  # no name is defined in both branches: compiled Triton would need them to agree
        kv = head - NUM_Q_HEADS
        slot = tl.load(slot_ptr + t, mask=ok, other=0).to(tl.int64)  # [BT, 1]
        dst = slot * stride_ct + kv * stride_ch
        _rotate_copy(k_ptr, t * stride_kt + kv * stride_kh, k_cache_ptr, dst, ok, cos, sin,
                     HEAD_DIM, HALF, HALF_PAD, PASS_PAD, ROPE)  # fmt: skip
        full = tl.arange(0, DIM_PAD)[None, :]
        vm = ok & (full < HEAD_DIM)
        v = tl.load(v_ptr + t * stride_vt + kv * stride_vh + full, mask=vm)
        tl.store(v_cache_ptr + dst + full, v, mask=vm)


def hopper_configs() -> list:
    """Autotune space (tokens per program, warps) for Hopper-class GPUs; first is the default."""
    return [
        config(BLOCK_T=16, num_warps=4),
        config(BLOCK_T=32, num_warps=4),
        config(BLOCK_T=64, num_warps=4),
        config(BLOCK_T=64, num_warps=8),
    ]


ROPE_KV_WRITE = Tunable(_rope_kv_write_kernel, hopper_configs(), key=["HEAD_DIM", "HALF", "ROPE"])


def rope_kv_write(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_slots, Hkv, D]
    v_cache: torch.Tensor,  # [num_slots, Hkv, D]
    slot_mapping: torch.Tensor,  # [T]
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: [T, R] or [T, 1, R]
    cfg: triton.Config | None = None,
    autotune: bool = False,
) -> torch.Tensor:  # [T, Hq, D]
    """Write rotated ``k`` and ``v`` into their slots; return rotated ``q`` (``q`` itself when
    ``rope`` is None). The tables rotate the first R <= D dims (R even; R < D: partial rotary);
    any head dim works (padded lanes masked). ``cfg`` sets tokens per program and warps;
    ``autotune`` picks them on a GPU."""
    check_runnable(_rope_kv_write_kernel, q)
    num_tokens, num_heads, head_dim = q.shape
    unit_rows = q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    if not unit_rows or not k_cache.is_contiguous() or v_cache.stride() != k_cache.stride():
        raise ValueError("rope_kv_write needs unit-stride head dims and contiguous caches")
    if rope is None:
        cos = sin = q.new_zeros(1, 2).expand(num_tokens, -1)  # [T, 2], stride 0: unused
        q_out, q_heads, rot = q, 0, 0
    else:
        cos, sin = (r.reshape(num_tokens, -1) for r in rope)  # [T, R]
        q_out, q_heads = torch.empty(q.shape, dtype=q.dtype, device=q.device), num_heads
        rot = cos.shape[1]
        if rot % 2 or rot > head_dim:
            raise ValueError(f"rope tables rotate {rot} dims: an even number up to {head_dim}")
    ROPE_KV_WRITE(
        lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), q_heads + k.shape[1]),
        cfg,
        autotune,
        q_ptr=q, k_ptr=k, v_ptr=v, cos_ptr=cos, sin_ptr=sin, q_out_ptr=q_out,
        k_cache_ptr=k_cache, v_cache_ptr=v_cache, slot_ptr=slot_mapping, num_tokens=num_tokens,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_rt=cos.stride(0),
        stride_ot=q_out.stride(0), stride_oh=q_out.stride(1),
        stride_ct=k_cache.stride(0), stride_ch=k_cache.stride(1),
        NUM_Q_HEADS=q_heads, HEAD_DIM=head_dim, HALF=rot // 2, HALF_PAD=next_pow2(rot // 2),
        PASS_PAD=next_pow2(head_dim - rot), DIM_PAD=next_pow2(head_dim), ROPE=rope is not None,
    )  # fmt: skip
    return q_out


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [T, H, D] in float32, as Hugging Face does: the first R dims
    of the tables (R <= D) rotate in halves, the others pass through."""
    cos, sin = (r.reshape(x.shape[0], 1, -1).float() for r in (cos, sin))
    rot = cos.shape[-1]
    xf, half = x.float(), rot // 2
    part = xf[..., :rot]
    rotated = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
    return torch.cat((part * cos + rotated * sin, xf[..., rot:]), dim=-1).to(x.dtype)


def rope_kv_write_ref(q, k, v, k_cache, v_cache, slot_mapping, rope=None) -> torch.Tensor:
    """Plain-torch ``rope_kv_write``: rotate, then ``index_copy_`` into the caches."""
    if rope is not None:
        q, k = rotate_ref(q, *rope), rotate_ref(k, *rope)
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)
    return q
