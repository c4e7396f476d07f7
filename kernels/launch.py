"""What every kernel launch shares: a device check and fixed-or-autotuned launch configs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton

from . import is_interpreted


def check_runnable(kernel: Any, x: torch.Tensor) -> None:
    """Raise RuntimeError, saying why, if ``kernel`` cannot run on ``x``'s device."""
    if x.device.type == "cuda" or (x.device.type == "cpu" and is_interpreted(kernel)):
        return
    if x.device.type == "cpu":
        raise RuntimeError(
            "Triton kernels run on CPU tensors only under the interpreter, and these were created "
            "without it: set TRITON_INTERPRET=1 before modgen.kernels is first imported"
        )
    raise RuntimeError(f"Triton kernels need a CUDA device, got '{x.device}'")


def config(num_warps: int = 4, num_stages: int = 2, **meta: int) -> triton.Config:
    """A launch config: meta-parameters (block sizes) plus warps and pipeline stages."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


class Tunable:
    """A jitted kernel launched with one fixed config, or autotuned over ``configs`` on a GPU.

    ``configs[0]`` is the default; autotuning never runs under the interpreter, where every
    config would be executed in Python.
    """

    def __init__(self, kernel: Any, configs: list[triton.Config], key: list[str]) -> None:
        self.kernel, self.configs, self.key = kernel, configs, key
        self._tuned: Any = None

    def __call__(
        self,
        grid: Callable[[dict], tuple[int, ...]],
        cfg: triton.Config | None = None,
        autotune: bool = False,
        **args: Any,
    ) -> None:
        """Launch over ``grid(meta)`` with ``cfg`` (default ``configs[0]``), or autotuned."""
        if autotune and not is_interpreted(self.kernel):
            if self._tuned is None:
                self._tuned = triton.autotune(self.configs, key=self.key)(self.kernel)
            self._tuned[grid](**args)
            return
        cfg = cfg or self.configs[0]
        self.kernel[grid](**args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
