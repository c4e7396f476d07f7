"""An external scheduler plugin: runs one request at a time, whole prompt then decodes.

Installing this package is all it takes: modgen finds it through the ``modgen.plugins``
entry-point group, and ``+scheduler=fifo_one`` selects it.
"""

from __future__ import annotations

from dataclasses import dataclass

from modgen import register
from modgen.engine.scheduling import Scheduler, SchedulerConfig, StepPlan


@register("scheduler", "fifo_one")
class FifoOneScheduler(Scheduler):
    """One sequence at a time, in arrival order, its prompt in chunks of ``chunk``."""

    @dataclass(kw_only=True)
    class Config(SchedulerConfig):
        """fifo_one settings."""

        chunk: int = 8
        """Prompt tokens per step."""

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        if not self.running and self.waiting:
            seq = self.waiting[0]
            if not self.admit(seq, seq.num_tokens):
                return plan
        if self.running:
            seq = self.running[0]
            if seq.is_decode:
                self.reserve_or_preempt(seq, seq.num_tokens, plan)
                plan.add(seq, 1)
            else:
                plan.add(seq, min(seq.num_pending, self.config.chunk))
        return plan
