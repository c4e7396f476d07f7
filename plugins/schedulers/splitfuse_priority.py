"""``scheduler=splitfuse_priority``: Dynamic SplitFuse that serves requests by priority. An
example variant, written against the public scheduler API only."""

from __future__ import annotations

from collections.abc import Iterable

from modgen.engine.scheduling import StepPlan
from modgen.engine.sequence import Sequence
from modgen.plugins.schedulers.splitfuse import SplitFuseScheduler
from modgen.registry import register


def rank(seq: Sequence) -> tuple[int, float, int]:
    """Priority (lower first, as vLLM's), then arrival."""
    return seq.priority, seq.arrival_time, seq.seq_id


@register("scheduler", "splitfuse_priority")
class PrioritySplitFuseScheduler(SplitFuseScheduler):
    """SplitFuse by request ``priority`` (lower first; ties by arrival). After the decodes,
    prompt chunks go in priority order whether their prompt is admitted or waiting: an admitted
    prompt's remainder goes first only if it outranks every waiting prompt, so a short
    high-priority request does not wait behind a long low-priority prompt being split. A
    preemption takes a running sequence of the lowest priority. Decodes still rotate fairly
    whatever their priority, so none starves, and the budget is filled as SplitFuse fills
    it."""

    def schedule(self) -> StepPlan:
        plan = StepPlan(budget=self.token_budget)
        self.schedule_decodes(plan)
        best_waiting = min(map(rank, self.waiting), default=None)
        prompts = list(self.continuing_order())
        ahead = [s for s in prompts if best_waiting is None or rank(s) < best_waiting]
        self.schedule_continuing(plan, ahead)
        self.schedule_admissions(plan)
        first = {id(s) for s in ahead}
        self.schedule_continuing(plan, [s for s in prompts if id(s) not in first])
        return plan

    def admission_order(self) -> Iterable[Sequence]:
        return sorted(self.waiting, key=rank)

    def continuing_order(self) -> Iterable[Sequence]:
        return sorted(self.running, key=rank)

    def pick_victim(self, seq: Sequence) -> Sequence:
        candidates = self.running[1:] or self.running
        lowest = max(s.priority for s in candidates)
        return self.choose_victim([s for s in candidates if s.priority == lowest])
