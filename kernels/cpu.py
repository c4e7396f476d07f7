"""The CPU kernels, as torch operators (``torch.ops.modgen``): fused RMSNorm and SwiGLU, the
greedy arg-max and paged attention. Built with the machine's C++ compiler on first use, cached.

Two kinds of build, both for the machine (``-march=native``) and linked against the OpenMP
runtime torch has loaded (one thread pool, sized by ``torch.set_num_threads``):

- ``cpu_ops.cpp``: the operators, compiled against torch's headers, once per instruction set
  (the widest this CPU runs; about ten seconds, once);
- ``cpu_kernels.cpp``: the attention kernel, compiled for one head dim (``-DHEAD_DIM``) and
  instruction set without torch's headers (half a second), registered with the operator library
  on load. A model's head dim costs one such build; the other operators need none.

The cache key holds the sources' hash, the flags, the compiler and torch's version, so a change
to any of them builds afresh. ``MODGEN_CACHE_DIR`` moves the cache (default
``~/.cache/modgen/kernels``); ``CXX`` picks the compiler (default ``g++``). A side-by-side
measurement of these operators against the ctypes calls they replace is in docs/notes.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
OPS_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
COMMON = Path(__file__).with_name("cpu_common.h")
LINEAR = Path(__file__).with_name("cpu_linear.h")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-std=c++17"]
ISA_FLAGS = {
    "avx512": ["-march=native"],
    "avx2": ["-march=native", "-mno-avx512f"],
    "sse": ["-march=native", "-mno-avx"],
    "neon": ["-march=native"],
    "generic": [],
}
"""Compiler flags per instruction set. The kernel takes its vector width (16, 8 or 4 floats) and
register blocking from the instruction set it is compiled for; x86 builds tune for this CPU and
switch off the wider extensions it has, so an AVX-512 machine can build (and measure) the AVX2
code too."""
_OMP_RUNTIME = re.compile(r"\s(/\S*/lib(?:g|i)?omp[^/\s]*\.so[^/\s]*)$")


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be built on this machine."""


