"""GPU check of the Triton kernels: each against its torch reference on random inputs at realistic
sizes (Llama-3-8B heads: 32 query, 8 KV, head_dim 128; contexts up to 4k; 256 sequences), timed
against torch: scaled_dot_product_attention on the same step as a padded batch, eager torch for
the others. Prints a table; exits 1 if a kernel disagrees with its reference.

    python -m modgen.kernels.gpu_check [--dtype bfloat16] [--no-autotune]

Needs a CUDA device. ``--tiny`` runs toy sizes, on CPU too under TRITON_INTERPRET=1: it checks
this script, not speed. A run takes a minute or two on an H100, most of it autotuning.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import interpreting
from .kv_write import rope_kv_write, rope_kv_write_ref
from .paged_attention import paged_attention
from .paged_attention_ref import paged_attention_ref
from .rms_norm import add_rms_norm, rms_norm_ref
from .swiglu import swiglu, swiglu_ref
from .testing import padded_batch, plan_for, random_batch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # max rel err


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run."""

    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16  # KV-cache block
    seqs: int = 256
    context: int = 4096
    chunks: int = 8  # prompt chunks in the SplitFuse step
    chunk_len: int = 512
    window: int = 1024
    few: int = 4  # sequences in the split-KV case
    hidden: int = 4096
    intermediate: int = 14336


TINY = Sizes(
    heads=4, kv_heads=2, head_dim=16, block_size=4, seqs=6, context=40, chunks=2, chunk_len=9,
    window=8, few=2, hidden=64, intermediate=96,
)  # fmt: skip


@dataclass
class Row:
    """One line of the table."""

    kernel: str
    problem: str
    err: float
    tol: float
    ms: float
    torch_ms: float
    baseline: str

    @property
    def ok(self) -> bool:
        return self.err <= self.tol

    def cells(self) -> list[str]:
        return [
            self.kernel, self.problem, f"{self.err:.1e}", "ok" if self.ok else "FAIL",
            f"{self.ms:.3f}", f"{self.torch_ms:.3f}", f"{self.torch_ms / self.ms:.2f}x",
            self.baseline,
        ]  # fmt: skip


