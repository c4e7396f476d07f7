"""Norm blocks: ``rms`` (Llama's RMSNorm), ``gemma_rms`` (Gemma's ``1 + w`` RMSNorm) and
``layer`` (LayerNorm). Each takes the residual add before it, so the fused CPU kernel can do
both in one pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modgen.blocks import Norm, register_block


@register_block("norm", "rms")
class RMSNorm(Norm):
    """``weight * (h / rms(h))``, normalised in float32 and cast back before the scale (as
    Hugging Face Llama does); over the last dim of any shape (per-head q/k norms too)."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def scale(self) -> torch.Tensor:
        """The weight the normalised rows are multiplied by."""
        return self.weight

    def forward(self, x, ops, residual=None):
        if x.dim() == 2:
            return ops.rms_norm(x, self.scale(), self.eps, residual)
        shape = x.shape  # [..., dim]: rows of a flat 2-D view
        flat = None if residual is None else residual.reshape(-1, self.dim)
        out, h = ops.rms_norm(x.reshape(-1, self.dim), self.scale(), self.eps, flat)
        return out.view(shape), h.view(shape)


@register_block("norm", "gemma_rms")
class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: ``h / rms(h) * (1 + weight)``, all in float32, then cast back (so it
    differs from Llama's in half precision, not in float32)."""

    def post_load(self) -> None:
        self._scale = 1.0 + self.weight.detach().float()  # [dim] float32, computed once

    def scale(self) -> torch.Tensor:
        return self._scale

    def forward(self, x, ops, residual=None):
        if x.dtype == torch.float32:  # the same values as Llama's form with 1 + w: fused path
            return super().forward(x, ops, residual)
        h = x if residual is None else x + residual
        hf = h.float()
        normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self._scale).to(h.dtype), h


@register_block("norm", "layer")
class LayerNorm(Norm):
    """LayerNorm (``F.layer_norm``), with or without its affine weight and bias."""

    def __init__(
        self, dim: int, *, eps: float = 1e-5, affine: bool = True, bias: bool = True
    ) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None

    def forward(self, x, ops, residual=None):
        h = x if residual is None else x + residual
        return F.layer_norm(h, (self.dim,), self.weight, self.bias, self.eps), h
