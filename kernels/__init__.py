"""Kernels, each with the plain-torch reference it is checked against: Triton kernels (GPU, or
Triton's CPU interpreter) and the CPU's C++ kernels (``cpu.py``, ``cpu_kernels.cpp``).

Importing this package does not import Triton; each kernel module does. Kernels are created when
their module is imported, so ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, for tests) must be
set before that; on a CUDA device they compile for real.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

if __name__ == "kernels":
    # Imported by that bare name: the checkout's root is on sys.path (``python -m ...`` run from
    # it), and this directory (installed as ``modgen.kernels``) shadows PyPI's ``kernels``, which
    # transformers imports. Import that package with the root off the path and hand it over;
    # where it is not installed, stay this module (transformers then finds no version of it).
    _root, _path, _this = Path(__file__).resolve().parent.parent, sys.path[:], sys.modules[__name__]
    sys.path[:] = [p for p in _path if Path(p or os.curdir).resolve() != _root]
    try:
        del sys.modules[__name__]
        sys.modules[__name__] = importlib.import_module(__name__)
    except ImportError:
        sys.modules[__name__] = _this
    finally:
        sys.path[:] = _path

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was created under the interpreter (it can then run on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"
