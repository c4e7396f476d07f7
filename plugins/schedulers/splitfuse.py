"""``scheduler=splitfuse``: DeepSpeed-FastGen's Dynamic SplitFuse, as three overridable phases."""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modgen import calibration
from modgen.engine.costs import StepFeatures, StepTimeFit, attention_pairs
from modgen.engine.kv import KVAllocator
from modgen.engine.scheduling import Scheduler, SchedulerConfig, StepPlan
from modgen.engine.sequence import Sequence
from modgen.registry import register

log = logging.getLogger(__name__)

ONLINE_BUDGET = 512
"""The default token budget of an engine serving a stream of requests (``Scheduler.online``)."""
OFFLINE_BUDGET = 2048
"""The default token budget of an offline batch."""
ONLINE_PREFILL_SHARE = 0.45
"""The default ``prefill_share`` of an engine serving a stream of requests (offline: none)."""


@register("scheduler", "splitfuse")
class SplitFuseScheduler(Scheduler):
    """Every step runs up to ``token_budget`` tokens: decodes first (one token each), then prompt
    chunks fill the rest exactly (or, held to a time by ``max_step_ms`` or, served,
    ``prefill_share``, as far as the step's time allows, shortest prompt first). Else a
    split prompt's remainder goes first among prompts next step; a waiting prompt is admitted
    only when KV blocks for its whole (uncached) remainder are free; when a decode finds no free
    block, a running sequence is preempted and later recomputed.

    ``schedule`` is the composition of three phases a variant may override one by one:
    ``schedule_decodes`` (base class), ``schedule_continuing`` and ``schedule_admissions``, with
    the orders they follow (``decode_order``, ``continuing_order``, ``admission_order``) and the
    victim choice (``pick_victim``)."""

    @dataclass(kw_only=True)
    class Config(SchedulerConfig):
        """Dynamic SplitFuse settings."""

        token_budget: int | None = None
        """Tokens per forward pass (decodes plus prompt chunks). None (the default): by usage,
        512 when the engine serves a stream of requests (a server, the bench's clients: every
        step is a wait between tokens), 2048 for an offline batch (``LLM.generate``,
        ``task=generate``: only throughput counts, and fewer, larger steps were 2-4% faster on
        the peers' workloads, docs/notes.md), as vLLM's CPU defaults differ (2048 served, 4096
        offline). 0: chosen at start-up on the engine's executor, the smallest of
        ``budget_candidates`` whose time per token is within 3% of the best one's (a bigger
        step would only lengthen every token's wait); cached per machine, model and executor
        (``python -m modgen.calibration``). Not the default: the rule weighs throughput and
        token latency, not time to first token (docs/notes.md)."""
        budget_candidates: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
        """The budgets ``token_budget=0`` chooses among."""
        max_passes: int = 0
        """How many times later prompts may be admitted past a waiting prompt whose KV does not
        fit yet (one large prompt then does not block every admission behind it). 0 keeps
        FastGen's strict order; a prompt passed this many times blocks the ones behind it until
        it fits."""

        max_step_ms: float = 0
        """Longest a step that carries decodes may take, in milliseconds (0: none, and then
        ``prefill_share`` decides; with neither, FastGen's rule: the token budget alone).
        Prompt chunks are cut to fit, by a fit of step time to step features learnt from the
        steps run so far (``StepTimeFit``), shortest prompt first; a step still gets
        ``min_chunk`` prompt tokens, and a step without decodes (no one waits on it) is not
        limited. A token budget bounds a step's tokens, not its time: on a CPU every
        token costs about the same, and so does every key a long prompt's chunk attends to, so
        equal budgets make unequal steps. A bound on inter-token latency, as Sarathi-Serve sizes
        its chunks by its latency target."""
        prefill_share: float | None = None
        """Longest a step that carries decodes may take, as a share of a typical prompt's
        prefill: the median length of the last ``typical_prompts`` admitted prompts, its
        prefill from scratch predicted by the step fit (a step's fixed cost and the prompt's
        own work; ``max_step_ms`` wins when set). None (the default): by usage,
        ``ONLINE_PREFILL_SHARE`` (0.45) when the engine serves a stream of requests, none
        offline (only throughput counts there); 0: none. The limit follows the prompts clients
        send, in the machine's own time, whatever the machine and model: a decode waits for at
        most 0.45 of what a typical prompt's prefill takes (with prompts of ~1000 tokens that is
        near the 512-token budget's steps; with prompts of ~200, a 512-token step would stall
        decodes for several whole prefills). Counted from scratch, not by its uncached part: a
        prefix cache makes prompts cheap, not the wait a client expects, and a limit set by the
        few uncached tokens of a shared-prefix workload (below the decodes' own step) cut its
        served throughput by a quarter (docs/notes.md). Held to a time, prompt work goes to the
        prompt with the least left first (``schedule_shortest_first``). 0.45 was chosen on the
        peers' served workloads beside vLLM (docs/notes.md)."""
        typical_prompts: int = 64
        """Admitted prompts whose median length is the typical prompt (``prefill_share``)."""
        max_prompt_wait: int = 64
        """Held to a time, steps a prompt being split may go without a chunk while shorter
        ones go first; then it goes first for a step (it is delayed, never starved)."""
        min_chunk: int = 8
        """Prompt tokens a step gets (or all there are) even when the step limit leaves no
        time: prompts always advance."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.max_step_ms >= 0:
                raise ValueError(
                    f"scheduler.max_step_ms must be >= 0 (0: no limit), got {self.max_step_ms}"
                )
            if self.prefill_share is not None and not self.prefill_share >= 0:
                raise ValueError(
                    f"scheduler.prefill_share must be >= 0 (0: none) or null (by usage), got "
                    f"{self.prefill_share}"
                )
            if self.typical_prompts < 1:
                raise ValueError(
                    f"scheduler.typical_prompts must be >= 1, got {self.typical_prompts}"
                )
            if self.max_prompt_wait < 0:
                raise ValueError(
                    f"scheduler.max_prompt_wait must be >= 0, got {self.max_prompt_wait}"
                )
            if self.min_chunk < 1:
                raise ValueError(f"scheduler.min_chunk must be >= 1, got {self.min_chunk}")
            if self.token_budget is not None and self.token_budget < 0:
                raise ValueError(
                    f"scheduler.token_budget must be >= 1, 0 to measure one, or null (by "
                    f"usage); got {self.token_budget}"
                )
            if not self.budget_candidates or min(self.budget_candidates) < 1:
                raise ValueError(
                    "scheduler.budget_candidates must be budgets >= 1, "
                    f"got {self.budget_candidates}"
                )
            if self.max_passes < 0:
                raise ValueError(f"scheduler.max_passes must be >= 0, got {self.max_passes}")

    config: Config

    def __init__(self, config: Config, kv: KVAllocator) -> None:
        super().__init__(config, kv)
        self._passes: dict[int, int] = {}  # seq_id -> later arrivals admitted ahead of it
        self._measured: int | None = None  # the budget calibrate chose (token_budget=0)
        self.step_fit = StepTimeFit()
        """Step time learnt from the steps run (for the step limit)."""
        self._timed: tuple[StepPlan, float, int] | None = None  # plan, seconds, prompt tokens
        self.window: int | None = None
        """The model's sliding window (from ``calibrate``'s shape), for the predicted costs."""
        self.prompt_lengths: deque[int] = deque(maxlen=config.typical_prompts)
        """Lengths of the last admitted prompts (for ``prefill_share``)."""
        self._limits: deque[float] = deque(maxlen=4096)  # recent step limits, s (the report)
        self._steps = 0  # plans made
        self._prompt_step: dict[int, int] = {}  # seq_id -> the plan of its last prompt chunk

    def calibrate(self, step_seconds: Callable[[int], float], shape: Mapping[str, Any]) -> None:
        self.window = shape.get("sliding_window")
        if self.config.token_budget != 0:  # configured, or left to the usage
            return
        try:
            choice = calibration.choose_size(
                "token budget", shape, step_seconds, sorted(self.config.budget_candidates)
            )
        except ValueError as err:
            log.warning("%s; the token budget follows the usage (%d served, %d offline)",
                        err, ONLINE_BUDGET, OFFLINE_BUDGET)  # fmt: skip
            return
        self._measured = int(choice.name)

    @property
    def token_budget(self) -> int:
        """The budget in force: the configured one, else the one ``calibrate`` measured, else
        the default for the usage (``ONLINE_BUDGET`` or ``OFFLINE_BUDGET``)."""
        if self.config.token_budget:
            return self.config.token_budget
        if self._measured is not None:
            return self._measured
        return ONLINE_BUDGET if self.online else OFFLINE_BUDGET

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_budget": self.token_budget}
        if self._limits:  # the step-time limits the last steps with decodes were held to
            out["step_limit_ms_median"] = statistics.median(self._limits) * 1e3
            out["step_limit_ms_min"] = min(self._limits) * 1e3
            out["step_limit_ms_max"] = max(self._limits) * 1e3
        coef = self.step_fit.coefficients() if self.observes_steps else None
        if coef is not None:  # what the limit was enforced with, in readable units
            units = [("fixed_ms", 1e3), ("token_us", 1e6), ("logit_us", 1e6),
                     ("prompt_pair_ns", 1e9), ("decode_key_ns", 1e9)]  # fmt: skip
            out.update(
                {f"step_fit_{k}": float(c) * u for (k, u), c in zip(units, coef, strict=True)}
            )
        return out

    def schedule(self) -> StepPlan:
        plan = StepPlan(budget=self.token_budget)
        self._steps += 1
        self.schedule_decodes(plan)
        if self._time_left(plan)[0] is None:  # FastGen's order: a split prompt's remainder first
            self.schedule_continuing(plan)
            self.schedule_admissions(plan)
        else:
            self.schedule_shortest_first(plan)
        if self.observes_steps:  # a limit may be in force: max_prompt_wait counts from here
            for c in plan.chunks:
                if not c.seq.is_decode:
                    self._prompt_step[c.seq.seq_id] = self._steps
        return plan

    def schedule_shortest_first(self, plan: StepPlan) -> None:
        """Prompt chunks of a step held to a time: it has room for a sliver of prompt, and that
        goes to the prompt with the least left first (ties: ``continuing_order``); a prompt
        being split goes ahead of a waiting one only if that is no shorter (a waiting prompt's
        length counts, not its uncached part: no cache lookups every step), and those that went
        ``max_prompt_wait`` steps without a chunk go first, longest without first. In arrival
        order, a long prompt being split held every short one behind it for the dozens of steps
        it took (vLLM, to the same end, caps long prompts' share of a step when prefills run
        side by side)."""
        shortest = min((s.num_pending for s in self.waiting), default=None)
        split = (s for s in self.continuing_order() if not s.is_decode and s.num_pending > 0)
        prompts = sorted(split, key=lambda s: s.num_pending)
        wait = self.config.max_prompt_wait
        last = {s.seq_id: self._prompt_step.get(s.seq_id, 0) for s in prompts}
        aged = sorted(  # longest without a chunk first
            (s for s in prompts if self._steps - last[s.seq_id] > wait),
            key=lambda s: last[s.seq_id],
        )
        aged_ids = {s.seq_id for s in aged}
        ahead = aged + [
            s
            for s in prompts
            if s.seq_id not in aged_ids and (shortest is None or s.num_pending <= shortest)
        ]
        self.schedule_continuing(plan, ahead)
        self.schedule_admissions(plan)
        first = {s.seq_id for s in ahead}
        self.schedule_continuing(plan, [s for s in prompts if s.seq_id not in first])

    @property
    def share(self) -> float:
        """The ``prefill_share`` in force: configured, else by usage (0: none)."""
        if self.config.prefill_share is not None:
            return self.config.prefill_share
        return ONLINE_PREFILL_SHARE if self.online else 0.0

    @property
    def observes_steps(self) -> bool:
        return bool(self.config.max_step_ms or self.share)  # the fit serves the limit alone

    def step_limit(self) -> float | None:
        """Seconds a step with decodes may take: ``max_step_ms``, else ``prefill_share`` of a
        typical prompt's predicted prefill (a step's fixed cost and the prompt's own work);
        None: no limit (none set, or no fit or admitted prompt yet)."""
        if self.config.max_step_ms:
            return self.config.max_step_ms / 1e3
        coef = self.step_fit.coefficients()
        if not self.share or coef is None or not self.prompt_lengths:
            return None
        n = int(statistics.median_low(self.prompt_lengths))
        return float(self.share * (coef[0] + self._chunk_cost(0, n, True)))

    def observe(self, features: StepFeatures, seconds: float) -> None:
        self.step_fit.add(features, seconds)

    def chunk_fit(self, plan: StepPlan, seq: Sequence, start: int, pending: int) -> int:
        """Tokens a prompt chunk of ``seq`` from position ``start`` (``pending`` tokens to go)
        may take in ``plan``: what the token budget leaves, cut to the time the step limit
        leaves, never below what ``min_chunk`` still owes the step's prompts (0: the step is
        full). Books nothing (``prompt_room`` does); expects the decodes planned first, as
        every SplitFuse phase order has them."""
        room = min(pending, plan.budget_left)
        left, given = self._time_left(plan)
        if room <= 0 or left is None:
            return max(room, 0)
        lo, hi = 0, room  # the largest n whose cost fits, by bisection (cost grows with n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = self._chunk_cost(start, mid, mid == pending) <= left
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return max(lo, min(self.config.min_chunk - given, room))

    def prompt_room(self, plan: StepPlan, seq: Sequence) -> int:
        """Tokens ``seq``'s next prompt chunk takes in ``plan`` (``chunk_fit`` from where it
        stands), booked against the time the step has left."""
        start, pending = seq.num_computed, seq.num_pending
        n = self.chunk_fit(plan, seq, start, pending)
        left, given = self._time_left(plan)
        if left is not None and n > 0:
            self._timed = (plan, left - self._chunk_cost(start, n, n == pending), given + n)
        return n

    def _chunk_cost(self, start: int, n: int, completes: bool) -> float:
        """Predicted seconds ``n`` prompt tokens from ``start`` add to a step."""
        coef = self.step_fit.coefficients()
        assert coef is not None  # asked only while the limit is in force
        pairs = attention_pairs(start, n, self.window)
        return float(coef[1] * n + coef[2] * completes + coef[3] * pairs)

    def _time_left(self, plan: StepPlan) -> tuple[float | None, int]:
        """Seconds ``plan`` may still grow by under the step limit (None: no limit), and the
        prompt tokens it holds."""
        if not self.observes_steps:
            return None, 0
        if self._timed is not None and self._timed[0] is plan:
            return self._timed[1], self._timed[2]
        coef = self.step_fit.coefficients()
        decodes = [c.seq for c in plan.chunks if c.seq.is_decode]
        if coef is None or not decodes:
            self._timed = None
            return None, 0
        w = self.window
        keys = sum(s.num_computed + 1 if w is None else min(s.num_computed + 1, w) for s in decodes)
        alone = coef[0] + (coef[1] + coef[2]) * len(decodes) + coef[4] * keys
        limit = self.step_limit()
        if limit is None:
            self._timed = None
            return None, 0
        self._limits.append(limit)
        left = float(limit - alone)
        self._timed = (plan, left, plan.num_tokens - len(decodes))
        return left, self._timed[2]

    def continuing_order(self) -> Iterable[Sequence]:
        """Running sequences in the order their pending prompt tokens get the budget. Default:
        admission order (a split prompt's remainder before any newer prompt). Held to a time,
        it breaks ties only (``schedule_shortest_first``)."""
        return self.running

    def schedule_continuing(self, plan: StepPlan, seqs: Iterable[Sequence] | None = None) -> None:
        """Prompts already admitted (their blocks are reserved) get their next chunk, in
        ``continuing_order`` (or those of ``seqs``, in that order)."""
        for seq in self.continuing_order() if seqs is None else seqs:
            if plan.budget_left <= 0:
                return
            if not seq.is_decode and seq.num_pending > 0:
                n = self.prompt_room(plan, seq)
                if n <= 0:
                    return
                self.add_chunk(plan, seq, n)

    def schedule_admissions(self, plan: StepPlan) -> None:
        """Waiting prompts, in ``admission_order``, while the budget lasts: each is admitted only
        when blocks for its whole remainder are free, and gets a chunk that fills the budget (or
        the time the step limit leaves; none is admitted without a chunk). The
        first that does not fit stops admission, unless ``max_passes`` lets later ones pass."""
        passed: list[Sequence] = []  # did not fit; later ones may pass them
        for seq in self.admission_order():
            if plan.budget_left <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if any(self.num_passes(s) >= self.config.max_passes for s in passed):
                return
            if self._time_left(plan)[0] is not None:  # a token's time left, first
                uncached = self.num_uncached(seq)
                if self.chunk_fit(plan, seq, seq.num_tokens - uncached, uncached) <= 0:
                    return
            if self.admit(seq, seq.num_tokens):
                if not seq.metrics.num_preemptions:  # a prompt, not a recompute
                    self.prompt_lengths.append(seq.num_prompt_tokens)
                self._count_pass(seq)
                n = self.prompt_room(plan, seq)
                if n <= 0:  # cannot happen after the check above; never admit without a chunk
                    return
                self.add_chunk(plan, seq, n)
            elif self.num_passes(seq) >= self.config.max_passes:
                return
            else:
                passed.append(seq)

    def num_passes(self, seq: Sequence) -> int:
        """How many later arrivals were admitted while waiting ``seq`` waited."""
        return self._passes.get(seq.seq_id, 0)

    def _count_pass(self, admitted: Sequence) -> None:
        self._passes.pop(admitted.seq_id, None)
        if self.config.max_passes:
            for seq in self.waiting:
                if seq.seq_id < admitted.seq_id:  # seq ids follow arrival
                    self._passes[seq.seq_id] = self._passes.get(seq.seq_id, 0) + 1

    def remove(self, seq: Sequence) -> None:
        self._passes.pop(seq.seq_id, None)
        self._prompt_step.pop(seq.seq_id, None)
        super().remove(seq)
