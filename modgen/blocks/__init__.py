"""Model building blocks: one registry per module interface (norm, position, attention, mlp,
moe, layer), the interfaces blocks implement, and the element-wise ops they run on.

A family names its blocks as data (``block("norm", "rms", eps=1e-5)``); the decoder that
assembles them looks each up in its registry, so a new family, or a new block, needs no edit of
the core.
"""

from modgen.blocks.interfaces import (
    AttentionBlock,
    Block,
    FeedForward,
    Keep,
    LayerLayout,
    Norm,
    PositionEncoding,
    Step,
    tp_heads,
    tp_part,
    tp_place,
)
from modgen.blocks.registry import (
    BlockError,
    BlockSpec,
    block,
    block_names,
    build_block,
    get_block,
    register_block,
)

__all__ = [
    "AttentionBlock",
    "Block",
    "BlockError",
    "BlockSpec",
    "FeedForward",
    "Keep",
    "LayerLayout",
    "Norm",
    "PositionEncoding",
    "Step",
    "block",
    "block_names",
    "build_block",
    "get_block",
    "register_block",
    "tp_heads",
    "tp_part",
    "tp_place",
]
