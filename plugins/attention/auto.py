"""``attention=auto`` (the default): the backend that is fastest for this model on this machine."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from modgen import calibration, registry
from modgen.attention import AttentionBackend, AttentionConfig, AttentionSpec
from modgen.engine.batch import RaggedBatch, ragged_batch

log = logging.getLogger(__name__)

PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
"""Backends tried, by device type; any other device gets ``torch``. ``torch`` is the baseline
a candidate must beat."""
BASELINE = "torch"
PROMPT_CHUNK, PROMPT_START = 512, 512  # a prompt chunk of 512 tokens after 512 cached ones
DECODES, DECODE_CONTEXT = 32, 512  # 32 decodes at context 512
BLOCK_SIZE = 16


@registry.register("attention", "auto")
class AutoAttention(AttentionBackend):
    """Measures every backend (and backend variant, such as the C++ kernel's build per
    instruction set) whose ``check`` accepts the model on two representative batches (a
    prompt chunk and a batch of decodes) and delegates to the fastest; plain torch is kept
    unless another is faster by 3%. Decisions are cached per machine, model shape and code
    version (``modgen.calibration``); the figures and the reasons for passing over the others
    are logged."""

    @dataclass(kw_only=True)
    class Config(AttentionConfig):
        """``auto`` has no settings; pick a backend by name to configure it."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        self.chosen: AttentionBackend | None = None
        self.chosen_label: str | None = None
        self.calibration: calibration.Choice | None = None

    @property
    def fuses_rope(self) -> bool:  # type: ignore[override]
        return self._backend().fuses_rope

    def _backend(self) -> AttentionBackend:
        if self.chosen is None:
            raise RuntimeError("attention=auto chooses its backend in check(); call it first")
        return self.chosen

    def check(self, spec: AttentionSpec) -> None:
        candidates, passed_over = eligible(spec)
        if not candidates:
            raise ValueError(
                "attention=auto found no backend for this model: " + "; ".join(passed_over)
            )
        label = next(iter(candidates))
        if len(candidates) > 1:
            shape = {
                "device": spec.device.type, "dtype": str(spec.dtype).removeprefix("torch."),
                "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim, "window": spec.sliding_window,
            }  # fmt: skip
            runs = representative_calls(spec, candidates)
            version = " ".join(f"{n}:{b.version()}" for n, b in candidates.items())
            self.calibration = calibration.choose("attention", shape, runs, BASELINE, version)
            label = self.calibration.name
        self.chosen, self.chosen_label = candidates[label], label
        log.info("attention=auto chose %s%s", label, "".join(f"; not {r}" for r in passed_over))

    def prepare(self, batch: RaggedBatch) -> Any:
        return self._backend().prepare(batch)

    def forward(self, q, k, v, kv_cache, batch, meta, scale, sliding_window, rope=None):
        return self._backend().forward(q, k, v, kv_cache, batch, meta, scale, sliding_window, rope)

    def write_kv(self, k, v, kv_cache, batch, rope=None):
        self._backend().write_kv(k, v, kv_cache, batch, rope)


def eligible(spec: AttentionSpec) -> tuple[dict[str, AttentionBackend], list[str]]:
    """The backends (labelled ``name`` or ``name/setting``) that can serve ``spec``, and why the
    others cannot."""
    candidates: dict[str, AttentionBackend] = {}
    passed_over: list[str] = []
    for name in PREFERENCE.get(spec.device.type, (BASELINE,)):
        for overrides in registry.get("attention", name).variants(spec):
            label = "/".join([name, *map(str, overrides.values())])
            backend = registry.build("attention", {"name": name, **overrides})
            try:
                backend.check(spec)
            except ValueError as err:
                passed_over.append(f"{label}: {err}")
                continue
            candidates[label] = backend
    return candidates, passed_over


def representative_calls(
    spec: AttentionSpec, backends: dict[str, AttentionBackend]
) -> dict[str, Callable[[], None]]:
    """One callable per backend that runs a layer's attention over a prompt chunk and over a
    batch of decodes, on random tensors of the model's shape."""
    dev, dtype, d = spec.device, spec.dtype, spec.head_dim
    gen = torch.Generator().manual_seed(0)
    batches = [_batch([PROMPT_START], [PROMPT_CHUNK], dev), _batch(
        [DECODE_CONTEXT - 1] * DECODES, [1] * DECODES, dev
    )]  # fmt: skip
    slots = sum(int(b.block_tables.numel()) for b in batches) * BLOCK_SIZE
    cache = [torch.randn(slots, spec.num_kv_heads, d, generator=gen).to(dev, dtype)
             for _ in range(2)]  # fmt: skip
    inputs = []
    for b in batches:
        t = b.num_tokens
        q = torch.randn(t, spec.num_heads, d, generator=gen).to(dev, dtype)
        k, v = (torch.randn(t, spec.num_kv_heads, d, generator=gen).to(dev, dtype) for _ in "kv")
        angle = (b.positions[:, None].float().cpu() * 1e-2).repeat(1, d).to(dev)
        inputs.append(
            (b, q, k, v, (angle.cos()[:, None].to(dtype), angle.sin()[:, None].to(dtype)))
        )

    def run(backend: AttentionBackend) -> Callable[[], None]:
        def call() -> None:
            for b, q, k, v, rope in inputs:
                meta = backend.prepare(b)
                extra = {"rope": rope} if backend.fuses_rope else {}
                backend.forward(q, k, v, cache, b, meta, d**-0.5, spec.sliding_window, **extra)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        return call

    return {label: run(backend) for label, backend in backends.items()}


def _batch(starts: list[int], lens: list[int], device: torch.device) -> RaggedBatch:
    """Chunks at ``starts`` of ``lens`` tokens, each sequence in its own consecutive blocks."""
    per_seq = [-(-(s + n) // BLOCK_SIZE) for s, n in zip(starts, lens, strict=True)]
    width = max(per_seq)
    tables = torch.arange(len(starts) * width, dtype=torch.int64).view(len(starts), width)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    return ragged_batch(
        input_ids=torch.zeros(int(lens_t.sum()), dtype=torch.int64, device=device),
        starts=torch.tensor(starts, dtype=torch.int64, device=device),
        lens=lens_t.to(device),
        block_tables=tables.to(device),
        completes=torch.ones(len(starts), dtype=torch.bool, device=device),
        block_size=BLOCK_SIZE,
    )
