"""Every kernel compiles for a Hopper GPU (sm_90, down to cubin) without one: Triton's compiler
and ptxas run on CPU. This catches what the interpreter accepts but the compiler rejects (a name
given different types in the two branches of an ``if``, say).

The launchers run as usual on CPU tensors, but each launch is recorded instead of run; the
recorded argument types and constexprs are then compiled, in a subprocess where the kernels are
made without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SM90 = ("cuda", 90, 32)
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


def record_launches() -> list[tuple]:
    """(kernel, args, config) of each launch the launchers make for a few realistic variants."""
    import torch

    from modgen.kernels import kv_write, launch, paged_attention, rms_norm, swiglu
    from modgen.kernels.testing import plan_for, random_batch

    launches = []
    launch.Tunable.__call__ = lambda self, grid, cfg=None, autotune=False, **args: launches.append(
        (self.kernel, args, cfg or self.configs[0])
    )
    for module in (kv_write, paged_attention, rms_norm, swiglu):
        module.check_runnable = lambda kernel, x: None
    mixed, slots = random_batch([1, 1, 40], [300, 9, 90], 16)
    decodes, _ = random_batch([1, 1, 1], [300, 9, 90], 16)  # smallest query tile
    variants = [  # dtype, query heads per KV head, head_dim, window, splits, step, rotary dims
        (torch.bfloat16, 4, 128, None, 1, mixed, None),
        (torch.bfloat16, 4, 128, 4096, 3, decodes, 128),
        (torch.float16, 8, 64, None, 1, mixed, 64),
        (torch.float32, 1, 32, 8, 1, decodes, 32),
        (torch.bfloat16, 4, 80, 2047, 2, mixed, 32),  # Phi-2's head dim, partial rotary
    ]
    for dtype, group, dim, window, splits, batch, rot in variants:
        q = torch.zeros(batch.num_tokens, 2 * group, dim, dtype=dtype)
        k_cache = torch.zeros(slots, 2, dim, dtype=dtype)
        plan = plan_for(batch, num_splits=splits)
        paged_attention.paged_attention(q, k_cache, k_cache, plan, 0.1, window)
        k = q[:, :2]
        rope = None if rot is None else (q[:, :1, :rot], q[:, :1, :rot])
        kv_write.rope_kv_write(q, k, k, k_cache, k_cache, batch.slot_mapping, rope)
        x = torch.zeros(3, 4096, dtype=dtype)
        rms_norm.rms_norm(x, x[0], 1e-5) if splits == 1 else rms_norm.add_rms_norm(x, x, x[0], 1e-5)
        swiglu.swiglu(x)
    return launches


def compile_all() -> None:
    """Compile each distinct recorded launch for sm_90 and print one line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = set()
    for kernel, args, cfg in record_launches():
        names = [kernel.arg_names[i] for i in kernel.constexprs]
        constexprs = {**{n: args[n] for n in names if n in args}, **cfg.kwargs}
        signature = {n: _type(args[n]) if n in args and n not in constexprs else "constexpr"
                     for n in kernel.arg_names}  # fmt: skip
        key = (kernel.__name__, str(sorted(signature.items())), str(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        src = ASTSource(kernel, signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget(*SM90), options=options)
        assert compiled.asm.get("cubin"), kernel.__name__
        print("compiled", kernel.__name__, constexprs)


def _type(value) -> str:
    if hasattr(value, "dtype"):
        return "*" + TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, float):
        return "fp32"
    return "i32" if -(2**31) <= value < 2**31 else "i64"


def test_every_kernel_compiles_for_hopper():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env,
        cwd=Path(__file__).parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("_attn_kernel", "_combine_kernel", "_rope_kv_write_kernel", "_rms_norm_kernel"):
        assert f"compiled {name}" in out.stdout
    assert "compiled _swiglu_kernel" in out.stdout


if __name__ == "__main__":
    compile_all()
