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

from modgen.blocks import FeedForward, register_block


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


@register_block("mlp", "gated")
class GatedMLP(FeedForward):
    """``down(act(gate(x)) * up(x))`` with gate and up packed into one projection."""

    def __init__(
        self, arch: Any, *, intermediate: int, act: str = "silu", bias: bool = False
    ) -> None:
        super().__init__()
        self.act = act
        self.gate_up = nn.Linear(arch.hidden_size, 2 * intermediate, bias=bias)
        self.down = nn.Linear(intermediate, arch.hidden_size, bias=bias)

    @classmethod
    def check(cls, *, act: str = "silu", **_: Any) -> None:
        check_activation(act)

    def forward(self, x, step):
        return self.down(gated_act(self.gate_up(x), self.act, step.ops))


@register_block("mlp", "plain")
class PlainMLP(FeedForward):
    """``down(act(up(x)))``."""

    def __init__(
        self, arch: Any, *, intermediate: int, act: str = "gelu", bias: bool = True
    ) -> None:
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.up = nn.Linear(arch.hidden_size, intermediate, bias=bias)
        self.down = nn.Linear(intermediate, arch.hidden_size, bias=bias)

    @classmethod
    def check(cls, *, act: str = "gelu", **_: Any) -> None:
        check_activation(act)

    def forward(self, x, step):
        return self.down(self.act(self.up(x)))
