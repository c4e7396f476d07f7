"""``scheduler=splitfuse_spf``: Dynamic SplitFuse that admits the shortest prompt first, with
aging. An example variant, written against the public scheduler API only."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from modgen.engine.sequence import Sequence
from modgen.plugins.schedulers.splitfuse import SplitFuseScheduler
from modgen.registry import register


@register("scheduler", "splitfuse_spf")
class ShortestPromptFirstScheduler(SplitFuseScheduler):
    """SplitFuse that offers admission to the waiting prompt with the fewest uncached tokens
    first: short requests get their first token sooner, and a prompt that is mostly in the
    prefix cache counts as short. Aging bounds the wait of long prompts: one passed over by
    ``max_passes`` later arrivals goes first (and, if it does not fit, holds back those behind
    it until it does), so it is delayed, never starved."""

    @dataclass(kw_only=True)
    class Config(SplitFuseScheduler.Config):
        """Shortest-prompt-first settings."""

        max_passes: int = 32
        """Later arrivals a waiting prompt lets go first before it takes its turn (0: arrival
        order, i.e. plain SplitFuse)."""

    def admission_order(self) -> Iterable[Sequence]:
        limit = self.config.max_passes
        aged = [s for s in self.waiting if self.num_passes(s) >= limit]
        young = [s for s in self.waiting if self.num_passes(s) < limit]
        return aged + sorted(young, key=lambda s: (self.num_uncached(s), s.seq_id))
