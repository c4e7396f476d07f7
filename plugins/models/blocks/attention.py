"""The ``qkv`` attention block: one packed q/k/v projection (biases optional), optional per-head
q/k norms, rotary embedding (fused into the backend's KV write when it can), the attention
backend, and the output projection. Checkpoints that fuse q/k/v in another row order (Falcon's)
are reordered once after loading."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modgen.blocks import AttentionBlock, BlockSpec, build_block, register_block, tp_heads, tp_place
from modgen.plugins.models.blocks.position import rotate

LAYOUTS = ("packed", "falcon_grouped", "falcon_interleaved")
"""Row orders of a fused q/k/v weight: ``packed`` (every q head, then every k, then every v),
``falcon_grouped`` (per KV head: its query heads, its k, its v; Falcon's
new_decoder_architecture) and ``falcon_interleaved`` (per head: q, k, v; Falcon without
multi-query)."""


@register_block("attention", "qkv")
class QKVAttention(AttentionBlock):
    """Self-attention of one layer over the paged KV cache, with that layer's sliding window.
    Over tensor-parallel ranks each holds its query heads and their KV heads (q/k/v split by
    columns), and the output projection, split by rows, is summed over the ranks."""

    tensor_parallel = True
    keeps_rows = True

    def __init__(
        self,
        arch: Any,
        index: int,
        *,
        bias: bool = False,
        out_bias: bool = False,
        qk_norm: BlockSpec | None = None,
        layout: str = "packed",
        prescale: bool = False,
    ) -> None:
        super().__init__()
        rank, world = tp_place(arch)
        if world > 1 and layout != "packed":
            raise ValueError(
                f"tensor parallelism over the fused q/k/v layout '{layout}' is not implemented "
                "(its rows interleave heads; engine.tensor_parallel must be 1)"
            )
        (self.heads, self.kv_heads), self.dim = tp_heads(arch), arch.head_dim
        self.first_rank = rank == 0
        self.window, self.layout, self.prescale = arch.windows[index], layout, prescale
        self.q_size, self.kv_size = self.heads * self.dim, self.kv_heads * self.dim
        self.scale = self.dim**-0.5
        hidden = arch.hidden_size
        self.qkv = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=out_bias)
        self.q_norm = None if qk_norm is None else build_block(qk_norm, self.dim)
        self.k_norm = None if qk_norm is None else build_block(qk_norm, self.dim)

    @classmethod
    def check(cls, *, layout: str = "packed", qk_norm: Any = None, **_: Any) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"q/k/v layout '{layout}' is not implemented; implemented: {LAYOUTS}")
        if qk_norm is not None and (not isinstance(qk_norm, BlockSpec) or qk_norm.kind != "norm"):
            raise ValueError(f"qk_norm must be a norm block spec, got {qk_norm!r}")

    @torch.no_grad()
    def post_load(self) -> None:
        """Rows of a Falcon-layout fused weight (and bias) into the packed order; the output
        bias on the first rank only (the ranks' outputs are summed)."""
        if not self.first_rank and self.o_proj.bias is not None:
            self.o_proj.bias.zero_()
        if self.layout == "packed":
            return
        for p in (self.qkv.weight, self.qkv.bias):
            if p is None:
                continue
            rest = p.shape[1:]
            if self.layout == "falcon_grouped":  # [Hkv, group + 2, D]
                w = p.data.view(self.kv_heads, -1, self.dim, *rest)
                parts = (w[:, :-2], w[:, -2], w[:, -1])
            else:  # [H, 3, D]
                w = p.data.view(self.heads, 3, self.dim, *rest)
                parts = (w[:, 0], w[:, 1], w[:, 2])
            p.data.copy_(torch.cat([x.reshape(-1, *rest) for x in parts]))

    def forward(self, x, step, kv_cache):
        d = self.dim
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.heads, d)
        k = k.view(-1, self.kv_heads, d)
        v = v.view(-1, self.kv_heads, d)
        if self.q_norm is not None:
            q, _ = self.q_norm(q, step.ops)
            k, _ = self.k_norm(k, step.ops)
        scale = self.scale
        if self.prescale:  # OPT scales the projected queries, then attends unscaled
            q, scale = q * scale, 1.0
        attn, batch, meta, rope = step.attn, step.batch, step.meta, step.rope
        fused = rope is not None and attn.fuses_rope  # the backend rotates q/k in its KV write
        if rope is not None and not fused:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if step.keep is not None:  # every row's K/V; attention for the kept rows only
            attn.write_kv(k, v, kv_cache, batch, rope if fused else None)
            rows, batch, meta = step.keep.rows, step.keep.batch, step.keep.meta
            if rows.shape[0] == 0:  # on every rank alike: no collective to meet
                return x[:0]
            q, k, v = q[rows], k[rows], v[rows]
            rope = (rope[0][rows], rope[1][rows]) if fused else None
        if fused:
            o = attn.forward(q, k, v, kv_cache, batch, meta, scale, self.window, rope=rope)
        else:
            o = attn.forward(q, k, v, kv_cache, batch, meta, scale, self.window)
        return step.parallel.all_reduce(self.o_proj(o.reshape(-1, self.q_size)))
