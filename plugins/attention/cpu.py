"""``attention=cpu``: a C++ paged-attention kernel for the CPU (float32), built on first use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from modgen.attention import AttentionBackend, AttentionConfig, AttentionSpec
from modgen.engine.batch import RaggedBatch
from modgen.kernels import cpu
from modgen.registry import register


@register("attention", "cpu")
class CpuAttention(AttentionBackend):
    """One kernel call per layer rotates q and k (RoPE), writes the new K/V into their slots,
    then attends every query of the step to its sequence's keys and values, read through the
    block table with no gathered copy and no mask tensor. Each tile of queries walks only the
    keys it can see (causal, sliding window) with an online softmax; prompt tiles vectorise over
    query rows, decode tiles over the head dim, and tiles run in parallel on torch's OpenMP
    threads. See ``modgen/kernels/cpu_kernels.cpp``."""

    @dataclass(kw_only=True)
    class Config(AttentionConfig):
        """CPU kernel settings."""

        isa: str = "auto"
        """Instruction set of the kernel build: auto (the widest this CPU runs), avx512, avx2,
        sse, neon or generic; each has its own vector width and register blocking."""

        def __post_init__(self) -> None:
            if self.isa != "auto" and self.isa not in cpu.ISA_FLAGS:
                raise ValueError(
                    f"attention.isa must be auto or one of {list(cpu.ISA_FLAGS)}, got {self.isa!r}"
                )

    config: Config
    fuses_rope = True

    @property
    def isa(self) -> str | None:
        """The kernel build in use (None: the widest this CPU runs)."""
        return None if self.config.isa == "auto" else self.config.isa

    def check(self, spec: AttentionSpec) -> None:
        if spec.device.type != "cpu":
            raise ValueError(
                f"attention=cpu runs on the CPU, not on device {spec.device.type!r}: use "
                "attention=triton or attention=torch"
            )
        if spec.dtype != torch.float32:
            raise ValueError(
                f"attention=cpu computes in float32; the model's dtype is {spec.dtype}: use "
                "attention=torch, or model.dtype=float32"
            )
        if spec.num_heads % spec.num_kv_heads or spec.num_heads // spec.num_kv_heads > 64:
            raise ValueError(
                f"attention=cpu cannot group {spec.num_heads} query heads over "
                f"{spec.num_kv_heads} KV heads (groups of at most 64)"
            )
        if spec.rotary_dim is not None and (spec.rotary_dim % 2 or spec.rotary_dim > spec.head_dim):
            raise ValueError(
                f"attention=cpu rotates an even number of dims up to head_dim {spec.head_dim}, "
                f"not rotary_dim {spec.rotary_dim}"
            )
        if self.isa is not None and self.isa not in cpu.machine_isas():
            raise ValueError(
                f"attention.isa={self.isa} does not run on this CPU; it runs {cpu.machine_isas()}"
            )
        try:
            cpu.load(spec.head_dim, self.isa)  # build now: a missing compiler shows before serving
        except cpu.KernelBuildError as err:
            raise ValueError(str(err)) from err

    @classmethod
    def variants(cls, spec: AttentionSpec) -> list[dict[str, Any]]:
        """The builds for the two widest instruction sets this CPU runs (on an AVX-512 machine,
        the AVX2 build can be as fast: some cores split 512-bit operations in two)."""
        return [{"isa": isa} for isa in cpu.machine_isas()[:2]]

    def version(self) -> str:
        return cpu.source_hash()

    def prepare(self, batch: RaggedBatch) -> None:
        return None

    def forward(self, q, k, v, kv_cache, batch, meta, scale, sliding_window, rope=None):
        k_cache, v_cache = kv_cache
        return cpu.paged_attention(
            q,
            k_cache,
            v_cache,
            batch.query_start,
            batch.context_lens,
            batch.block_tables,
            batch.block_size,
            scale,
            sliding_window,
            new_kv=(k, v, batch.slot_mapping),
            rope=rope,
            isa=self.isa,
        )

    def write_kv(self, k, v, kv_cache, batch, rope=None):
        """The kernel's own KV write (its RoPE, bit for bit what ``forward`` writes), with no
        query to attend: ``k`` stands in for the queries' shape."""
        k_cache, v_cache = kv_cache
        none = batch.query_start[:1]
        cpu.paged_attention(
            k, k_cache, v_cache, none, batch.context_lens[:0], batch.block_tables[:0],
            batch.block_size, 1.0, None, new_kv=(k, v, batch.slot_mapping), rope=rope,
            isa=self.isa,
        )  # fmt: skip
