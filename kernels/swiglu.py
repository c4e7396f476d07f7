"""SwiGLU activation, ``silu(gate) * up``, over a packed ``[gate | up]`` projection.
Reference: ``swiglu_ref`` (below)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import Tunable, check_runnable, config


@triton.jit
def _swiglu_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    """Program (row, column tile): gate and up read from the two halves of row ``x``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def hopper_configs() -> list:
    """Autotune space (column tile, warps) for Hopper-class GPUs; the first is the default."""
    return [
        config(BLOCK=1024, num_warps=4),
        config(BLOCK=2048, num_warps=8),
        config(BLOCK=4096, num_warps=8),
    ]


SWIGLU = Tunable(_swiglu_kernel, hopper_configs(), key=["n_cols"])


def swiglu(
    gate_up: torch.Tensor, cfg: triton.Config | None = None, autotune: bool = False
) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [..., 2 * I] -> [..., I] (``cfg``: column tile and
    warps; or autotuned on a GPU)."""
    check_runnable(_swiglu_kernel, gate_up)
    x = gate_up.reshape(-1, gate_up.shape[-1])  # [N, 2I]
    if x.stride(-1) != 1 or x.shape[1] % 2:
        raise ValueError("swiglu needs unit-stride rows of even width [gate | up]")
    n_cols = x.shape[1] // 2
    out = torch.empty((x.shape[0], n_cols), dtype=x.dtype, device=x.device)
    SWIGLU(
        lambda meta: (x.shape[0], triton.cdiv(n_cols, meta["BLOCK"])),
        cfg,
        autotune,
        x_ptr=x, out_ptr=out, n_cols=n_cols, stride_x=x.stride(0), stride_o=out.stride(0),
    )  # fmt: skip
    return out.view(*gate_up.shape[:-1], n_cols)


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain torch, as the Llama MLP computes it."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
