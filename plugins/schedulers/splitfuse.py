"""``scheduler=splitfuse``: DeepSpeed-FastGen's Dynamic SplitFuse."""

from __future__ import annotations

from dataclasses import dataclass

from modgen.engine.scheduling import Scheduler, SchedulerConfig, StepPlan
from modgen.registry import register


@register("scheduler", "splitfuse")
class SplitFuseScheduler(Scheduler):
    """Every step runs up to ``token_budget`` tokens: decodes first (one token each), then prompt
    chunks fill the rest exactly. A split prompt's remainder goes first among prompts next step; a
    waiting prompt is admitted only when KV blocks for its whole remainder are free; when a decode
    finds no free block, the last sequence holding KV is preempted and later recomputed."""

    @dataclass(kw_only=True)
    class Config(SchedulerConfig):
        """Dynamic SplitFuse settings."""

        token_budget: int = 512
        """Tokens per forward pass (decodes plus prompt chunks)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.token_budget < 1:
                raise ValueError(f"scheduler.token_budget must be >= 1, got {self.token_budget}")

    config: Config

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.schedule_decodes(plan, self.config.token_budget)
        # prompts already admitted (their blocks are reserved): oldest first
        for seq in self.running:
            if budget == 0:
                return plan
            if not seq.is_decode and seq.num_pending > 0:
                n = min(seq.num_pending, budget)
                plan.add(seq, n)
                budget -= n
        # admit waiting prompts in arrival order while budget and blocks last
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not self.admit(seq, seq.num_tokens):
                break
            n = min(seq.num_pending, budget)
            plan.add(seq, n)
            budget -= n
        return plan
