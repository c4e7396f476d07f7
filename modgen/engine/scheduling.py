"""Scheduler interface: each step, which sequences get how many tokens.

A scheduler sees sequence metadata and the KV allocator, never tensors, so the same scheduler
drives the real executor and a simulated one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field

from modgen.engine.kv import KVAllocator
from modgen.engine.sequence import SeqStatus, Sequence
from modgen.sampling_params import BadRequestError


@dataclass(frozen=True, slots=True)
class Chunk:
    """``num_tokens`` pending tokens of ``seq``, starting at ``seq.num_computed``."""

    seq: Sequence
    num_tokens: int

    @property
    def completes(self) -> bool:
        """Whether this chunk computes the sequence's last pending token (so it needs logits)."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    """One forward pass: the chunks to run and the sequences preempted to make room."""

    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        """Schedule ``num_tokens`` of ``seq``'s pending tokens."""
        self.chunks.append(Chunk(seq, num_tokens))

    @property
    def num_tokens(self) -> int:
        """Tokens in the step."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        """Tokens that are single-token decodes."""
        return sum(1 for c in self.chunks if c.seq.is_decode)

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt (or recompute) tokens."""
        return self.num_tokens - self.num_decode_tokens

    def __len__(self) -> int:
        return len(self.chunks)


@dataclass(kw_only=True)
class SchedulerConfig:
    """Settings every scheduler has."""

    max_num_seqs: int = 256
    """Most sequences running (holding KV) at once, and so in one step."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"scheduler.max_num_seqs must be >= 1, got {self.max_num_seqs}")


class Scheduler(ABC):
    """Keeps the waiting and running queues and builds a StepPlan each step.

    ``waiting`` holds sequences without KV (new, or preempted: these go to the front);
    ``running`` holds sequences with KV, in admission order. The scheduler owns a sequence's KV
    from admission until it finishes, is aborted or is preempted: the engine reports the end
    with ``finish``, which frees it.
    """

    Config = SchedulerConfig

    def __init__(self, config: SchedulerConfig, kv: KVAllocator) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @abstractmethod
    def schedule(self) -> StepPlan:
        """Plan the next step; admitting, allocating and preempting as the policy decides."""

    def check(self, seq: Sequence) -> None:
        """Raise BadRequestError if ``seq`` could never be scheduled, even alone."""
        if seq.max_total_tokens > self.kv.capacity_tokens:
            raise BadRequestError(
                f"prompt plus max_tokens ({seq.max_total_tokens} tokens) exceeds the KV cache "
                f"({self.kv.capacity_tokens} tokens)",
                "max_tokens",
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def step_done(self, plan: StepPlan) -> None:
        """``plan`` ran: each chunk's sequence has advanced ``num_computed`` past its tokens. The
        KV allocator learns which tokens' KV is now in the cache (a prefix cache makes the full
        blocks shareable). Called by the engine after every successful step, before the new
        tokens are committed (and any finished sequence is freed)."""
        for chunk in plan.chunks:
            seq = chunk.seq
            self.kv.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed)

    def finish(self, seq: Sequence) -> None:
        """``seq`` ended (finished, aborted or failed): free its KV and forget it."""
        self.kv.free(seq.seq_id)
        self.remove(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queues (its KV, if any, is the caller's to free)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def num_waiting(self) -> int:
        """Sequences without KV."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding KV."""
        return len(self.running)

    def has_work(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting or self.running)

    # helpers for policies -------------------------------------------------------------------

    def admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Move ``seq`` (a waiting sequence, wherever it is in ``waiting``) to ``running`` if
        ``num_tokens`` slots can be allocated for it. Its KV allocation starts from the cached
        prefix of its tokens, if the allocator keeps one: ``seq.num_computed`` becomes the number
        of cached tokens, so its pending tokens are the uncached ones."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if not self.kv.can_allocate_sequence(seq.seq_id, seq.token_ids, num_tokens):
            return False
        cached = self.kv.allocate_sequence(seq.seq_id, seq.token_ids, num_tokens)
        if self.waiting and self.waiting[0] is seq:
            self.waiting.popleft()
        else:
            self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SeqStatus.RUNNING
        seq.num_computed = cached
        if seq.metrics.num_cached_tokens is None:
            seq.metrics.num_cached_tokens = cached
        return True

    def num_uncached(self, seq: Sequence) -> int:
        """Tokens a waiting ``seq`` would compute if admitted now: its pending tokens less the
        prefix the KV allocator has cached."""
        return seq.num_pending - self.kv.num_cached_tokens(seq.seq_id, seq.token_ids)

    def preempt_last(self, plan: StepPlan) -> Sequence:
        """Preempt the most recently admitted running sequence: free its KV, requeue it first."""
        victim = self.running.pop()
        self.kv.free(victim.seq_id)
        victim.num_computed = 0
        victim.status = SeqStatus.WAITING
        victim.metrics.num_preemptions += 1
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)
        return victim

    def reserve_or_preempt(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Allocate ``num_tokens`` slots for running ``seq``, preempting from the back of
        ``running`` until they fit. False if ``seq`` itself had to be preempted."""
        while not self.kv.can_allocate(seq.seq_id, num_tokens):
            if self.preempt_last(plan) is seq:
                return False
        self.kv.allocate(seq.seq_id, num_tokens)
        return True

    def schedule_decodes(self, plan: StepPlan, budget: int) -> int:
        """Add one token for each running decode, in order, within ``budget``; returns the rest."""
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.is_decode:
                if not self.reserve_or_preempt(seq, seq.num_tokens, plan):
                    break  # seq was the last one holding KV: everything behind it is gone too
                plan.add(seq, 1)
                budget -= 1
            i += 1
        return budget
