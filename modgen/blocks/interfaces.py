"""The interfaces model blocks implement, and the per-step state they share.

Every block is a torch module made from runtime arguments (a norm's width, or the model's
architecture) plus keyword-only settings that a family gives as data. ``check`` refuses settings
a block does not implement before anything is built; ``post_load`` runs once the weights are in
place (a block that keeps a derived copy of a weight makes it there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modgen.attention import AttentionBackend
from modgen.engine.batch import RaggedBatch
from modgen.engine.parallel import SINGLE, Parallel


@dataclass(frozen=True)
class Keep:
    """The rows a layer's output keeps (the last layer's: those that need logits): their flat
    indices, the batch of them alone (``RaggedBatch.only_rows``) and its attention metadata."""

    rows: torch.Tensor
    batch: RaggedBatch
    meta: Any


@dataclass
class Step:
    """What every block of one forward pass shares."""

    batch: RaggedBatch
    attn: AttentionBackend
    meta: Any
    """The attention backend's per-step metadata."""
    ops: Any
    """Element-wise ops (``modgen.blocks.ops.TorchOps`` or a faster implementation)."""
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    """Rotary tables (cos, sin) [T, 1, rotary_dim] of the step's positions; None without RoPE."""
    parallel: Parallel = field(default_factory=lambda: SINGLE)
    """The tensor-parallel ranks the blocks' partial sums are reduced over."""
    keep: Keep | None = None
    """Set for a layer whose output is only ``keep.rows`` (of a layout that ``keeps_rows``):
    every row's keys and values are still written."""


def tp_place(arch: Any) -> tuple[int, int]:
    """(rank, world) of the tensor-parallel shard a block builds from ``arch`` (``tp_rank`` and
    ``tp_world`` of a ``DecoderArch``; (0, 1), the whole model, for an object without them)."""
    return getattr(arch, "tp_rank", 0), getattr(arch, "tp_world", 1)


def tp_part(arch: Any, n: int, what: str) -> int:
    """This rank's equal part of ``n`` (columns, experts) of ``what``; it must split evenly."""
    world = tp_place(arch)[1]
    if n % world:
        raise ValueError(f"{what} of {n} does not split evenly over {world} ranks")
    return n // world


def tp_heads(arch: Any) -> tuple[int, int]:
    """(query heads, KV heads) this rank holds: KV heads are replicated, one per rank, when the
    ranks outnumber them."""
    world = tp_place(arch)[1]
    return tp_part(arch, arch.num_heads, "query heads"), max(1, arch.num_kv_heads // world)


class Block(nn.Module, ABC):
    """Base of every block."""

    tensor_parallel: bool = False
    """Whether the block builds one rank's shard from ``arch.tp_rank`` / ``arch.tp_world`` and
    reduces its partial output over ``step.parallel`` (or, like a norm, needs nothing)."""

    @classmethod
    def check(cls, **settings: Any) -> None:
        """Raise ValueError naming a setting this block does not implement."""

    def post_load(self) -> None:
        """Called once the weights (a checkpoint's or random ones) are in place."""

    def fusable(self) -> dict[str, str]:
        """Linear layers of this block (attribute name -> the step that follows them, one of
        ``modgen.blocks.ops.OUTPUT_STEPS``) that may run with the step fused into their GEMM;
        the model decides by measurement once the layers run in their layouts, and hands each
        fused module to ``use_fused``. None by default."""
        return {}

    def use_fused(self, name: str, module: nn.Module) -> None:
        """Run linear layer ``name`` as ``module``, which applies its step too (from then on
        the block must not apply it again)."""
        raise NotImplementedError(f"{type(self).__name__} offers no fused linear layers")


class Norm(Block):
    """A normalisation over the last dim, with the residual add before it fused in."""

    tensor_parallel = True  # replicated: every rank holds the whole hidden state

    @abstractmethod
    def forward(
        self, x: torch.Tensor, ops: Any, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(h), h)`` with ``h = x + residual`` (or ``x``)."""


class PositionEncoding(Block):
    """Where position enters: rotary tables for the attention, or embeddings added to the
    token embeddings."""

    rotary_dim: int | None = None
    """Head dims RoPE rotates (the first ones); None without RoPE."""
    tensor_parallel = True  # replicated

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary (cos, sin) [T, 1, rotary_dim] of ``positions`` [T]; None without RoPE."""
        return None

    def embed(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``h`` [T, hidden] with position embeddings added (unchanged for RoPE)."""
        return h

    @classmethod
    def served_context(cls, configured: int, **settings: Any) -> int:
        """The longest context this encoding, with these settings, serves exactly, given the
        configured one (which it is by default)."""
        return configured


class AttentionBlock(Block):
    """Projections around the attention backend: x [T, hidden] -> [T, hidden]."""

    keeps_rows: bool = False
    """Whether ``forward`` honours ``step.keep``: writes every row's K/V, returns the kept
    rows' outputs only."""

    @abstractmethod
    def forward(
        self, x: torch.Tensor, step: Step, kv_cache: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor: ...


class FeedForward(Block):
    """An MLP or a mixture of experts: x [T, hidden] -> [T, hidden]."""

    @abstractmethod
    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor: ...


class LayerLayout(Block):
    """A decoder layer: how its norms, attention and feed-forward blocks and the residual
    stream connect. Made from the architecture and the layer's index."""

    @property
    def keeps_rows(self) -> bool:
        """Whether ``forward`` honours ``step.keep`` (returns the kept rows only); the model
        then sets it for the last layer. False by default."""
        return False

    @abstractmethod
    def forward(
        self, h: torch.Tensor, step: Step, kv_cache: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor: ...
