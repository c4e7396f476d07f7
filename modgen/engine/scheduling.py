"""Scheduler interface: each step, which sequences get how many tokens.

A scheduler sees sequence metadata and the KV allocator, never tensors, so the same scheduler
drives the real executor and a simulated one. The base class holds the queues and the building
blocks a policy is made of (admit a given sequence, offer decodes the budget fairly, pick and
preempt a victim); a variant overrides the one it changes.
"""

from __future__ import annotations

import itertools
import sys
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modgen.engine.kv import KVAllocator
from modgen.engine.sequence import SeqStatus, Sequence
from modgen.sampling_params import BadRequestError

if TYPE_CHECKING:  # costs imports the model description, which imports this module
    from modgen.engine.costs import StepFeatures


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
    budget: int | None = None
    """Most tokens the step may run (None: no limit); phases read what is left in
    ``budget_left``."""
    _num_tokens: int = field(default=0, init=False, repr=False, compare=False)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        """Schedule ``num_tokens`` of ``seq``'s pending tokens."""
        self.chunks.append(Chunk(seq, num_tokens))
        self._num_tokens += num_tokens

    def remove(self, seq: Sequence) -> int:
        """Take back ``seq``'s chunk (a sequence preempted after it was planned); returns its
        tokens (0 if it had none)."""
        for i, chunk in enumerate(self.chunks):
            if chunk.seq is seq:
                del self.chunks[i]
                self._num_tokens -= chunk.num_tokens
                return chunk.num_tokens
        return 0

    @property
    def num_tokens(self) -> int:
        """Tokens in the step."""
        return self._num_tokens

    @property
    def budget_left(self) -> int:
        """Tokens the step may still take (``sys.maxsize`` without a budget)."""
        return sys.maxsize if self.budget is None else self.budget - self._num_tokens

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

    A policy is built from the methods below: ``admission_order`` and ``admit`` (which waiting
    sequence gets KV), ``add_chunk`` (plan tokens), ``schedule_decodes`` and ``decode_order``
    (one token per running decode, rotating fairly when the budget is short), ``pick_victim``,
    ``choose_victim`` and ``preempt`` (who loses its KV when a decode finds no free slot).
    """

    Config = SchedulerConfig

    def __init__(self, config: SchedulerConfig, kv: KVAllocator) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._stamps = itertools.count()
        self._last_served: dict[int, int] = {}  # seq_id -> stamp of its last planned chunk
        self.online = False
        """Whether requests arrive as a stream (see ``set_online``)."""

    def report(self) -> dict[str, Any]:
        """Figures for the run's results (settings in force that were chosen, say)."""
        return {}

    def calibrate(  # noqa: B027 (optional hook)
        self, step_seconds: Callable[[int], float], shape: Mapping[str, Any]
    ) -> None:
        """Called once by the engine before any request, with ``step_seconds(n)``: how long a
        step of ``n`` tokens takes on the engine's executor (measured, or predicted by a
        simulated one; see ``modgen.engine.probe``), and ``shape``: what identifies that executor
        and model (for a cached decision; it carries the model's ``sliding_window`` too). A
        scheduler with settings chosen by measurement (e.g. SplitFuse's token budget) chooses
        them here; by default there are none."""

    def set_online(self, online: bool) -> None:
        """Called by whatever drives the engine: True when requests arrive as a stream with
        clients waiting on each token (``AsyncEngine``: the server, the bench's clients), False
        (the default) for an offline batch (``LLM.generate``, ``task=generate``). A policy may
        default to other settings for each, as vLLM's defaults differ between its server and its
        offline ``LLM`` (a larger token budget offline)."""
        self.online = online

    @property
    def observes_steps(self) -> bool:
        """Whether ``observe`` wants every step (the engine builds a step's features only then,
        off the hot path otherwise). Default: False."""
        return False

    def observe(self, features: StepFeatures, seconds: float) -> None:  # noqa: B027 (optional)
        """Called by the engine after each step that ran, while ``observes_steps``: what the step
        held (``features``, read before its sequences advanced) and how long it took by the
        engine's clock, from planning to its tokens committed (measured, or predicted by a
        simulated executor): the step's ``StepStats.duration``. A policy that sizes steps by
        time learns here; by default nothing."""

    @abstractmethod
    def schedule(self) -> StepPlan:
        """Plan the next step; admitting, allocating and preempting as the policy decides."""

    def check(self, seq: Sequence) -> None:
        """Raise BadRequestError if ``seq`` could never be scheduled, even alone."""
        if seq.max_total_tokens > self.kv.capacity_tokens:
            need = -(-seq.max_total_tokens // self.kv.block_size)
            raise BadRequestError(
                f"prompt plus max_tokens ({seq.max_total_tokens} tokens) exceeds the KV cache "
                f"({self.kv.capacity_tokens} tokens): it needs {need} blocks of "
                f"{self.kv.block_size} tokens and the cache has {self.kv.num_blocks} (raise "
                "kv_allocator.num_blocks or kv_allocator.memory_gb, or lower max_tokens)",
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
        self._last_served.pop(seq.seq_id, None)
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

    # admission ------------------------------------------------------------------------------

    def admission_order(self) -> Iterable[Sequence]:
        """The waiting sequences in the order they are offered admission (a snapshot: admitting
        changes ``waiting``). Default: queue order, i.e. arrival order with preempted sequences
        first."""
        return list(self.waiting)

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

    def add_chunk(self, plan: StepPlan, seq: Sequence, num_tokens: int) -> None:
        """Plan ``num_tokens`` of ``seq``'s pending tokens and note when it was last served (for
        ``decode_order``)."""
        plan.add(seq, num_tokens)
        self._last_served[seq.seq_id] = next(self._stamps)

    # decodes --------------------------------------------------------------------------------

    def schedule_decodes(self, plan: StepPlan, budget: int | None = None) -> int:
        """Give running decodes one token each within ``budget`` (default: what ``plan`` has
        left), reserving a KV slot for each and preempting (``pick_victim``) when none is free.
        Decodes go in admission order when all fit, else in ``decode_order``. Returns the
        budget left."""
        budget = plan.budget_left if budget is None else budget
        start = plan.num_tokens
        decodes = [s for s in self.running if s.is_decode]
        if len(decodes) > budget:
            decodes = self.decode_order(decodes)
        for seq in decodes:
            if plan.num_tokens - start >= budget:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted to make room for an earlier one
            if self.reserve_or_preempt(seq, seq.num_tokens, plan):
                self.add_chunk(plan, seq, 1)
        return budget - (plan.num_tokens - start)

    def decode_order(self, decodes: list[Sequence]) -> list[Sequence]:
        """The order running decodes are offered the budget when not all of them fit. Default:
        least recently served first, so they rotate fairly: none waits more than
        ceil(running / budget) steps."""
        return sorted(decodes, key=lambda s: self._last_served.get(s.seq_id, -1))

    # preemption -----------------------------------------------------------------------------

    def pick_victim(self, seq: Sequence) -> Sequence:
        """The running sequence to preempt so that running ``seq`` can have a KV slot (``seq``
        itself is allowed). Default: ``choose_victim`` among all but the oldest running
        sequence, which is preempted only when it runs alone, so it always finishes."""
        return self.choose_victim(self.running[1:] or self.running)

    def choose_victim(self, candidates: list[Sequence]) -> Sequence:
        """FastGen's victim among ``candidates`` (in admission order): the most recently
        admitted one, passing over any that was preempted before while another was not; if all
        were, the one holding the most KV blocks. So a re-admitted victim is never preempted
        again ahead of a sequence that holds more KV (no ping-pong of one sequence whose
        recompute grows each time)."""
        for seq in reversed(candidates):
            if seq.metrics.num_preemptions == 0:
                return seq
        return max(reversed(candidates), key=lambda s: len(self.kv.block_table(s.seq_id)))

    def preempt(self, victim: Sequence, plan: StepPlan) -> None:
        """Free ``victim``'s KV (its references: cached blocks others use stay), take back its
        chunk if it was planned, and requeue it first in ``waiting``, to be recomputed (prompt
        and output) when it is admitted again."""
        self.running.remove(victim)
        plan.remove(victim)
        self.kv.free(victim.seq_id)
        self._last_served.pop(victim.seq_id, None)
        victim.num_computed = 0
        victim.status = SeqStatus.WAITING
        victim.metrics.num_preemptions += 1
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)

    def preempt_last(self, plan: StepPlan) -> Sequence:
        """Preempt the most recently admitted running sequence (see ``preempt``)."""
        victim = self.running[-1]
        self.preempt(victim, plan)
        return victim

    def reserve_or_preempt(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Allocate ``num_tokens`` slots for running ``seq``, preempting ``pick_victim``'s
        choices until they fit. False if ``seq`` itself had to be preempted."""
        while not self.kv.can_allocate(seq.seq_id, num_tokens):
            victim = self.pick_victim(seq)
            if victim.status is not SeqStatus.RUNNING:
                raise RuntimeError(f"pick_victim chose sequence {victim.seq_id}, which holds no KV")
            self.preempt(victim, plan)
            if victim is seq:
                return False
        self.kv.allocate(seq.seq_id, num_tokens)
        return True
