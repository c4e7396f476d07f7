"""``scheduler=continuous``: Orca / vLLM-v0 continuous batching without chunked prefill."""

from __future__ import annotations

from dataclasses import dataclass

from modgen.engine.scheduling import Scheduler, SchedulerConfig, StepPlan
from modgen.engine.sequence import Sequence
from modgen.registry import register
from modgen.sampling_params import BadRequestError


@register("scheduler", "continuous")
class ContinuousScheduler(Scheduler):
    """Whole prompts are prefilled in steps of their own (as many as fit ``max_num_batched_tokens``)
    whenever one can be admitted; otherwise every running sequence decodes one token. This is the
    baseline FastGen compared Dynamic SplitFuse against: a long prefill stalls all decodes."""

    @dataclass(kw_only=True)
    class Config(SchedulerConfig):
        """Continuous batching settings."""

        max_num_batched_tokens: int = 8192
        """Most prompt tokens in one prefill step; a longer request is rejected."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.max_num_batched_tokens < 1:
                raise ValueError(
                    "scheduler.max_num_batched_tokens must be >= 1, "
                    f"got {self.max_num_batched_tokens}"
                )

    config: Config

    def check(self, seq: Sequence) -> None:
        super().check(seq)
        # after a preemption the whole prompt plus output is recomputed in one step
        if seq.max_total_tokens > self.config.max_num_batched_tokens:
            raise BadRequestError(
                f"prompt plus max_tokens ({seq.max_total_tokens} tokens) exceeds "
                f"scheduler.max_num_batched_tokens ({self.config.max_num_batched_tokens})",
                "prompt",
            )

    def can_admit_now(self) -> bool:
        """Whether the policy lets a waiting sequence in this step."""
        return True

    def slots_to_reserve(self, seq: Sequence) -> int:
        """KV slots to allocate when ``seq`` is admitted."""
        return seq.num_tokens

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_num_batched_tokens
        while self.waiting and (plan.chunks or self.can_admit_now()):
            seq = self.waiting[0]  # its cached prefix (if any) needs no computing
            if self.num_uncached(seq) > budget or not self.admit(seq, self.slots_to_reserve(seq)):
                break
            self.add_chunk(plan, seq, seq.num_pending)
            budget -= seq.num_pending
        if plan.chunks:
            return plan  # a prefill-only step
        self.schedule_decodes(plan, len(self.running))
        return plan