def cache_dir() -> Path:
    """Where built kernels are kept."""
    root = os.environ.get("MODGEN_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "modgen" / "kernels"


def compiler() -> str:
    """The C++ compiler to build with; raises KernelBuildError naming what is missing."""
    cxx = os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise KernelBuildError(
            f"modgen's CPU kernels are built with a C++ compiler and {cxx!r} was not found "
            "(install g++ or set CXX); attention=torch and model.cpu_kernels=false need none"
        )
    return path


@cache
def machine_isas() -> list[str]:
    """The instruction sets this CPU runs that the kernel has a build for, widest first.

    On x86 the ceiling is torch's own CPU capability (so ``ATEN_CPU_CAPABILITY=avx2`` makes an
    AVX-512 machine behave as an AVX2 one for torch and for these kernels alike)."""
    arch = platform.machine().lower()
    if arch in ("x86_64", "amd64"):
        cap = torch.backends.cpu.get_cpu_capability().lower()
        return {"avx512": ["avx512", "avx2", "sse"], "avx2": ["avx2", "sse"]}.get(cap, ["sse"])
    if arch in ("aarch64", "arm64"):
        return ["neon"]
    return ["generic"]


def openmp_runtime() -> Path | None:
    """The OpenMP runtime torch has loaded into this process (read off /proc/self/maps), or None
    where that cannot be told (the kernel then links the compiler's own)."""
    torch.get_num_threads()  # torch's runtime is loaded by now
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    found = {m.group(1) for line in lines if (m := _OMP_RUNTIME.search(line))}
    return Path(found.pop()) if len(found) == 1 else None


def _build(source: Path, cxx: str, flags: list[str], link: list[str], lib_path: Path) -> None:
    """Compile, then link against torch's OpenMP runtime (one runtime, one thread pool)."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        obj, tmp_lib = Path(tmp) / "kernels.o", Path(tmp) / lib_path.name
        for cmd in (
            [cxx, *flags, "-c", str(source), "-o", str(obj)],
            [cxx, "-shared", str(obj), *link, "-o", str(tmp_lib)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelBuildError(
                    f"building {source.name} failed ({' '.join(cmd)}):\n{proc.stderr}"
                )
        os.replace(tmp_lib, lib_path)  # atomic: concurrent builders never see half a file


@cache
def source_hash() -> str:
    """A short hash of the kernel sources (names the code a calibration measured)."""
    sources = b"".join(p.read_bytes() for p in (SOURCE, OPS_SOURCE, COMMON, LINEAR))
    return hashlib.sha256(sources).hexdigest()[:16]


def _link_openmp() -> list[str]:
    """Linker arguments for torch's OpenMP runtime (the compiler's own where it is unknown)."""
    omp = openmp_runtime()
    return [str(omp), f"-Wl,-rpath,{omp.parent}"] if omp else ["-fopenmp"]


def _cached_build(source: Path, name: str, cxx: str, flags: list[str], link: list[str]) -> Path:
    """The library ``name`` built from ``source``, from the cache or built now."""
    key = hashlib.sha256(
        (
            source_hash() + " ".join([cxx, *flags, *link, platform.machine(), platform.node()])
        ).encode()
    ).hexdigest()[:16]
    lib_path = cache_dir() / f"{name}_{key}.so"
    if not lib_path.exists():
        _build(source, cxx, flags, link, lib_path)
    return lib_path


@cache
def ops() -> Any:
    """The operators (``torch.ops.modgen``), built for the widest instruction set this CPU runs
    if they are not cached yet."""
    from torch.utils import cpp_extension

    isa, cxx = machine_isas()[0], compiler()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = [*FLAGS, "-std=c++20", *ISA_FLAGS[isa], f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             *(f"-isystem{p}" for p in cpp_extension.include_paths())]  # fmt: skip
    link = [f"-L{torch_lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}", *_link_openmp()]
    name = f"cpu_ops_{isa}_torch{torch.__version__}"
    torch.ops.load_library(str(_cached_build(OPS_SOURCE, name, cxx, flags, link)))
    return torch.ops.modgen


@cache
def load(head_dim: int = 64, isa: str | None = None) -> ctypes.CDLL:
    """The attention kernel for ``head_dim`` and instruction set ``isa`` (default: the widest
    this CPU runs), built if it is not cached yet and registered with the operators."""
    isas = machine_isas()
    isa = isa or isas[0]
    if isa not in isas:
        raise KernelBuildError(f"this CPU runs the kernels' {isas} builds, not {isa!r}")
    cxx = compiler()
    flags = [*FLAGS, *ISA_FLAGS[isa], f"-DHEAD_DIM={head_dim}"]
    path = _cached_build(SOURCE, f"cpu_kernels_d{head_dim}_{isa}", cxx, flags, _link_openmp())
    lib = ctypes.CDLL(str(path))
    lib.modgen_isa.restype = ctypes.c_char_p
    built = lib.modgen_isa().decode()
    if built != isa:
        raise KernelBuildError(f"asked {cxx} for {isa} code ({' '.join(flags)}), got {built}")
    address = ctypes.cast(lib.modgen_attention_f32, ctypes.c_void_p).value
    ops().register_attention(isa, head_dim, address)
    return lib


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] float32; heads packed, rows may be strided
    k_cache: torch.Tensor,  # [slots, Hkv, D], contiguous
    v_cache: torch.Tensor,  # [slots, Hkv, D], contiguous
    query_start: torch.Tensor,  # [B + 1] int64
    context_lens: torch.Tensor,  # [B] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    block_size: int,
    scale: float,
    sliding_window: int | None,
    new_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """Attention of every query in a ragged batch over its sequence's paged K/V (causal, and
    windowed when ``sliding_window`` is set).

    ``new_kv=(k, v, slot_mapping)`` writes this step's keys and values ([T, Hkv, D]) into their
    slots first; otherwise they must be in the cache already. ``rope=(cos, sin)`` ([T, 1, R] or
    [T, R], R <= D even) rotates the first R dims of the queries and the new keys on the way
    (Hugging Face's rotate_half convention; R < D is partial rotary). ``isa`` picks the kernel
    build (default: the widest this CPU runs).
    """
    isa = isa or machine_isas()[0]
    load(q.shape[-1], isa)  # cached after the first call for this head dim
    k, v, slots = new_kv or (None, None, None)
    cos, sin = rope or (None, None)
    return ops().paged_attention(
        q, k_cache, v_cache, query_start, context_lens, block_tables, block_size, scale,
        sliding_window or 0, k, v, slots, cos, sin, isa,
    )  # fmt: skip


def rms_norm(
    x: torch.Tensor,  # [rows, cols] float32, contiguous
    weight: torch.Tensor,  # [cols]
    eps: float,
    residual: torch.Tensor | None = None,  # [rows, cols]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rms_normalised(h), h)`` with ``h = x + residual`` (or ``x``), in one pass."""
    if residual is None:
        return ops().rms_norm(x, weight, eps), x
    return ops().add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a packed ``[rows, 2 * inter]`` projection, in one pass."""
    return ops().silu_mul(gate_up)


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A float32 ``[out, in]`` linear weight packed once for ``linear``: ``[panels, in, NP]``,
    panels of NP (two vectors of this build) output columns, zero past ``out``."""
    return ops().pack_linear(weight.contiguous())


def linear(
    x: torch.Tensor,  # [rows, in] float32, contiguous
    packed: torch.Tensor,  # from pack_linear
    out_features: int,
    bias: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the weight ``pack_linear`` packed: [rows, out]."""
    return ops().linear(x, packed, out_features, bias)


def pack_linear_gated(
    weight: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 ``[2 * inter, in]`` SwiGLU projection (gate rows, then up rows) and its bias, if
    any, packed once for ``linear_silu_mul``: ``[panels, in, NP]`` panels whose first half holds
    NP / 2 gate columns and the second the up columns of the same outputs; the bias alike as
    ``[panels, NP]`` (an empty tensor when there is none)."""
    b = None if bias is None else bias.contiguous()
    return ops().pack_linear_gated(weight.contiguous(), b)


def linear_silu_mul(
    x: torch.Tensor,  # [rows, in] float32, contiguous
    packed: torch.Tensor,  # from pack_linear_gated
    inter: int,
    packed_bias: torch.Tensor,  # from pack_linear_gated (empty: no bias)
) -> torch.Tensor:
    """``silu(gate) * up`` of ``F.linear(x, weight, bias)`` for the weight ``pack_linear_gated``
    packed, the activation applied as the GEMM writes its output: [rows, inter]."""
    return ops().linear_silu_mul(x, packed, inter, packed_bias)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of a [rows, cols] float32 tensor (first index on ties), a few times faster
    than torch's on the CPU."""
    return ops().argmax(x)
