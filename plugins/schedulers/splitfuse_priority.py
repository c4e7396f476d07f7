"""``scheduler=splitfuse_priority``: Dynamic SplitFuse that serves requests by priority. An
example variant, written against the public scheduler API only."""

from __future__ import annotations

from collections.abc import Iterable

from modgen.engine.sequence import Sequence
from modgen.plugins.schedulers.splitfuse import SplitFuseScheduler
from modgen.registry import register


def rank(seq: Sequence) -> tuple[int, float, int]:
    """Priority (lower first, as vLLM's), then arrival."""
    return seq.priority, seq.arrival_time, seq.seq_id


@register("scheduler", "splitfuse_priority")
class PrioritySplitFuseScheduler(SplitFuseScheduler):
    """SplitFuse by request ``priority`` (lower first; ties by arrival): waiting prompts are
    admitted, and admitted prompts get their chunks, in priority order, and a preemption takes
    a running sequence of the lowest priority. Decodes still rotate fairly whatever their
    priority, so none starves, and the budget is filled as SplitFuse fills it."""

    def admission_order(self) -> Iterable[Sequence]:
        return sorted(self.waiting, key=rank)

    def continuing_order(self) -> Iterable[Sequence]:
        return sorted(self.running, key=rank)

    def pick_victim(self, seq: Sequence) -> Sequence:
        candidates = self.running[1:] or self.running
        lowest = max(s.priority for s in candidates)
        return self.choose_victim([s for s in candidates if s.priority == lowest])
