"""Position blocks: ``rope`` (rotary embedding with default, linear, llama3, dynamic and
longrope/su scaling, over all head dims or the first ``rotary_dim``) and ``learned`` (position
embeddings added to the token embeddings, with OPT's offset)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from modgen.attention import apply_rope
from modgen.blocks import PositionEncoding, register_block

ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "longrope", "su")
"""RoPE scalings modgen implements (``su`` is longrope's old name)."""


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling's ``rope_type`` (older configs say ``type``); ``default`` without one."""
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def rope_inv_freq(
    dim: int, theta: float, scaling: dict[str, Any] | None, context: int | None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim / 2] of rotary embedding over ``dim`` head dims, with the
    scaling applied, and the factor cos/sin are multiplied by (longrope's attention factor)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, s = rope_type(scaling), scaling or {}
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        factor, old_len = s["factor"], s["original_max_position_embeddings"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind in ("longrope", "su"):  # within the original context: the short factors
        old_len = s["original_max_position_embeddings"]
        factor = s.get("factor") or (context or old_len) / old_len
        attention = s.get("attention_factor")
        if attention is None:
            attention = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
            )
        short = torch.tensor(s["short_factor"], dtype=torch.float32)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (short * theta**shape), float(attention)
    return inv_freq, 1.0  # default; dynamic within the configured context


rotate = apply_rope
"""Rotary embedding (``modgen.attention.apply_rope``, named as the blocks call it)."""


@register_block("position", "rope")
class RoPE(PositionEncoding):
    """Rotary embedding of the first ``rotary_dim`` head dims (all by default). The tables are
    made once a step in float32, scaled, then cast to the model's dtype, as Hugging Face does."""

    def __init__(
        self,
        arch: Any,
        *,
        theta: float = 10000.0,
        scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
        max_position_embeddings: int | None = None,
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim or arch.head_dim
        context = max_position_embeddings or arch.max_position_embeddings
        self.inv_freq, self.factor = rope_inv_freq(self.rotary_dim, theta, scaling, context)

    @classmethod
    def check(cls, *, scaling=None, rotary_dim=None, **_: Any) -> None:
        kind = rope_type(scaling)
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_type '{kind}' is not implemented; implemented: {ROPE_TYPES}")
        if rotary_dim is not None and (rotary_dim <= 0 or rotary_dim % 2):
            raise ValueError(f"rotary dims must be a positive even number, got {rotary_dim}")

    @classmethod
    def served_context(cls, configured: int, *, scaling=None, **_: Any) -> int:
        """longrope switches to its long factors, for every position, once a sequence passes
        the original context: no cache of rotated keys can follow that, so modgen serves the
        original context, where it is exact."""
        if rope_type(scaling) in ("longrope", "su"):
            return min(configured, scaling["original_max_position_embeddings"])
        return configured

    def tables(self, positions, dtype):
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)  # float32 whatever the dtype
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, R]
        cos, sin = emb.cos(), emb.sin()
        if self.factor != 1.0:
            cos, sin = cos * self.factor, sin * self.factor
        return cos.to(dtype), sin.to(dtype)


@register_block("position", "learned")
class LearnedPositions(PositionEncoding):
    """A learned embedding per position, added to the token embeddings; position p reads row
    ``p + offset`` (OPT keeps two rows before position 0)."""

    def __init__(self, arch: Any, *, offset: int = 0) -> None:
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(
            torch.zeros(arch.max_position_embeddings + offset, arch.hidden_size)
        )

    def embed(self, h, positions):
        return h + nn.functional.embedding(positions + self.offset, self.weight)
