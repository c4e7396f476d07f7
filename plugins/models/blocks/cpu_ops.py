"""The element-wise ops and linear layers through modgen's C++ kernels (``modgen.kernels.cpu``),
offered to the model's measured choices (``modgen.blocks.ops.choose_ops`` and
``choose_layout``) as ``cpp``."""

from __future__ import annotations

import torch
from torch import nn

from modgen.blocks.ops import (
    OpsUnavailable,
    PackedLinear,
    TorchOps,
    register_linear,
    register_ops,
)
from modgen.kernels import cpu as cpu_kernels


@register_ops(version=cpu_kernels.source_hash)
class CppOps(TorchOps):
    """RMSNorm (+ residual), SwiGLU and the arg-max as torch operators built from C++ (float32
    on the CPU, one pass each). Building them needs no head dim: the attention kernel is a
    separate build."""

    name = "cpp"

    def __init__(self) -> None:
        try:
            cpu_kernels.ops()  # build (or load) them now: a missing compiler shows here
        except cpu_kernels.KernelBuildError as err:
            raise OpsUnavailable(str(err)) from err

    def rms_norm(self, x, weight, eps, residual=None):
        # rows of a strided view (one KV head's slice of a packed projection) are copied once
        return cpu_kernels.rms_norm(x.contiguous(), weight, eps, residual)

    def silu_mul(self, gate_up):
        return cpu_kernels.silu_mul(gate_up)

    def argmax(self, logits):
        if not logits.is_contiguous():
            return logits.argmax(dim=-1)
        return cpu_kernels.argmax(logits)


@register_linear("cpp", version=cpu_kernels.source_hash)
class CppLinear(PackedLinear):
    """A float32 CPU linear layer whose weight is packed once into panels for the C++ GEMM
    (``kernels/cpu_linear.h``): one thread a run of panels, the next panel prefetched while one
    computes, which keeps decode steps' few rows from waiting on the weights."""

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise OpsUnavailable(f"float32 on the CPU only, not {weight.dtype} on {weight.device}")
        try:
            cpu_kernels.ops()
        except cpu_kernels.KernelBuildError as err:
            raise OpsUnavailable(str(err)) from err
        super().__init__(linear)
        self.packed = cpu_kernels.pack_linear(weight)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear(x, self.packed, self.out_features, self.bias)

    def fused(self, step: str) -> nn.Module | None:
        if step != "silu_mul" or self.out_features % 2:
            return None
        # the weight back out of its panels ([panels, in, NP] -> [out, in]), packed gated
        weight = self.packed.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]
        return CppSiluGatedLinear(weight, self.bias)


class CppSiluGatedLinear(nn.Module):
    """SwiGLU's ``silu(gate) * up`` of a [gate; up] projection (``[2 * inter, in]``, the
    ``gated`` MLP's), with silu and the product done as the C++ GEMM writes its output: the
    ``[rows, 2 * inter]`` projection is never written out and read back (``linear_silu_mul``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0] // 2
        self.packed, self.packed_bias = cpu_kernels.pack_linear_gated(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., inter]
        rows = x.reshape(-1, self.in_features).contiguous()
        y = cpu_kernels.linear_silu_mul(rows, self.packed, self.out_features, self.packed_bias)
        return y.view(*x.shape[:-1], self.out_features)
