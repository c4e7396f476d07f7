"""``attention=triton``: modgen's Triton kernels (``modgen.kernels``). Rotary embedding is fused
into the KV write, then one ragged paged-attention launch serves every prompt chunk and decode of
the step. Compiles on CUDA GPUs; on CPU it runs only under Triton's interpreter
(``TRITON_INTERPRET=1``), for tests. Triton is imported on first use, never at import of this
module."""

from __future__ import annotations

import functools
import importlib.util
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from modgen.attention import AttentionBackend, AttentionConfig, AttentionSpec
from modgen.engine.batch import RaggedBatch
from modgen.kernels import interpreting, is_interpreted
from modgen.registry import register

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
"""Largest head dim (padded to a power of two in registers; any size up to this)."""
_ATTENTION_MODULE = "modgen.kernels.paged_attention"


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernel modules, imported on first use (importing them imports Triton)."""
    from modgen.kernels import kv_write, launch, paged_attention

    return SimpleNamespace(attention=paged_attention, kv_write=kv_write, launch=launch)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def unsupported_reason(spec: AttentionSpec) -> str | None:
    """Why the Triton kernels cannot serve ``spec``, or None if they can."""
    device = torch.device(spec.device)
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'modgen[triton]')"
    if device.type == "cpu" and not interpreting():
        return (
            "its kernels need a CUDA GPU; on CPU they run only under Triton's interpreter, for "
            "tests (set TRITON_INTERPRET=1 before modgen.kernels is imported)"
        )
    kernels = sys.modules.get(_ATTENTION_MODULE)
    if device.type == "cpu" and kernels and not is_interpreted(kernels._attn_kernel):
        return "the kernels were created before TRITON_INTERPRET=1 was set, so they need a GPU"
    if device.type not in ("cpu", "cuda"):
        return f"device '{device}' is not supported (CUDA GPUs, or CPU under TRITON_INTERPRET=1)"
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype} is not supported; supported: {', '.join(map(str, DTYPES))}"
    if spec.dtype == torch.bfloat16 and (device.type == "cpu" or interpreting()):
        return "bfloat16 does not run under Triton's interpreter (its tl.dot is wrong on bf16)"
    if spec.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support; use float16 or float32"
    if spec.head_dim > MAX_HEAD_DIM:
        return f"head_dim {spec.head_dim} is not supported: at most {MAX_HEAD_DIM}"
    if spec.rotary_dim is not None and (spec.rotary_dim % 2 or spec.rotary_dim > spec.head_dim):
        return f"rotary_dim {spec.rotary_dim} is not an even number up to head_dim"
    if spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads do not group evenly over {spec.num_kv_heads}"
    return None


@register("attention", "triton")
class TritonAttention(AttentionBackend):
    """Fused rotary + KV write, then ragged paged attention (GQA, causal, sliding window, split-KV
    for long contexts with few sequences), all from ``modgen.kernels``. Any head dim up to 256
    (a power of two or not: padded lanes are masked), partial rotary, and a window per call (so
    per layer)."""

    fuses_rope = True

    @dataclass(kw_only=True)
    class Config(AttentionConfig):
        """Launch settings of the Triton kernels."""

        block_m: int = 64
        """Most query rows per attention program (tokens x the query heads of one KV head);
        steps of short chunks and decodes use fewer."""
        autotune: bool = True
        """On CUDA, pick tiles, warps and stages with triton.autotune (Hopper-class configs);
        False uses the fixed values below, as the interpreter always does."""
        block_n: int = 32
        """KV positions per attention loop step, when not autotuning."""
        num_warps: int = 4
        """Warps per attention program, when not autotuning."""
        num_stages: int = 2
        """Software-pipeline stages of the attention loop, when not autotuning."""
        num_splits: int | None = None
        """Split-KV (flash-decoding) pieces per context; None chooses by SM occupancy on CUDA
        (1 elsewhere); 1 turns splitting off."""
        max_splits: int = 16
        """Most pieces an automatic split cuts a context into."""
        min_split_len: int = 256
        """Fewest KV positions per piece of an automatic split."""

        def __post_init__(self) -> None:
            for name in ("block_m", "block_n"):
                value = getattr(self, name)
                if value < 16 or not _pow2(value):
                    raise ValueError(f"attention.{name} must be a power of two >= 16, got {value}")
            if not _pow2(self.num_warps) or self.num_warps > 32:
                raise ValueError(
                    f"attention.num_warps must be a power of two <= 32, got {self.num_warps}"
                )
            for name in ("num_stages", "max_splits", "min_split_len"):
                if getattr(self, name) < 1:
                    raise ValueError(f"attention.{name} must be >= 1, got {getattr(self, name)}")
            if self.num_splits is not None and self.num_splits < 1:
                raise ValueError(f"attention.num_splits must be >= 1, got {self.num_splits}")

    def check(self, spec: AttentionSpec) -> None:
        reason = unsupported_reason(spec)
        if reason is not None:
            raise ValueError(f"attention=triton cannot run this model: {reason}")

    @functools.cached_property
    def _attn_cfg(self) -> Any:
        """The fixed attention launch config (used when not autotuning)."""
        c = self.config
        return _kernels().launch.config(
            BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages
        )

    def prepare(self, batch: RaggedBatch) -> Any:
        c = self.config
        return _kernels().attention.AttentionPlan(
            query_start=batch.query_start,
            context_lens=batch.context_lens,
            block_tables=batch.block_tables,
            block_size=batch.block_size,
            max_query_len=batch.max_query_len,
            max_context_len=batch.max_context_len,
            block_m=c.block_m,
            num_splits=c.num_splits,
            max_splits=c.max_splits,
            min_split_len=c.min_split_len,
        )

    def forward(self, q, k, v, kv_cache, batch, meta, scale, sliding_window, rope=None):
        kernels, tune = _kernels(), self.config.autotune
        k_cache, v_cache = kv_cache
        q = kernels.kv_write.rope_kv_write(
            q, k, v, k_cache, v_cache, batch.slot_mapping, rope, autotune=tune
        )  # [T, Hq, D] rotated
        return kernels.attention.paged_attention(
            q, k_cache, v_cache, meta, scale, sliding_window, self._attn_cfg, autotune=tune
        )
