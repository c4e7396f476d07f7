"""``attention=auto`` (the default): the fastest backend that can serve the model here."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from modgen import registry
from modgen.attention import AttentionBackend, AttentionConfig, AttentionSpec
from modgen.batch import RaggedBatch

log = logging.getLogger(__name__)

PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
"""Backends tried in order, by device type; any other device gets ``torch``."""


@registry.register("attention", "auto")
class AutoAttention(AttentionBackend):
    """Delegates to the first backend in ``PREFERENCE`` whose ``check`` accepts the model: the
    C++ kernel for float32 on the CPU, Triton on CUDA, the torch reference otherwise (bfloat16 on
    the CPU, no C++ compiler, no Triton). The choice and the reasons for passing over the others
    are logged."""

    @dataclass(kw_only=True)
    class Config(AttentionConfig):
        """``auto`` has no settings; pick a backend by name to configure it."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        self.chosen: AttentionBackend | None = None

    @property
    def fuses_rope(self) -> bool:  # type: ignore[override]
        return self._backend().fuses_rope

    def _backend(self) -> AttentionBackend:
        if self.chosen is None:
            raise RuntimeError("attention=auto chooses its backend in check(); call it first")
        return self.chosen

    def check(self, spec: AttentionSpec) -> None:
        passed_over = []
        for name in PREFERENCE.get(spec.device.type, ("torch",)):
            backend = registry.build("attention", {"name": name})
            try:
                backend.check(spec)
            except ValueError as err:
                passed_over.append(f"{name}: {err}")
                continue
            self.chosen = backend
            log.info("attention=auto chose %s%s", name, "".join(f"; not {r}" for r in passed_over))
            return
        raise ValueError(
            "attention=auto found no backend for this model: " + "; ".join(passed_over)
        )

    def prepare(self, batch: RaggedBatch) -> Any:
        return self._backend().prepare(batch)

    def forward(self, q, k, v, kv_cache, batch, meta, scale, sliding_window, rope=None):
        return self._backend().forward(q, k, v, kv_cache, batch, meta, scale, sliding_window, rope)
