"""The CPU kernels (``cpu_kernels.cpp``: paged attention, fused RMSNorm and SwiGLU): built with
the machine's C++ compiler on first use, cached, and called through ctypes.

The build takes about half a second and needs no torch headers: the kernel takes raw pointers.
It is compiled for the head dim it will serve (``-DHEAD_DIM``) and for the building machine
(``-march=native``); the cache key holds both, the source's hash and the compiler, so a change to
any of them builds afresh. ``MODGEN_CACHE_DIR`` moves the cache (default
``~/.cache/modgen/kernels``); ``CXX`` picks the compiler (default ``g++``).
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

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
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


class _Call(ctypes.Structure):
    """Mirror of ``ModgenAttentionCall`` in cpu_kernels.cpp."""

    _fields_ = [
        *[(n, ctypes.c_void_p) for n in ("q", "k", "v", "cos", "sin", "slot_mapping")],
        *[(n, ctypes.c_void_p) for n in ("k_cache", "v_cache", "out")],
        *[(n, ctypes.c_void_p) for n in ("query_start", "context_lens", "block_tables")],
        *[(n, ctypes.c_int64) for n in ("q_stride", "k_stride", "v_stride", "num_tokens")],
        *[(n, ctypes.c_int64) for n in ("num_seqs", "max_blocks", "hq", "hkv")],
        *[(n, ctypes.c_int64) for n in ("block_size", "window", "rot_dim")],
        ("scale", ctypes.c_float),
    ]


def _build(cxx: str, flags: list[str], link: list[str], lib_path: Path) -> None:
    """Compile, then link against torch's OpenMP runtime (one runtime, one thread pool)."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        obj, tmp_lib = Path(tmp) / "kernels.o", Path(tmp) / lib_path.name
        for cmd in (
            [cxx, *flags, "-c", str(SOURCE), "-o", str(obj)],
            [cxx, "-shared", str(obj), *link, "-o", str(tmp_lib)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelBuildError(
                    f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr}"
                )
        os.replace(tmp_lib, lib_path)  # atomic: concurrent builders never see half a file


@cache
def source_hash() -> str:
    """A short hash of the kernel source (names the code a calibration measured)."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


@cache
def load(head_dim: int = 64, isa: str | None = None) -> ctypes.CDLL:
    """The kernel library for ``head_dim`` and instruction set ``isa`` (default: the widest this
    CPU runs), built if it is not cached yet. The element-wise kernels work whatever head dim the
    library was built for."""
    isas = machine_isas()
    isa = isa or isas[0]
    if isa not in isas:
        raise KernelBuildError(f"this CPU runs the kernels' {isas} builds, not {isa!r}")
    cxx = compiler()
    flags = [*FLAGS, *ISA_FLAGS[isa], f"-DHEAD_DIM={head_dim}"]
    omp = openmp_runtime()
    link = [str(omp), f"-Wl,-rpath,{omp.parent}"] if omp else ["-fopenmp"]
    key = hashlib.sha256(
        SOURCE.read_bytes()
        + " ".join([cxx, *flags, *link, platform.machine(), platform.node()]).encode()
    ).hexdigest()[:16]
    lib_path = cache_dir() / f"cpu_kernels_d{head_dim}_{isa}_{key}.so"
    if not lib_path.exists():
        _build(cxx, flags, link, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.modgen_isa.restype = ctypes.c_char_p
    built = lib.modgen_isa().decode()
    if built != isa:
        raise KernelBuildError(f"asked {cxx} for {isa} code ({' '.join(flags)}), got {built}")
    lib.modgen_attention_f32.restype = ctypes.c_int
    lib.modgen_attention_f32.argtypes = [ctypes.POINTER(_Call)]
    lib.modgen_rms_norm_f32.restype = None
    lib.modgen_rms_norm_f32.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    )
    lib.modgen_argmax_f32.restype = None
    lib.modgen_argmax_f32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.modgen_silu_mul_f32.restype = None
    lib.modgen_silu_mul_f32.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    return lib


def _rows(name: str, t: torch.Tensor, heads: int, head_dim: int) -> int:
    """Row stride of a [T, heads, head_dim] float32 CPU tensor whose heads are packed."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU tensor, not {t.dtype} on {t.device}")
    if t.dim() != 3 or t.shape[1:] != (heads, head_dim) or t.stride()[1:] != (head_dim, 1):
        raise ValueError(
            f"{name} must be [T, {heads}, {head_dim}] with packed heads; got shape "
            f"{tuple(t.shape)}, strides {t.stride()}"
        )
    return t.stride(0)


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
    num_tokens, hq, d = q.shape
    hkv = k_cache.shape[1]
    call = _Call(q=q.data_ptr(), q_stride=_rows("q", q, hq, d), num_tokens=num_tokens)
    for name, t in [("k_cache", k_cache), ("v_cache", v_cache)]:
        _rows(name, t, hkv, d)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    index = [query_start, context_lens, block_tables]
    if any(t.dtype != torch.int64 or not t.is_contiguous() for t in index):
        raise ValueError("query_start, context_lens and block_tables must be contiguous int64")
    if new_kv is not None:
        k, v, slots = new_kv
        call.k, call.k_stride = k.data_ptr(), _rows("k", k, hkv, d)
        call.v, call.v_stride = v.data_ptr(), _rows("v", v, hkv, d)
        if slots.dtype != torch.int64 or not slots.is_contiguous() or len(slots) != num_tokens:
            raise ValueError(f"slot_mapping must be {num_tokens} contiguous int64")
        call.slot_mapping = slots.data_ptr()
    if rope is not None:
        rot = rope[0].shape[-1]
        cos, sin = (x.reshape(num_tokens, rot) for x in rope)
        if not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32):
            raise ValueError("rope tables must be contiguous float32 [T, R]")
        if rot > d or rot % 2:
            raise ValueError(f"rope tables rotate {rot} dims: an even number up to {d} is needed")
        call.cos, call.sin, call.rot_dim = cos.data_ptr(), sin.data_ptr(), rot
    out = torch.empty((num_tokens, hq, d), dtype=q.dtype)
    call.k_cache, call.v_cache, call.out = k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr()
    call.query_start, call.context_lens = query_start.data_ptr(), context_lens.data_ptr()
    call.block_tables = block_tables.data_ptr()
    call.num_seqs, call.max_blocks = context_lens.shape[0], block_tables.shape[1]
    call.hq, call.hkv, call.block_size = hq, hkv, block_size
    call.window, call.scale = sliding_window or 0, scale
    if load(d, isa).modgen_attention_f32(ctypes.byref(call)) != 0:
        raise ValueError(f"{hq} query heads over {hkv} KV heads: groups over 64 are not supported")
    return out


def _plain(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor")


def rms_norm(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [rows, cols]
    weight: torch.Tensor,  # [cols]
    eps: float,
    residual: torch.Tensor | None = None,  # [rows, cols]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rms_normalised(h), h)`` with ``h = x + residual`` (or ``x``), in one pass."""
    for name, t in [("x", x), ("weight", weight)] + (
        [] if residual is None else [("residual", residual)]
    ):
        _plain(name, t)
    out = torch.empty_like(x)
    h = x if residual is None else torch.empty_like(x)
    lib.modgen_rms_norm_f32(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        None if residual is None else h.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        x.shape[1],
        eps,
    )
    return out, h


def silu_mul(lib: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a packed ``[rows, 2 * inter]`` projection, in one pass."""
    _plain("gate_up", gate_up)
    rows, width = gate_up.shape
    out = torch.empty((rows, width // 2), dtype=gate_up.dtype)
    lib.modgen_silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
    return out


def argmax(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of a [rows, cols] float32 tensor (first index on ties), a few times faster
    than torch's on the CPU."""
    _plain("x", x)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.modgen_argmax_f32(x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1])
    return out
