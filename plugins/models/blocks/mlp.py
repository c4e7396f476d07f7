"""MLP blocks: ``gated`` (act(gate) * up, then down: SwiGLU, GeGLU) and ``plain`` (up, act,
down), each with or without biases, and the activations they take (named as in Hugging Face's
``hidden_act``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modgen.blocks import FeedForward, register_block, tp_part, tp_place


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU, written out as Hugging Face's ``gelu_new`` is."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
"""Activations modgen implements, by Hugging Face's name."""


def check_activation(act: str) -> None:
    """Refuse an activation modgen does not implement, by name."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation '{act}' is not implemented; implemented: {list(ACTIVATIONS)}")


def gated_act(gate_up: torch.Tensor, act: str, ops: Any) -> torch.Tensor:
    """``act(gate) * up`` of a packed [rows, 2 * inter] projection (SwiGLU through ``ops``, so
    the fused CPU kernel runs it)."""
    if act == "silu":
        return ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


class _ShardedMLP(FeedForward):
    """Over tensor-parallel ranks the up (and gate) projection splits by columns and the down
    projection by rows; the ranks' outputs are summed (``reduce``; a block that sums several
    partial outputs itself, as the MoE block does, passes False)."""

    tensor_parallel = True

    down: nn.Linear

    def __init__(self, arch: Any, intermediate: int, reduce: bool) -> None:
        super().__init__()
        self.width = tp_part(arch, intermediate, "the MLP width")
        self.first_rank, self.reduce = tp_place(arch)[0] == 0, reduce

    @torch.no_grad()
    def post_load(self) -> None:
        if not self.first_rank and self.down.bias is not None:
            self.down.bias.zero_()  # summed over the ranks: added once

    def output(self, h: torch.Tensor, step: Any) -> torch.Tensor:
        y = self.down(h)
        return step.parallel.all_reduce(y) if self.reduce else y


@register_block("mlp", "gated")
class GatedMLP(_ShardedMLP):
    """``down(act(gate(x)) * up(x))`` with gate and up packed into one projection."""

    def __init__(
        self,
        arch: Any,
        *,
        intermediate: int,
        act: str = "silu",
        bias: bool = False,
        reduce: bool = True,
    ) -> None:
        super().__init__(arch, intermediate, reduce)
        self.act = act
        self.gate_up = nn.Linear(arch.hidden_size, 2 * self.width, bias=bias)
        self.down = nn.Linear(self.width, arch.hidden_size, bias=bias)
        self.gate_up_activates = False
        """Whether ``gate_up`` applies the activation itself (``use_fused``)."""

    @classmethod
    def check(cls, *, act: str = "silu", **_: Any) -> None:
        check_activation(act)

    def fusable(self) -> dict[str, str]:
        return {"gate_up": "silu_mul"} if self.act == "silu" else {}

    def use_fused(self, name: str, module: nn.Module) -> None:
        if name != "gate_up":
            super().use_fused(name, module)
        self.gate_up, self.gate_up_activates = module, True

    def forward(self, x, step):
        if self.gate_up_activates:
            return self.output(self.gate_up(x), step)
        return self.output(gated_act(self.gate_up(x), self.act, step.ops), step)


@register_block("mlp", "plain")
class PlainMLP(_ShardedMLP):
    """``down(act(up(x)))``."""

    def __init__(
        self, arch: Any, *, intermediate: int, act: str = "gelu", bias: bool = True
    ) -> None:
        super().__init__(arch, intermediate, reduce=True)
        self.act = ACTIVATIONS[act]
        self.up = nn.Linear(arch.hidden_size, self.width, bias=bias)
        self.down = nn.Linear(self.width, arch.hidden_size, bias=bias)

    @classmethod
    def check(cls, *, act: str = "gelu", **_: Any) -> None:
        check_activation(act)

    def forward(self, x, step):
        return self.output(self.act(self.up(x)), step)