def bench(fn: Callable[[], object]) -> float:
    """Milliseconds per call: CUDA-event timing on a GPU, one wall-clock call on CPU."""
    if torch.cuda.is_available() and not interpreting():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def sdpa_baseline(q, k, v, mask, scale) -> tuple[Callable[[], torch.Tensor], str]:
    """SDPA on the padded batch with a fused kernel (never the math path, which would hold every
    score): grouped-query if a fused kernel takes it with a mask, else KV heads repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    if not q.is_cuda:
        fused.append(SDPBackend.MATH)

    def run(k, v, gqa):
        with sdpa_kernel(fused):
            return F.scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=gqa)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(k, v, True)
        return (lambda: run(k, v, True)), "SDPA, padded (GQA)"
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return (lambda: run(k, v, False)), "SDPA, padded (KV heads repeated)"


def attention_cases(s: Sizes) -> list[tuple[str, list[int], list[int], int | None, int | None]]:
    """(name, query lens, context lens, window, num_splits): decodes, a SplitFuse step (decodes
    plus prompt chunks at random offsets), the same windowed, and a few long decodes with and
    without split-KV."""
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(s.context * 3 // 4, s.context + 1, (s.seqs,), generator=gen).tolist()
    n_dec = s.seqs - s.chunks
    chunk_ctx = torch.randint(s.chunk_len, s.context + 1, (s.chunks,), generator=gen).tolist()
    mixed_q, mixed_ctx = [1] * n_dec + [s.chunk_len] * s.chunks, ctx[:n_dec] + chunk_ctx
    few_q, few_ctx = [1] * s.few, [s.context] * s.few
    return [
        (f"decode, {s.seqs} seqs", [1] * s.seqs, ctx, None, None),
        (f"{n_dec} decodes + {s.chunks} x {s.chunk_len} chunk", mixed_q, mixed_ctx, None, None),
        (f"same, window {s.window}", mixed_q, mixed_ctx, s.window, None),
        (f"decode, {s.few} seqs, split-KV auto", few_q, few_ctx, None, None),
        (f"decode, {s.few} seqs, split-KV off", few_q, few_ctx, None, 1),
    ]


def randn(*shape: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def check_attention(case, s: Sizes, dtype, autotune: bool, device: str) -> Row:
    name, q_lens, ctx_lens, window, splits = case
    batch, num_slots = random_batch(q_lens, ctx_lens, s.block_size, device=device)
    q = randn(batch.num_tokens, s.heads, s.head_dim, dtype=dtype, device=device)
    k_cache, v_cache = (randn(num_slots, s.kv_heads, s.head_dim, dtype=dtype, device=device)
                        for _ in "kv")  # fmt: skip
    plan = plan_for(batch, num_splits=splits)
    scale = s.head_dim**-0.5

    def run() -> torch.Tensor:
        return paged_attention(q, k_cache, v_cache, plan, scale, window, autotune=autotune)

    ref = paged_attention_ref(
        q, k_cache, v_cache, batch.query_start, batch.context_lens, batch.block_tables,
        s.block_size, scale, window,
    )  # fmt: skip
    err = rel_err(run(), ref)
    sdpa, label = sdpa_baseline(*padded_batch(q, k_cache, v_cache, batch, window), scale)
    used = plan.tiles(s.heads // s.kv_heads, s.kv_heads)[3]
    problem = f"T={batch.num_tokens}, kv<={batch.max_context_len}, {used} split(s)"
    return Row(f"attention: {name}", problem, err, TOLERANCE[dtype], bench(run), bench(sdpa), label)


def check_rope_kv_write(s: Sizes, tokens: int, dtype, autotune: bool, device: str) -> Row:
    widths = [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
    qkv = randn(tokens, sum(widths), dtype=dtype, device=device)
    q, k, v = (x.view(tokens, -1, s.head_dim) for x in qkv.split(widths, -1))
    inv_freq = 1.0 / 500000 ** (torch.arange(0, s.head_dim, 2, device=device) / s.head_dim)
    freqs = torch.randint(0, s.context, (tokens, 1), device=device) * inv_freq  # [T, D/2]
    emb = torch.cat((freqs, freqs), -1)[:, None]  # [T, 1, D]
    rope = (emb.cos().to(dtype), emb.sin().to(dtype))
    slots = torch.randperm(4 * tokens, device=device)[:tokens]
    kc, vc, kr, vr = (torch.zeros(4 * tokens, s.kv_heads, s.head_dim, dtype=dtype, device=device)
                      for _ in range(4))  # fmt: skip

    def run() -> torch.Tensor:
        return rope_kv_write(q, k, v, kc, vc, slots, rope, autotune=autotune)

    def base() -> torch.Tensor:
        return rope_kv_write_ref(q, k, v, kr, vr, slots, rope)

    err = max(rel_err(run(), base()), rel_err(kc, kr), rel_err(vc, vr))
    problem = f"T={tokens}, {s.heads}+{s.kv_heads} heads"
    baseline = "torch: rotate + index_copy_"
    return Row("rope + KV write", problem, err, TOLERANCE[dtype], bench(run), bench(base), baseline)


def check_mlp_kernels(s: Sizes, tokens: int, dtype, autotune: bool, device: str) -> list[Row]:
    x, r = (randn(tokens, s.hidden, dtype=dtype, device=device) for _ in "xr")
    w = (1 + 0.1 * torch.randn(s.hidden, device=device)).to(dtype)
    out, h = add_rms_norm(x, r, w, 1e-5, autotune=autotune)
    ref, h_ref = rms_norm_ref(x, w, 1e-5, r)
    norm = Row(
        "add + RMSNorm", f"[{tokens}, {s.hidden}]", max(rel_err(out, ref), rel_err(h, h_ref)),
        TOLERANCE[dtype], bench(lambda: add_rms_norm(x, r, w, 1e-5, autotune=autotune)),
        bench(lambda: rms_norm_ref(x, w, 1e-5, r)), "torch, eager",
    )  # fmt: skip
    gate_up = randn(tokens, 2 * s.intermediate, dtype=dtype, device=device)
    act = Row(
        "SwiGLU", f"[{tokens}, 2 x {s.intermediate}]",
        rel_err(swiglu(gate_up, autotune=autotune), swiglu_ref(gate_up)), TOLERANCE[dtype],
        bench(lambda: swiglu(gate_up, autotune=autotune)), bench(lambda: swiglu_ref(gate_up)),
        "torch, eager",
    )  # fmt: skip
    return [norm, act]


def print_table(rows: list[Row]) -> None:
    head = ["kernel", "problem", "max rel err", "check", "triton ms", "torch ms", "speedup",
            "torch baseline"]  # fmt: skip
    lines = [head, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def pick_device(tiny: bool) -> str:
    """ "cuda", or "cpu" for --tiny under the interpreter; else exit saying why."""
    if torch.cuda.is_available() and not interpreting():
        return "cuda"
    if tiny and interpreting():
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_check needs a CUDA device and torch sees none (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}). Without a GPU, run the interpreter tests: "
            "python -m pytest tests/test_kernels.py"
        )
    raise SystemExit("TRITON_INTERPRET is set: unset it so the kernels compile for the GPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modgen.kernels.gpu_check", description=__doc__)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    parser.add_argument("--no-autotune", dest="autotune", action="store_false")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU: TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    device = pick_device(args.tiny)
    s = TINY if args.tiny else Sizes()
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}: {dtype}, autotune {args.autotune and device == 'cuda'}\n")
    torch.manual_seed(0)
    rows = []
    for case in attention_cases(s):
        rows.append(check_attention(case, s, dtype, args.autotune, device))
        torch.cuda.empty_cache()
    tokens = s.seqs - s.chunks + s.chunks * s.chunk_len  # the SplitFuse step's tokens
    rows.append(check_rope_kv_write(s, tokens, dtype, args.autotune, device))
    rows.extend(check_mlp_kernels(s, tokens, dtype, args.autotune, device))
    print_table(rows)
    failed = [r.kernel for r in rows if not r.ok]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
