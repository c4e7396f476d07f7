"""Kernels, each with the plain-torch reference it is checked against: Triton kernels (GPU, or
Triton's CPU interpreter) and the CPU's C++ kernels (``cpu.py``, ``cpu_kernels.cpp``).

Importing this package does not import Triton; each kernel module does. Kernels are created when
their module is imported, so ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests) must be
set before that; on a CUDA device they compile for real.
"""

from __future__ import annotations

import os
from typing import Any

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was created under the interpreter (it can then run on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"
