"""The element-wise ops through modgen's C++ kernels (``modgen.kernels.cpu``), offered to the
model's measured choice of ops (``modgen.blocks.ops.choose_ops``) as ``cpp``."""

from __future__ import annotations

from modgen.blocks.ops import OpsUnavailable, TorchOps, register_ops
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
