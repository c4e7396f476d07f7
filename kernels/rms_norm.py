"""RMSNorm, optionally with the residual add fused, one row per program. Reference:
``rms_norm_ref`` (below), which computes as Hugging Face Llama does."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Tunable, check_runnable, config, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, n_cols, eps,
    stride_x, stride_r, stride_o, stride_h,
    BLOCK: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    """``h = x (+ residual)`` rounded to the input dtype, then ``w * (h / rms(h))``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, x, mask=ok)
    h = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = w * (h * rstd).to(x.dtype).to(tl.float32)  # normed rounded to the input dtype, as HF
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def hopper_configs() -> list:
    """Autotune space (warps) for Hopper-class GPUs; the first is the default."""
    return [config(num_warps=w) for w in (4, 8, 16)]


RMS_NORM = Tunable(_rms_norm_kernel, hopper_configs(), key=["BLOCK", "RESIDUAL"])


def _launch(x, residual, weight, eps, cfg, autotune) -> tuple[torch.Tensor, torch.Tensor]:
    check_runnable(_rms_norm_kernel, x)
    x2 = x.reshape(-1, x.shape[-1])  # [N, hidden]
    if x2.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("rms_norm needs unit-stride rows")
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res = x2 if residual is None else residual.reshape(x2.shape)
    h = out if residual is None else torch.empty_like(out)
    RMS_NORM(
        lambda meta: (x2.shape[0],),
        cfg,
        autotune,
        x_ptr=x2, res_ptr=res, w_ptr=weight, out_ptr=out, h_ptr=h, n_cols=x2.shape[1], eps=eps,
        stride_x=x2.stride(0), stride_r=res.stride(0), stride_o=out.stride(0), stride_h=h.stride(0),
        BLOCK=next_pow2(x2.shape[1]), RESIDUAL=residual is not None,
    )  # fmt: skip
    return out.view(x.shape), h.view(x.shape)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cfg: triton.Config | None = None,
    autotune: bool = False,
) -> torch.Tensor:
    """RMSNorm of the rows of ``x`` [..., hidden] (``cfg``: warps; or autotuned on a GPU)."""
    return _launch(x, None, weight, eps, cfg, autotune)[0]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cfg: triton.Config | None = None,
    autotune: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` and RMSNorm of ``h``, in one pass: returns (normed, h)."""
    return _launch(x, residual, weight, eps, cfg, autotune)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: (RMSNorm of ``h``, ``h``) with ``h = x (+ residual)``; norm in float32."""
    h = x if residual is None else x + residual
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h
