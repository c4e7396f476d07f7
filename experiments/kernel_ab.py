"""Interleaved A/B of CPU kernel builds: the attention kernel (or the GEMM) built from a source file
with -D knobs, each variant timed in turn in one process, round after round, medians printed.
On machines whose speed drifts within the hour (docs/notes.md), only variants timed side by side
like this can be compared. Never part of CI.

    python experiments/kernel_ab.py base=kernels/cpu_kernels.cpp \\
        "pf4=kernels/cpu_kernels.cpp:-DMODGEN_PF=4" old=/tmp/old_cpu_kernels.cpp
    python experiments/kernel_ab.py --gemm base= "spread0=:-DMODGEN_PFSPREAD=0"
    python experiments/kernel_ab.py --isa avx2 ...      # another build this CPU runs

A variant is NAME=SOURCE[:FLAGS] (SOURCE empty: kernels/cpu_kernels.cpp; a copy elsewhere finds
its headers in kernels/). The attention shapes are the peers' heads (8 query, 2 KV, 64 dims) on
shuffled blocks of 16; the GEMM shapes the peers' layers at decode and prompt row counts, the
caches flushed before each call. Every variant's outputs are checked against the first's.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from modgen.kernels import cpu
from modgen.kernels.testing import random_batch

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
BUILD = Path("/tmp/modgen-kernel-ab")
P = ctypes.c_void_p


def build(name: str, spec: str, isa: str) -> ctypes.CDLL:
    """The variant NAME=SOURCE[:FLAGS] built for ``isa``."""
    source, _, flags = spec.partition(":")
    src = Path(source) if source else KERNELS / "cpu_kernels.cpp"
    cflags = [*cpu.FLAGS, *cpu.ISA_FLAGS[isa], "-DHEAD_DIM=64", f"-I{KERNELS}", *flags.split()]
    lib_path = BUILD / f"{name}_{isa}.so"
    cpu._build(src, cpu.compiler(), cflags, cpu._link_openmp(), lib_path)
    return ctypes.CDLL(str(lib_path))


def attention_cases(isa: str) -> dict[str, Callable[[], torch.Tensor]]:
    """One layer's attention call on a few step shapes."""

    def case(q_lens: list[int], ctx_lens: list[int], shared: bool = False, runs: bool = False):
        b, slots = random_batch(q_lens, ctx_lens, 16, seed=0)
        tables = b.block_tables[:1].expand_as(b.block_tables).contiguous() if shared else None
        if runs:  # each sequence's blocks in one run, as the blocked allocator hands them out
            n = (b.context_lens + 15) // 16  # blocks of each sequence
            first = torch.cumsum(n, 0) - n
            col = torch.arange(b.block_tables.shape[1])
            tables = torch.where(col < n[:, None], first[:, None] + col, 0)
        gen = torch.Generator().manual_seed(0)
        kc, vc = (torch.randn(slots, 2, 64, generator=gen) for _ in "kv")
        q = torch.randn(b.num_tokens, 8, 64, generator=gen)
        t = b.block_tables if tables is None else tables
        args = (q, kc, vc, b.query_start, b.context_lens, t, 16, 0.125, None)
        return lambda: cpu.paged_attention(*args, isa=isa)

    return {
        "256 dec @1024": case([1] * 256, [1024] * 256),  # keys from memory, blocks shuffled
        "256 dec @1024 run": case([1] * 256, [1024] * 256, runs=True),  # in runs
        "64 dec @256": case([1] * 64, [256] * 64),
        "256 dec @512 hot": case([1] * 256, [512] * 256, shared=True),  # one table: in cache
        "prompt 512": case([512], [512]),
        "chunk 512 @1536": case([512], [1536]),
        "32 dec + 480": case([1] * 32 + [480], [1024] * 32 + [960]),
        # the short steps of a step-time limit: a few decodes and a small chunk
        "3 dec + 48 @548": case([1] * 3 + [48], [1000] * 3 + [548], runs=True),
        "16 dec + 48 @1048": case([1] * 16 + [48], [1000] * 16 + [1048], runs=True),
        "chunk 48 @548": case([48], [548], runs=True),
    }


JUNK = torch.zeros(16 << 20)


def flush_caches() -> None:
    """Touch 64 MB: the next call finds its weights and inputs out of cache, as in a model."""
    JUNK.add_(1.0)


def gemm_cases(lib: ctypes.CDLL) -> dict[str, Callable[[], torch.Tensor]]:
    """y = x @ W^T through ``lib``'s packed GEMM (caches flushed before each timed call)."""
    cases = {}
    for m, k, n in [(512, 512, 768), (512, 1536, 512), (64, 512, 3072), (16, 512, 3072),
                    (16, 512, 32000)]:  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        width = lib.modgen_linear_panel_width()
        packed = torch.empty(-(-n // width) * width * k)
        lib.modgen_pack_linear_f32(P(w.data_ptr()), n, k, P(packed.data_ptr()))

        def call(x=x, packed=packed, m=m, k=k, n=n):
            y = torch.empty(m, n)
            lib.modgen_linear_f32(P(x.data_ptr()), ctypes.c_int64(m), ctypes.c_int64(k),
                                  P(packed.data_ptr()), ctypes.c_int64(n), None,
                                  P(y.data_ptr()))  # fmt: skip
            return y

        cases[f"{m}x{k}x{n}"] = call
    return cases


def main() -> None:
    """Parse the variants, time them interleaved, print medians (ms)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=SOURCE[:FLAGS]")
    parser.add_argument("--gemm", action="store_true", help="the GEMM instead of attention")
    parser.add_argument("--isa", default=None, help="build (default: the widest this CPU runs)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls a round (the best counts)")
    args = parser.parse_args()
    isa = args.isa or cpu.machine_isas()[0]
    cpu.load(64, isa)  # the operators and the default build, registered
    libs = {name: build(name, spec, isa) for name, spec in (v.split("=", 1) for v in args.variants)}
    if args.gemm:
        cases = {v: gemm_cases(lib) for v, lib in libs.items()}
    else:
        shared = attention_cases(isa)
        cases = {v: shared for v in libs}
    first: dict[str, torch.Tensor] = {}
    times: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for v, lib in libs.items():
            if not args.gemm:  # the attention operator calls the build registered last
                address = ctypes.cast(lib.modgen_attention_f32, ctypes.c_void_p).value
                cpu.ops().register_attention(isa, 64, address)
            for c, fn in cases[v].items():
                out = fn()
                if rnd == 0:
                    ref = first.setdefault(c, out)
                    err = (out - ref).abs().max().item()
                    assert err < 1e-3 * max(1.0, ref.abs().max().item()), (v, c, err)
                best = float("inf")
                for _ in range(args.calls):
                    if args.gemm:
                        flush_caches()
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
                times.setdefault((v, c), []).append(best)
    names = list(next(iter(cases.values())))
    print(f"{cpu.machine_isas()[0]} CPU, {isa} build, medians of {args.rounds} rounds (ms)")
    print(f"{'variant':12s}" + "".join(f"{c:>18s}" for c in names))
    for v in libs:
        row = (statistics.median(times[v, c]) * 1e3 for c in names)
        print(f"{v:12s}" + "".join(f"{t:18.3f}" for t in row))


if __name__ == "__main__":
    main()
