"""Attention backend interface: ragged attention over the paged KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from modgen.engine.batch import RaggedBatch


@dataclass(frozen=True)
class AttentionSpec:
    """What a model asks of an attention backend."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    sliding_window: int | None
    rotary_dim: int | None = None
    """Head dims RoPE rotates (the first ones; fewer than ``head_dim`` for partial rotary);
    None for a model without RoPE, or one that does not say."""


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [T, H, D] with ``cos``/``sin`` [T, 1, R] (R <= D: the first R
    dims rotate, in halves as Hugging Face's rotate_half, the others pass through)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(kw_only=True)
class AttentionConfig:
    """Settings every attention backend has (none yet)."""


class AttentionBackend(ABC):
    """Computes attention for a whole ragged batch (prompt chunks and decodes) in one call.

    The KV cache of one layer is a pair of tensors ``[num_slots, num_kv_heads, head_dim]``; slot
    ``block * block_size + offset`` holds a token's key and value.

    A backend whose ``fuses_rope`` is True applies rotary embedding itself (fused with the KV
    write): the model then hands it ``q`` and ``k`` un-rotated, with ``rope=(cos, sin)``.
    """

    Config = AttentionConfig
    fuses_rope: bool = False
    """Whether ``forward`` takes un-rotated q/k plus ``rope`` and rotates them itself."""

    def __init__(self, config: AttentionConfig) -> None:
        self.config = config

    def check(self, spec: AttentionSpec) -> None:  # noqa: B027 (optional hook)
        """Raise ValueError saying why this backend cannot serve ``spec``; pass if it can."""

    @classmethod
    def variants(cls, spec: AttentionSpec) -> list[dict[str, Any]]:
        """Settings of this backend worth measuring against each other for ``spec`` (as config
        overrides; ``attention=auto`` times each). Default: the backend's defaults alone."""
        return [{}]

    def version(self) -> str:
        """Names the code this backend runs, so a calibration is redone when it changes."""
        return ""

    @abstractmethod
    def prepare(self, batch: RaggedBatch) -> Any:
        """Per-step metadata shared by every layer (index tensors, masks)."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D], rotary applied unless fuses_rope
        k: torch.Tensor,  # [T, Hkv, D], rotary applied unless fuses_rope
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [num_slots, Hkv, D]
        batch: RaggedBatch,
        meta: Any,
        scale: float,
        sliding_window: int | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin: [T, 1, D]
    ) -> torch.Tensor:  # [T, Hq, D]
        """Write ``k`` and ``v`` into their slots, then attend each query to its sequence's KV.

        ``rope`` is passed only to backends with ``fuses_rope``: they rotate ``q`` and ``k`` by
        it (``x * cos + rotate_half(x) * sin``) before use.
        """

    def write_kv(
        self,
        k: torch.Tensor,  # [T, Hkv, D], rotary applied unless fuses_rope
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        batch: RaggedBatch,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Write ``k`` and ``v`` into their slots without attending (a layer whose queries'
        outputs no one reads: the last layer's rows that need no logits); ``rope`` as in
        ``forward``. By default in torch, into the layout above; a backend whose cache layout
        or rotation differs overrides it."""
        if rope is not None and self.fuses_rope:
            k = apply_rope(k, *rope)
        kv_cache[0].index_copy_(0, batch.slot_mapping, k.to(kv_cache[0].dtype))
        kv_cache[1].index_copy_(0, batch.slot_mapping, v.to(kv_cache[1].dtype))
