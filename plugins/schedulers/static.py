"""``scheduler=static``: fixed batches run to completion, like plain ``generate`` batching."""

from __future__ import annotations

from dataclasses import dataclass

from modgen.engine.sequence import Sequence
from modgen.plugins.schedulers.continuous import ContinuousScheduler
from modgen.registry import register


@register("scheduler", "static")
class StaticScheduler(ContinuousScheduler):
    """Admits a batch of up to ``max_num_seqs`` requests only when nothing runs, reserving KV for
    each request's full length, and runs the batch until its last request finishes."""

    @dataclass(kw_only=True)
    class Config(ContinuousScheduler.Config):
        """Static batching settings."""

        max_num_seqs: int = 8
        """Requests per batch."""

    def can_admit_now(self) -> bool:
        return not self.running

    def slots_to_reserve(self, seq: Sequence) -> int:
        return seq.max_total_tokens
